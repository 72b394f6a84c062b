"""Task weightings on toy problems with known answers, and their hook into the training loop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from densemtl.config import Config, LossConfig, ModelConfig
from densemtl.train.losses import build_loss
from densemtl.train.weighting import (
    WEIGHTINGS,
    DWAWeighting,
    GradNormWeighting,
    PCGradWeighting,
    UncertaintyWeighting,
    backward_step,
    cagrad,
    epoch_end,
    pcgrad,
    shared_parameters,
    task_weights,
)

TASKS = ("semseg", "depth")


class Toy(nn.Module):
    """A shared linear layer and one linear head per task: ``encoder_parameters`` is the shared part."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in TASKS})

    def encoder_parameters(self):
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.relu(self.backbone(x))  # (B, 8)
        return {t: self.heads[t](h) for t in TASKS}


def _toy_losses(model: Toy, scales: tuple[float, float] = (1.0, 1.0)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    targets = {"semseg": x.sum(1, keepdim=True), "depth": -x[:, :1]}
    out = model(x)
    return {t: s * (out[t] - targets[t]).square().mean() for t, s in zip(TASKS, scales, strict=True)}


# ------------------------------------------------------------------------------------------------- PCGrad
def test_pcgrad_removes_the_conflicting_component() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0: conflict
    out = pcgrad(torch.stack([g1, g2]))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # (0.5, 0.5), orthogonal to g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1  # (0, 1), orthogonal to g1
    assert p1 @ g2 == pytest.approx(0.0) and p2 @ g1 == pytest.approx(0.0)
    torch.testing.assert_close(out, p1 + p2)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5]))


def test_pcgrad_leaves_agreeing_gradients_alone_and_is_scale_equivariant() -> None:
    grads = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]])  # dot > 0
    torch.testing.assert_close(pcgrad(grads), grads.sum(0))
    conflict = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    s = 1024.0  # an AMP loss scale
    torch.testing.assert_close(
        pcgrad(conflict * s, torch.Generator().manual_seed(3)),
        pcgrad(conflict, torch.Generator().manual_seed(3)) * s,
    )


# ------------------------------------------------------------------------------------------------- CAGrad
def test_cagrad_is_the_sum_at_c0_and_improves_the_worst_task() -> None:
    grads = torch.tensor([[1.0, 0.0], [-0.8, 0.3]])  # strongly conflicting
    torch.testing.assert_close(cagrad(grads, c=0.0), grads.sum(0))
    d = cagrad(grads, c=0.5)
    # the sum barely helps task 2 (0.2*-0.8 + 0.3*0.3 < 0: it would increase task 2's loss); CAGrad helps both
    assert float(grads.sum(0) @ grads[1]) < 0
    assert float((d @ grads.T).min()) > 0
    torch.testing.assert_close(cagrad(grads * 512.0, c=0.5), d * 512.0)


# ---------------------------------------------------------------------------------------------- uncertainty
def test_uncertainty_learns_each_tasks_loss_level_as_its_variance() -> None:
    """For fixed losses L_t the optimum is sigma_t^2 = L_t: the noisier task ends with the smaller weight."""
    w = UncertaintyWeighting(TASKS)
    opt = torch.optim.Adam(w.parameters(), lr=0.1)
    losses = {"semseg": torch.tensor(0.1), "depth": torch.tensor(2.0)}  # irreducible noise 0.1 vs 2.0
    for _ in range(250):
        opt.zero_grad()
        w(losses).backward()
        opt.step()
    variance = w.log_vars.detach().exp()
    torch.testing.assert_close(variance, torch.tensor([0.1, 2.0]), rtol=0.05, atol=0.0)
    weights = w.current_weights()
    assert weights["semseg"] == pytest.approx(0.5 / 0.1, rel=0.05) and weights["depth"] < weights["semseg"]


def test_uncertainty_with_a_model_tracks_the_noise_of_each_task() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    noise = {"semseg": 0.05, "depth": 1.0}  # residual variances a linear model cannot remove
    y = {
        t: x.sum(1, keepdim=True) + math.sqrt(v) * torch.randn(512, 1, generator=g) for t, v in noise.items()
    }
    model = nn.ModuleDict({t: nn.Linear(3, 1) for t in TASKS})
    w = UncertaintyWeighting(TASKS)
    opt = torch.optim.Adam([*model.parameters(), *w.parameters()], lr=0.1)
    for _ in range(200):
        opt.zero_grad()
        w({t: (model[t](x) - y[t]).square().mean() for t in TASKS}).backward()
        opt.step()
    var = w.log_vars.detach().exp()
    assert var[0] == pytest.approx(noise["semseg"], rel=0.3) and var[1] == pytest.approx(
        noise["depth"], rel=0.3
    )


