"""End-to-end: train, resume exactly, evaluate, predict, report, on the tiny synthetic dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.config import load_config
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
        np.asarray(Image.open(sorted((synthetic_root / "val" / "images").iterdir())[0])))
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
    subprocess.run(_train_cmd(tiny_overrides, synthetic_root, full, 3), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_overrides, synthetic_root, killed, 3), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.5)  # now inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(records(killed))
    assert 1 <= done < 3, "the run must be killed before it finishes"

    subprocess.run([sys.executable, "-m", "densemtl", "train", "--resume", str(killed / "last.pt")], check=True,
                   env=env, capture_output=True)
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
    sets = tiny_overrides(synthetic_root, run, epochs=20) + ["model.backbone=mobilenet_v3_large",
                                                             "model.decoder_channels=64", "train.lr=4e-3"]
    train(load_config(None, sets))
    result = evaluate_checkpoint(run / "best.pt", split="val", out_dir=run / "eval")
    model, base = result["summary"], result["baseline_summary"]
    assert model["semseg/miou"] > 2.5 * base["semseg/miou"] and model["semseg/miou"] > 0.35, (model, base)
    assert model["semseg/pixel_acc"] > base["semseg/pixel_acc"] + 0.25
    assert model["depth/abs_rel"] < 0.6 * base["depth/abs_rel"], (model, base)
    assert model["depth/delta1"] > base["depth/delta1"] + 0.2
    for name in ("metrics.json", "metrics.md", "confusion.png", "depth_error_vs_distance.png",
                 "depth_histogram.png"):
        assert (run / "eval" / name).is_file(), name


def test_out_of_memory_stops_with_advice_and_keeps_the_last_checkpoint(synthetic_root, tmp_path, tiny_overrides,
                                                                       monkeypatch):
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
