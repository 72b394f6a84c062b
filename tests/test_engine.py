"""End-to-end: train, resume exactly, evaluate, predict, report, on the tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.config import load_config
from densemtl.evaluation import evaluate_checkpoint
from densemtl.train.engine import train
from helpers import records


def test_train_writes_checkpoints_logs_and_rebuilds_its_model(synthetic_root, tiny_run):
    from densemtl.inference import Predictor
    from densemtl.train.checkpoint import load_checkpoint

    run = tiny_run
    result = {"last": load_checkpoint(run / "last.pt")["metrics"]}
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    rec = records(run)[0]
    assert rec["epoch"] == 1 and np.isfinite(rec["loss/total"]) and rec["skipped_batches"] == 0
    assert 0.0 <= result["last"]["semseg/miou"] <= 1.0
    pred = Predictor.from_checkpoint(run / "best.pt").predict(
        np.asarray(Image.open(sorted((synthetic_root / "val" / "images").iterdir())[0]))
    )
    assert pred["semseg"].shape == (64, 128) and pred["semseg"].max() < 8
    assert pred["depth"].shape == (64, 128) and (pred["depth"] > 0).all()


def _train_cmd(tiny_overrides, root, run, epochs):
    sets = [a for s in tiny_overrides(root, run, epochs) for a in ("--set", s)]
    return [sys.executable, "-m", "densemtl", "train", *sets]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(synthetic_root, tmp_path, tiny_overrides):
    """Kill -9 mid-epoch, resume from last.pt: the completed epochs match an uninterrupted run exactly."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(
        _train_cmd(tiny_overrides, synthetic_root, full, 3), check=True, env=env, capture_output=True
    )

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(tiny_overrides, synthetic_root, killed, 3),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.5)  # now inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(records(killed))
    assert 1 <= done < 3, "the run must be killed before it finishes"

    subprocess.run(
        [sys.executable, "-m", "densemtl", "train", "--resume", str(killed / "last.pt")],
        check=True,
        env=env,
        capture_output=True,
    )
    a, b = records(full), records(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss/total", "val/semseg/miou", "val/depth/abs_rel", "val/depth/delta1"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["epoch"], key)
    steps_a, steps_b = records(full, "steps.jsonl"), records(killed, "steps.jsonl")
    assert [r["step"] for r in steps_b] == [r["step"] for r in steps_a]  # no step twice after the resume
    for ra, rb in zip(steps_a, steps_b, strict=True):
        assert ra["loss/total"] == pytest.approx(rb["loss/total"], rel=1e-5, abs=1e-6), ra["step"]


@pytest.mark.slow
def test_demo_scale_training_beats_trivial_baselines(synthetic_root, tmp_path, tiny_overrides):
    """About a minute of CPU training must clearly beat majority-class and constant-median-depth baselines."""
    from densemtl.evaluation import evaluate_checkpoint

    run = tmp_path / "learn"
    sets = tiny_overrides(synthetic_root, run, epochs=20) + [
        "model.backbone=mobilenet_v3_large",
        "model.decoder_channels=64",
        "train.lr=4e-3",
    ]
    train(load_config(None, sets))
    result = evaluate_checkpoint(run / "best.pt", split="val", out_dir=run / "eval")
    model, base = result["summary"], result["baseline_summary"]
    assert model["semseg/miou"] > 2.5 * base["semseg/miou"] and model["semseg/miou"] > 0.35, (model, base)
    assert model["semseg/pixel_acc"] > base["semseg/pixel_acc"] + 0.25
    assert model["depth/abs_rel"] < 0.6 * base["depth/abs_rel"], (model, base)
    assert model["depth/delta1"] > base["depth/delta1"] + 0.2
    for name in (
        "metrics.json",
        "metrics.md",
        "confusion.png",
        "depth_error_vs_distance.png",
        "depth_histogram.png",
    ):
        assert (run / "eval" / name).is_file(), name


def test_out_of_memory_stops_with_advice_and_keeps_the_last_checkpoint(
    synthetic_root, tmp_path, tiny_overrides, monkeypatch
):
    import densemtl.train.engine as engine

    run = tmp_path / "oom"
    calls = {"n": 0}
    real = engine.train_one_epoch

    def second_epoch_runs_out_of_memory(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", second_epoch_runs_out_of_memory)
    with pytest.raises(RuntimeError, match=r"out of memory .*batch 8.*lower the batch size.*last.pt"):
        train(load_config(None, tiny_overrides(synthetic_root, run, epochs=2)))
    from densemtl.train.checkpoint import load_checkpoint

    assert load_checkpoint(run / "last.pt")["epoch"] == 0  # epoch 1 survived


def test_resumed_run_log_drops_steps_after_the_checkpoint(tmp_path):
    """Steps the interrupted run logged after its last checkpoint (and a torn last line) are dropped on resume."""
    from densemtl.train.runlog import RunLog

    lines = [json.dumps({"step": s, "loss/total": float(s)}) for s in range(1, 6)]
    (tmp_path / "steps.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "loss/to')
    log = RunLog(tmp_path, resume_step=3)
    log.step({"loss/total": 40.0}, 4)
    log.close()
    steps = records(tmp_path, "steps.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and steps[-1]["loss/total"] == 40.0
    RunLog(tmp_path).close()  # a fresh RunLog without resume_step keeps what is there
    assert len((tmp_path / "steps.jsonl").read_text().splitlines()) == 4


def test_progressive_phases_train_then_evaluate_and_predict_at_the_last_scale(
    synthetic_root, tmp_path, tiny_overrides, monkeypatch
):
    """The demo's path: phases at 0.25 then 0.5 of the crop; the checkpoint records 0.5, and evaluation and
    prediction feed the network images at 0.5 (outputs come back at full resolution)."""
    import densemtl.evaluation as evaluation
    from densemtl.inference import Predictor
    from densemtl.train.checkpoint import input_scale, load_checkpoint

    run = tmp_path / "phases"
    phases = "[{scale: 0.25, epochs: 1, batch_size: 4, lr: 2e-3}, {scale: 0.5, epochs: 1, batch_size: 4, lr: 1e-3}]"
    sets = [
        *tiny_overrides(synthetic_root, run),
        f"train.phases={phases}",
        "data.max_samples=16",
        "train.device=cpu",
    ]
    train(load_config(None, sets))
    epochs = records(run)
    assert [(r["epoch"], r["phase"], r["scale"]) for r in epochs] == [(1, 0, 0.25), (2, 1, 0.5)]
    assert [r["skipped_batches"] for r in epochs] == [0, 0]
    assert all(np.isfinite(r["val/score"]) for r in epochs)
    last = load_checkpoint(run / "last.pt")
    assert last["input_scale"] == 0.5 and input_scale(last) == 0.5
    best = load_checkpoint(run / "best.pt")
    assert best["input_scale"] == epochs[best["epoch"]]["scale"]  # the scale of the epoch it was saved at

    scales = []
    real_forward = evaluation.forward_at_scale

    def spy(model, image, scale):
        scales.append((tuple(image.shape[-2:]), scale))
        return real_forward(model, image, scale)

    monkeypatch.setattr(evaluation, "forward_at_scale", spy)
    result = evaluate_checkpoint(run / "last.pt", split="val", out_dir=run / "eval", device="cpu")
    assert result["input_scale"] == 0.5 and result["num_images"] == 32
    assert len(scales) == 8 and set(scales) == {((64, 128), 0.5)}  # 32 images in batches of 4, all at 0.5
    assert 0.0 <= result["summary"]["semseg/miou"] <= 1.0 and np.isfinite(result["summary"]["depth/abs_rel"])

    predictor = Predictor.from_checkpoint(run / "last.pt", device="cpu")
    seen = []
    predictor.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    pred = predictor.predict(np.asarray(Image.open(sorted((synthetic_root / "val" / "images").iterdir())[0])))
    assert predictor.scale == 0.5 and seen == [(32, 64)]  # the 64x128 image at half size
    assert pred["semseg"].shape == (64, 128) and pred["depth"].shape == (64, 128)


class NaNOnCalls(torch.nn.Module):
    """Wraps a task loss: NaN (with NaN gradients) on the 1-based calls in ``bad``; records the other values."""

    def __init__(self, inner: torch.nn.Module, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.bad, self.calls, self.good = inner, bad, 0, []

    def forward(self, pred, target, sample_mask):
        self.calls += 1
        loss = self.inner(pred, target, sample_mask)
        if self.calls in self.bad:
            return loss * float("nan")
        self.good.append(float(loss.detach()))
        return loss


def _nan_run(n_batches: int, bad: set[int], max_nonfinite: int) -> SimpleNamespace:
    """A tiny model whose depth loss is NaN on the batches in ``bad``, and ``epoch()``: one ``train_one_epoch``
    over ``n_batches`` random batches with ``max_nonfinite``."""
    from densemtl.models import build_model
    from densemtl.train.engine import train_one_epoch
    from densemtl.train.losses import build_loss

    sets = ["model.backbone=mobilenet_v3_small", "model.decoder_channels=16", "model.num_classes=3"]
    cfg = load_config(None, [*sets, "train.device=cpu", "train.channels_last=false"])
    torch.manual_seed(0)
    model, loss_fn = build_model(cfg.model), build_loss(cfg)
    loss_fn.losses["depth"] = depth_loss = NaNOnCalls(loss_fn.losses["depth"], bad)
    batches = [
        {"image": torch.rand(2, 3, 32, 32), "semseg": torch.randint(0, 3, (2, 32, 32)),
         "depth": torch.rand(2, 1, 32, 32) * 10 + 1}
        for _ in range(n_batches)
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def epoch() -> dict[str, float]:
        device = torch.device("cpu")
        return train_one_epoch(
            model, loss_fn, batches, optimizer, scheduler, scaler, device, cfg, 0, max_nonfinite
        )

    return SimpleNamespace(
        model=model, scheduler=scheduler, depth_loss=depth_loss, before=before, epoch=epoch
    )


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step:UserWarning")  # the skipped 1st step
def test_non_finite_batches_are_skipped_counted_and_leave_the_weights_alone(caplog):
    run = _nan_run(1, bad={1}, max_nonfinite=2)
    stats = run.epoch()
    assert stats["skipped_batches"] == 1 and "non-finite loss or gradient, batch skipped" in caplog.text
    assert all(torch.equal(p, run.before[k]) for k, p in run.model.named_parameters())  # no optimiser step
    assert run.scheduler.last_epoch == 1  # the schedule still counts the skipped batch

    # 2 bad batches in a row, a good one, a bad one: never 3 in a row, so max_nonfinite=3 is not reached
    run = _nan_run(6, bad={2, 3, 5}, max_nonfinite=3)
    stats = run.epoch()
    assert stats["skipped_batches"] == 3 and run.scheduler.last_epoch == 6
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert stats["loss/depth"] == pytest.approx(sum(run.depth_loss.good) / 3)  # the mean over good batches
    assert np.isfinite(stats["loss/total"])


def test_max_nonfinite_consecutive_batches_stop_training_with_advice():
    from densemtl.train.engine import NonFiniteLossError

    run = _nan_run(5, bad={2, 3, 4}, max_nonfinite=3)
    advice = (
        r"3 consecutive non-finite batches in epoch 1: lower train.lr, check the data with "
        r"`densemtl data check`, or disable AMP \(train.amp=false\)"
    )
    with pytest.raises(NonFiniteLossError, match=advice):
        run.epoch()
    assert run.depth_loss.calls == 4  # it stopped at the third bad batch in a row, before batch 5


@pytest.mark.export
def test_onnxruntime_backend_predicts_like_torch(synthetic_root, tiny_run):
    """``Predictor.from_checkpoint(..., backend="onnxruntime")`` (formerly ``engine=``) matches the torch backend."""
    import inspect

    pytest.importorskip("onnxruntime")
    from densemtl.deploy.ort import OnnxModel
    from densemtl.inference import Predictor

    keyword = "backend" if "backend" in inspect.signature(Predictor.from_checkpoint).parameters else "engine"
    ort = Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu", **{keyword: "onnxruntime"})
    ref = Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu")
    assert isinstance(ort.model, OnnxModel) and ort.scale == ref.scale
    image = np.asarray(Image.open(sorted((synthetic_root / "val" / "images").iterdir())[0]))
    for rgb in (image, image[:48, :96]):  # the training size, and another one (dynamic axes)
        a, b = ref.predict(rgb), ort.predict(rgb)
        assert set(a) == set(b) == {"semseg", "confidence", "entropy", "depth", "depth_std"}
        assert a["semseg"].shape == b["semseg"].shape == rgb.shape[:2]
        assert (a["semseg"] == b["semseg"]).mean() >= 0.999
        assert np.abs(a["depth"] - b["depth"]).max() < 1e-3
        assert np.abs(a["depth_std"] - b["depth_std"]).max() < 1e-3  # the uncertainty comes through ONNX too