# ---------------------------------------------------------------------------------------------------- DWA
def test_dwa_weights_follow_the_loss_ratio_and_sum_to_the_task_count() -> None:
    w = DWAWeighting(TASKS, temperature=2.0)
    assert w.current_weights() == {"semseg": 1.0, "depth": 1.0}
    w.on_epoch_end({"semseg": 1.0, "depth": 1.0})
    assert w.current_weights() == {"semseg": 1.0, "depth": 1.0}  # one epoch: no ratio yet
    w.on_epoch_end({"semseg": 0.5, "depth": 0.9})  # semseg fell fast, depth slowly: depth gets more weight
    r = torch.tensor([0.5, 0.9])
    expected = 2 * torch.softmax(r / 2.0, dim=0)
    got = w.current_weights()
    assert got["semseg"] == pytest.approx(float(expected[0])) and got["depth"] == pytest.approx(
        float(expected[1])
    )
    assert got["depth"] > got["semseg"] and sum(got.values()) == pytest.approx(2.0)
    total = w({"semseg": torch.tensor(2.0), "depth": torch.tensor(3.0)})
    assert float(total) == pytest.approx(2.0 * got["semseg"] + 3.0 * got["depth"], rel=1e-5)
    state = w.state_dict()  # the history is checkpointed: a resumed run continues exactly
    fresh = DWAWeighting(TASKS)
    fresh.load_state_dict(state)
    assert fresh.current_weights() == pytest.approx(got)


# ------------------------------------------------------------------------------------------------ GradNorm
def _shared_grad_norms(model: Toy, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    w = model.backbone.weight
    return torch.stack([torch.autograd.grad(losses[t], w, retain_graph=True)[0].norm() for t in TASKS])


def test_gradnorm_equalises_weighted_gradient_norms() -> None:
    """alpha = 0 targets equal |grad_W w_t L_t|: with one task 10x larger, the weights must compensate."""
    model = Toy()
    for p in model.parameters():
        p.requires_grad_(False)  # only the weights learn: the losses (and their gradients) stay fixed
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    gn = GradNormWeighting(TASKS, alpha=0.0)
    opt = torch.optim.Adam(gn.parameters(), lr=0.004)
    shared = shared_parameters(model)
    raw = _shared_grad_norms(model, _toy_losses(model, (1.0, 10.0)))
    assert raw[1] / raw[0] > 3  # the toy really is unbalanced
    for _ in range(500):
        opt.zero_grad()
        losses = _toy_losses(model, (1.0, 10.0))
        gn(losses)
        gn.backward(losses, shared)
        opt.step()
        for p in shared:
            p.grad = None
    w = gn._normalised()
    weighted = w * raw
    assert float(weighted[0] / weighted[1]) == pytest.approx(1.0, abs=0.1)
    assert float(w.sum()) == pytest.approx(2.0)


def test_gradnorm_writes_the_weighted_gradient_into_shared_and_head_parameters() -> None:
    model = Toy()
    gn = GradNormWeighting(TASKS, {"semseg": 0.5, "depth": 1.5}, alpha=1.5)
    losses = _toy_losses(model)
    gn(losses)
    gn.backward(losses, shared_parameters(model))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    losses = _toy_losses(model)  # the graph was freed by the last per-task backward
    (0.5 * losses["semseg"] + 1.5 * losses["depth"]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    assert gn.weights.grad is not None and torch.isfinite(gn.weights.grad).all()


# ------------------------------------------------------------------------------------ hooks and the engine
@pytest.mark.parametrize("name", ["pcgrad", "cagrad"])
def test_gradient_methods_change_only_shared_gradients(name: str) -> None:
    """Heads get their own task's gradient; the shared layer gets the method's combination of task gradients."""
    model = Toy()
    weighting = WEIGHTINGS[name](TASKS)
    losses = _toy_losses(model, (1.0, 3.0))
    losses["total"] = weighting(losses)
    per_task = []
    for t in TASKS:
        model.zero_grad()
        losses[t].backward(retain_graph=True)
        per_task.append(torch.cat([p.grad.reshape(-1).clone() for p in model.backbone.parameters()]))
    heads = {n: p.grad.clone() for n, p in model.heads.named_parameters() if n.startswith("depth")}
    model.zero_grad(set_to_none=True)
    weighting.backward(losses, shared_parameters(model))
    shared = torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters()])
    torch.testing.assert_close(shared, weighting.combine(torch.stack(per_task)))
    for n, p in model.heads.named_parameters():
        if n.startswith("depth"):
            torch.testing.assert_close(p.grad, heads[n])


