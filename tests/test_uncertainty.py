"""Per-pixel uncertainty: the depth std head, the NLL losses, flip TTA / MC dropout, calibration, and its uses.

The metrics themselves (sparsification AUSE/AURG, ECE/NLL/Brier, the fits) are tested against hand-computed
cases in tests/test_uncertainty_metrics.py; the point cloud and BEV filtering in tests/test_scene_uncertainty.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from densemtl.config import Config, LossConfig, ModelConfig, load_config, to_dict
from densemtl.inference import Predictor, predict_paths
from densemtl.models import build_model
from densemtl.tasks import TASKS
from densemtl.tasks.depth import DEPTH
from densemtl.tasks.depth_head import STD_INIT, STD_MAX, STD_MIN, DepthHead
from densemtl.tasks.depth_losses import DepthLoss, gaussian_nll, laplace_nll
from densemtl.tasks.semseg import SEMSEG, SegHead
from densemtl.train.checkpoint import load_checkpoint, make_payload, model_from_checkpoint, save_checkpoint

INFO = {"classes": ["a", "b", "c"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]], "depth": {"max": 80.0}}


def _tiny_model(**model) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=3, backbone="mobilenet_v3_small", decoder_channels=8, **model)
    return build_model(cfg).eval()


# ---------------------------------------------------------------------------------------------------- head
def test_depth_std_head_is_bounded_finite_and_trains() -> None:
    head = DepthHead(8, uncertainty=True)
    x = torch.randn(2, 8, 6, 7)
    out = head(x, (12, 14))
    assert out.shape == (2, 2, 12, 14)
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], STD_INIT), rtol=1e-2)  # its initial guess
    with torch.no_grad():  # extreme raw values stay inside the bounds
        head.out.weight.mul_(1e5)
    wild = head(x * 100, (12, 14))
    assert torch.isfinite(wild).all()
    assert wild[:, 1].min() >= STD_MIN * (1 - 1e-6) and wild[:, 1].max() <= STD_MAX * (1 + 1e-6)
    head = DepthHead(8, uncertainty=True)
    loss = DepthLoss("laplace_nll")(head(x, (12, 14)), torch.full((2, 1, 12, 14), 5.0))
    loss.backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and head.out.weight.grad[1].abs().sum() > 0


def test_nll_losses_match_hand_computed_values() -> None:
    r, s = torch.tensor([0.2, -0.05]), torch.tensor([0.1, 0.4])
    b = s / math.sqrt(2)
    plain = laplace_nll(r, s, excess=False)
    assert torch.allclose(plain, torch.tensor([0.2 / b[0] + math.log(2 * b[0]), 0.05 / b[1] + math.log(2 * b[1])]))
    best = torch.tensor([1 + math.log(0.4), 1 + math.log(0.1)])  # b = |r|: |r| / |r| + ln(2 |r|)
    assert torch.allclose(laplace_nll(r, s), plain - best)
    assert (laplace_nll(r, s) >= 0).all()  # the excess over the best std is never negative
    g_plain = gaussian_nll(r, s, excess=False)
    want = r.square() / (2 * s.square()) + s.log() + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(g_plain, want)
    g_best = 0.5 + r.abs().log() + 0.5 * math.log(2 * math.pi)  # s = |r|
    assert torch.allclose(gaussian_nll(r, s), g_plain - g_best)


def test_beta_one_gives_the_mean_l1_gradient() -> None:
    """beta-NLL with beta = 1: the residual's gradient is sign(r), whatever the std (so depth trains as L1)."""
    r = torch.tensor([0.3, -0.2, 0.01], requires_grad=True)
    laplace_nll(r, torch.tensor([0.05, 0.5, 2.0]), beta=1.0).sum().backward()
    assert torch.allclose(r.grad, torch.sign(r.detach()))
    r.grad = None
    laplace_nll(r, torch.tensor([0.05, 0.5, 2.0]), beta=0.0).sum().backward()
    assert not torch.allclose(r.grad, torch.sign(r.detach()))  # plain NLL: scaled by 1 / b