def test_amp_scaler_gives_the_same_unscaled_update() -> None:
    """Each task loss is scaled before its backward; unscaling recovers the fp32 gradient (PCGrad, GradNorm)."""

    class FakeScaler:  # GradScaler's interface, scale 2^10, without CUDA
        def scale(self, x):
            return x * 1024.0

        def get_scale(self):
            return 1024.0

    for cls in (PCGradWeighting, GradNormWeighting):
        grads = []
        for scaler in (None, FakeScaler()):
            model, weighting = Toy(), cls(TASKS)
            losses = _toy_losses(model, (1.0, 5.0))
            losses["total"] = weighting(losses)
            weighting.backward(losses, shared_parameters(model), scaler)
            s = 1024.0 if scaler else 1.0
            grads.append(torch.cat([p.grad.reshape(-1) / s for p in model.parameters()]))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_is_selectable_and_drives_backward(name: str) -> None:
    loss_fn = build_loss(
        Config(loss=LossConfig(weighting=name), model=ModelConfig(tasks=TASKS, num_classes=3))
    )
    model = Toy()
    losses = _toy_losses(model)
    losses["total"] = loss_fn.weighting(losses)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    backward_step(loss_fn, losses, model, scaler)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    weights = task_weights(loss_fn)
    assert set(weights) == set(TASKS) and all(math.isfinite(v) and v > 0 for v in weights.values())
    epoch_end(loss_fn, {"loss/semseg": 1.0, "loss/depth": 2.0, "loss/total": 3.0})  # never raises


def test_training_logs_weights_and_calls_the_epoch_hook(synthetic_root, tmp_path, tiny_overrides) -> None:
    """A 3-epoch DWA run: weights appear in metrics.jsonl and move after epoch 2 as the hook prescribes."""
    import json

    from densemtl.config import load_config
    from densemtl.train.engine import train

    sets = tiny_overrides(synthetic_root, tmp_path, epochs=3) + ["loss.weighting=dwa", "data.max_samples=4"]
    sets += ["train.batch_size=4", "data.crop=[32, 64]", "train.channels_last=false"]
    train(load_config(None, sets))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["weight/semseg"] for r in records[:2]] == [1.0, 1.0]
    r = torch.tensor([records[1][f"loss/{t}"] / records[0][f"loss/{t}"] for t in TASKS])
    expected = 2 * torch.softmax(r / 2.0, dim=0)
    assert records[2]["weight/semseg"] == pytest.approx(float(expected[0]), rel=1e-4)
    assert records[2]["weight/depth"] == pytest.approx(float(expected[1]), rel=1e-4)


def test_training_logs_learned_weights_every_step(synthetic_root, tmp_path, tiny_overrides) -> None:
    """Uncertainty weighting: steps.jsonl holds every optimiser step's weights (moving step to step), their
    epoch means match metrics.jsonl, and TensorBoard has the per-step scalars."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from densemtl.config import load_config
    from densemtl.train.engine import train

    sets = tiny_overrides(synthetic_root, tmp_path, epochs=2) + ["loss.weighting=uncertainty"]
    sets += ["data.max_samples=8", "train.batch_size=4", "data.crop=[32, 64]", "train.channels_last=false"]
    train(load_config(None, sets))
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 8 images / batch 4, two epochs
    seg = [s["weight/semseg"] for s in steps]
    assert len(set(seg)) == len(seg)  # learned log-variances move every step
    assert all(math.isfinite(s["loss/total"]) for s in steps)
    assert epochs[0]["weight/semseg"] == pytest.approx(sum(seg[:2]) / 2, rel=1e-6)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    logged = [e.value for e in events.Scalars("step/weight/semseg")]
    assert logged == pytest.approx(seg, rel=1e-6)


def test_weighting_hyper_parameters_come_from_config() -> None:
    from densemtl.config import load_config

    cfg = load_config(None, ["loss.weighting=gradnorm", "loss.weighting_args={alpha: 0.5}"])
    assert (
        build_loss(Config(loss=cfg.loss, model=ModelConfig(tasks=TASKS, num_classes=3))).weighting.alpha
        == 0.5
    )
    cfg = load_config(None, ["loss.weighting=pcgrad", "loss.weighting_args={seed: 3}"])
    gen = build_loss(Config(loss=cfg.loss, model=ModelConfig(tasks=TASKS, num_classes=3))).weighting.generator
    assert gen.initial_seed() == 3  # an integer seed, although YAML/--set values arrive as floats
    cfg = load_config(None, ["loss.weighting=dwa", "loss.weighting_args={alpha: 1.0}"])
    with pytest.raises(
        ValueError, match=r"\['alpha'\] are not hyper-parameters of loss.weighting=dwa.*temperature"
    ):
        build_loss(Config(loss=cfg.loss, model=ModelConfig(tasks=TASKS, num_classes=3)))
    with pytest.raises(ValueError, match="unknown loss.weighting 'nash'"):
        build_loss(Config(loss=LossConfig(weighting="nash"), model=ModelConfig(tasks=TASKS, num_classes=3)))