def test_nll_fits_the_std_of_known_residuals() -> None:
    """Minimising the loss over a constant std recovers the std of Laplace residuals in log depth."""
    torch.manual_seed(0)
    scale = 0.2  # Laplace b of ln depth, std = sqrt(2) b
    r = torch.distributions.Laplace(0.0, scale).sample((20000,))
    gt = torch.full((1, 1, 100, 200), 4.0)
    pred_depth = (gt.log() + r.view(1, 1, 100, 200)).exp()
    raw = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.05)
    for _ in range(300):
        std = torch.exp(raw).expand(1, 1, 100, 200)
        loss = DepthLoss("laplace_nll", nll_beta=0.0)(torch.cat([pred_depth, std], 1), gt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(torch.exp(raw.detach())) == pytest.approx(math.sqrt(2) * scale, rel=0.03)


def test_nll_needs_the_std_head() -> None:
    cfg = Config(loss=LossConfig(depth="laplace_nll"), model=ModelConfig(uncertainty=False, num_classes=3))
    with pytest.raises(ValueError, match="model.uncertainty=true"):
        DEPTH.make_loss(cfg)
    with pytest.raises(ValueError, match="model.uncertainty=true"):
        DepthLoss("gaussian_nll")(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))


def test_l1_with_std_head_leaves_the_depth_gradient_of_l1() -> None:
    """The default (L1 + the std's side loss) trains the depth exactly as L1 alone."""
    pred = torch.cat([torch.rand(1, 1, 4, 4) * 5 + 1, torch.full((1, 1, 4, 4), 0.3)], 1).requires_grad_()
    gt = torch.rand(1, 1, 4, 4) * 5 + 1
    DepthLoss("l1")(pred, gt).backward()
    with_std = pred.grad[:, :1].clone()
    assert pred.grad[:, 1:].abs().sum() > 0  # the std learns
    depth_only = pred[:, :1].detach().clone().requires_grad_()
    DepthLoss("l1")(depth_only, gt).backward()
    assert torch.allclose(with_std, depth_only.grad)


# ------------------------------------------------------------------------------------------- merge passes
def test_depth_merge_uses_the_law_of_total_variance() -> None:
    a = torch.tensor([[[[2.0]], [[0.1]]]])  # (1, 2, 1, 1): 2 m, std of ln depth 0.1
    b = torch.tensor([[[[8.0]], [[0.3]]]])
    merged = DEPTH.merge_samples([a, b])
    la, lb = math.log(2.0), math.log(8.0)
    assert float(merged[0, 0]) == pytest.approx(math.exp((la + lb) / 2))  # geometric mean: 4 m
    want_var = ((la - lb) / 2) ** 2 + (0.1**2 + 0.3**2) / 2
    assert float(merged[0, 1]) == pytest.approx(math.sqrt(want_var))
    one_channel = DEPTH.merge_samples([a[:, :1], b[:, :1]])  # a model without the std: the spread alone
    assert one_channel.shape == (1, 2, 1, 1) and float(one_channel[0, 1]) == pytest.approx(abs(la - lb) / 2)


def test_semseg_merge_averages_probabilities() -> None:
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    merged = SEMSEG.merge_samples([x, y])
    assert torch.allclose(merged.softmax(1), (x.softmax(1) + y.softmax(1)) / 2, atol=1e-6)


def test_flip_tta_merges_the_mirrored_pass() -> None:
    model = _tiny_model(tasks=("semseg", "depth", "normals"))
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    plain, tta = Predictor(model, INFO, "cpu"), Predictor(model, INFO, "cpu", tta="flip")
    assert plain.passes == 1 and tta.passes == 2
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        a, b = model(x), model(x.flip(-1))
    want = DEPTH.merge_samples([a["depth"], DEPTH.flip_output(b["depth"])])
    got = tta.predict(rgb)
    assert np.allclose(got["depth"], want[0, 0].numpy(), atol=1e-5)
    assert np.allclose(got["depth_std"], (want[0, 0] * want[0, 1]).numpy(), atol=1e-5)
    flipped_normals = TASKS["normals"].flip_output(b["normals"])  # mirrored x component undone
    assert torch.allclose(flipped_normals[:, 0], -b["normals"].flip(-1)[:, 0])
    assert not np.allclose(got["depth_std"], plain.predict(rgb)["depth_std"])  # the spread adds to the std


def test_mc_dropout_samples_differ_and_leave_batchnorm_alone() -> None:
    model = _tiny_model(dropout=0.3)
    rgb = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    mc = Predictor(model, INFO, "cpu", mc_samples=4)
    assert mc.passes == 4
    first, second = mc.predict(rgb), mc.predict(rgb)
    assert not np.allclose(first["depth"], second["depth"])  # dropout was on
    assert not model.training and all(not m.training for m in model.modules())  # everything back in eval
    plain = Predictor(model, INFO, "cpu").predict(rgb)
    assert np.allclose(plain["depth"], Predictor(model, INFO, "cpu").predict(rgb)["depth"])  # off: deterministic
    with pytest.raises(ValueError, match="model.dropout"):
        Predictor(_tiny_model(), INFO, "cpu", mc_samples=4)
    with pytest.raises(ValueError, match="at least 2"):
        Predictor(model, INFO, "cpu", mc_samples=1)


# --------------------------------------------------------------------------------------------- calibration
def test_semseg_temperature_fit_lowers_nll_and_lands_in_the_head() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(20000, 4, generator=gen)
    labels = torch.multinomial(logits.softmax(1), 1, generator=gen)[:, 0]  # calibrated by construction
    over = logits * 4.0  # an over-confident model
    head = SegHead(8, 4)
    fig = SEMSEG.fit_calibration(torch.cat([over, labels[:, None].float()], 1), head, Config())
    assert fig["nll_after"] < fig["nll_before"] and fig["temperature"] == pytest.approx(4.0, rel=0.15)
    assert float(head.calib_temperature) == pytest.approx(fig["temperature"])
    x = torch.randn(1, 8, 3, 3)
    with torch.no_grad():
        calibrated = head(x, (3, 3))
        SEMSEG.reset_calibration(head)
        raw = head(x, (3, 3))
    assert torch.allclose(calibrated, raw / fig["temperature"], atol=1e-5)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))


def test_depth_std_scale_fit_on_residuals() -> None:
    gen = torch.Generator().manual_seed(0)
    true_std = 0.2
    r = torch.randn(20000, generator=gen) * true_std
    head = _tiny_model().heads["depth"]
    data = torch.stack([r, torch.full_like(r, 0.05)], 1)  # an over-confident std (4x too small)
    fig = DEPTH.fit_calibration(data, head, Config(loss=LossConfig(depth="gaussian_nll")))
    assert fig["std_scale"] == pytest.approx(4.0, rel=0.03)
    assert float(head.calib_std_scale) == pytest.approx(fig["std_scale"])


def test_calibrate_checkpoint_updates_the_file_and_is_used(tiny_run: Path, tmp_path: Path) -> None:
    from densemtl.calibration import calibrate_checkpoint
    from densemtl.evaluation import evaluate_checkpoint

    out = tmp_path / "calibrated.pt"
    result = calibrate_checkpoint(tiny_run / "best.pt", "val", out=out, device="cpu")
    figures = result["calibration"]["tasks"]
    assert figures["semseg"]["nll_after"] <= figures["semseg"]["nll_before"] + 1e-9
    assert figures["depth"]["std_scale"] > 0
    ckpt = load_checkpoint(out)
    assert ckpt["calibration"]["split"] == "val"
    model = model_from_checkpoint(ckpt)
    assert float(model.heads["semseg"].calib_temperature) == pytest.approx(figures["semseg"]["temperature"])
    before = evaluate_checkpoint(tiny_run / "best.pt", split="val", out_dir=tmp_path / "e0", device="cpu")
    after = evaluate_checkpoint(out, split="val", out_dir=tmp_path / "e1", device="cpu")
    seg0, seg1 = before["results"]["semseg"], after["results"]["semseg"]
    assert seg1["nll"] <= seg0["nll"] + 1e-6 and seg1["miou"] == pytest.approx(seg0["miou"])  # argmax kept
    depth = after["results"]["depth"]
    assert {"ause_abs_rel", "aurg_abs_rel", "ause_rmse", "aurg_delta1"} <= set(depth)
    assert {"Depth uncertainty: sparsification", "Segmentation reliability"} <= set(after["plots"])
    assert (tmp_path / "e1" / "depth_sparsification.png").stat().st_size > 0
    with pytest.raises(ValueError, match="held-out"):
        calibrate_checkpoint(tiny_run / "best.pt", "train", out=tmp_path / "x.pt", device="cpu")


def test_version_3_checkpoint_loads_without_uncertainty_or_calibration(tmp_path: Path) -> None:
    cfg = Config(model=ModelConfig(num_classes=3, backbone="mobilenet_v3_small", decoder_channels=8,
                                   uncertainty=False))  # fmt: skip
    model = build_model(cfg.model).eval()
    old = make_payload(cfg, model, INFO)
    old["version"] = 3
    for key in ("uncertainty", "dropout"):
        del old["config"]["model"][key]  # version 3 configs did not have them
    old["model"] = {k: v for k, v in old["model"].items() if "calib_" not in k}
    save_checkpoint(tmp_path / "v3.pt", old)
    ckpt = load_checkpoint(tmp_path / "v3.pt")
    assert ckpt["config"] == to_dict(cfg)  # uncertainty: false filled in, not the new default
    loaded = model_from_checkpoint(ckpt).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert all(torch.equal(a[t], b[t]) for t in a) and b["depth"].shape[1] == 1


# ------------------------------------------------------------------------------------------------- outputs
def test_pseudolabel_masks_uncertain_depth() -> None:
    depth = np.array([[2.0, 10.0], [40.0, 5.0]], np.float32)
    std = np.array([[0.1, 3.0], [4.0, 0.2]], np.float32)  # relative: 0.05, 0.3, 0.1, 0.04
    got = DEPTH.pseudo_label({"depth": depth, "depth_std": std}, INFO, max_rel_std=0.2)
    assert np.array_equal(got, np.array([[2.0, 0.0], [40.0, 5.0]], np.float32))
    assert np.array_equal(DEPTH.pseudo_label({"depth": depth, "depth_std": std}, INFO), depth)
    with pytest.raises(ValueError, match="depth_std"):
        DEPTH.pseudo_label({"depth": depth}, INFO, max_rel_std=0.2)


def test_predict_writes_uncertainty_files_and_prints_the_cost(tiny_run: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from densemtl.cli import main

    cfg = load_config(tiny_run / "config.yaml")
    image = sorted((Path(cfg.data.root) / "val" / "images").iterdir())[0]
    files = predict_paths(tiny_run / "best.pt", [image], tmp_path / "p", device="cpu")[0]
    std = np.asarray(Image.open(files["depth_std"]))
    assert std.dtype == np.uint16 and std.max() > 0  # metres x 256, like the depth files
    assert np.asarray(Image.open(files["depth_std_color"])).shape[2] == 3
    rgb = np.asarray(Image.open(image))
    panel = np.asarray(Image.open(files["panel"]))
    assert panel.shape[1] == 4 * rgb.shape[1]  # RGB | semseg | depth | depth std
    assert main(["predict", "--checkpoint", str(tiny_run / "best.pt"), str(image), "--out", str(tmp_path / "q"),
                 "--device", "cpu", "--tta", "flip"]) == 0  # fmt: skip
    assert "2 forward passes per image" in capsys.readouterr().out
