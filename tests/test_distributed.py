"""DistributedDataParallel with torchrun: 2 CPU processes (gloo) on tiny data.

The 2-process run's validation metrics equal a 1-process evaluation of its checkpoint over the same samples
(uneven, unpadded shards), its loss goes down, and its checkpoint resumes in one process. The sampler and
reduction helpers are also checked without a process group.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from densemtl.train.distributed import DistEnv, ShardSampler, env_from_environ, mean_over_ranks, wrap_model
from helpers import records


def test_one_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env_from_environ() == DistEnv(0, 1, 0) and DistEnv().is_main and not DistEnv().enabled
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, torch.device("cpu"), sync_bn=True) is model
    assert mean_over_ranks({"loss/total": 2.0}) == {"loss/total": 2.0}


def test_shards_cover_every_sample_once_without_padding() -> None:
    data = list(range(11))
    shards = [list(ShardSampler(data, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data and [len(s) for s in shards] == [4, 4, 3]


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_resume_in_one(synthetic_root, tmp_path, tiny_overrides) -> None:
    from densemtl.metrics import build_metrics, summarize
    from densemtl.train.checkpoint import config_from_checkpoint, load_checkpoint, model_from_checkpoint
    from densemtl.train.engine import build_dataset, config_for_resume, evaluate, make_loader, train

    run = tmp_path / "ddp"
    # 31 samples per split: uneven validation shards (16 + 15); 15 training samples per rank = 3 batches of 4.
    sets = tiny_overrides(synthetic_root, run, epochs=2) + [
        "data.max_samples=31",
        "train.batch_size=4",
        "train.device=cpu",
        "train.lr=2e-3",
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "densemtl",
        "train",
        *[a for s in sets for a in ("--set", s)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("epoch 2/2") == 1, "only rank 0 prints"
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[1]["loss/total"] < recs[0]["loss/total"]

    # One process, same checkpoint, same 31 validation samples: identical dataset-level metrics.
    ckpt = load_checkpoint(run / "last.pt")
    cfg = config_from_checkpoint(ckpt)
    model = model_from_checkpoint(ckpt)
    val = make_loader(build_dataset(cfg, "val", False), 4, False, 0, 0, torch.device("cpu"))
    metrics = build_metrics(cfg, ckpt["dataset"])
    single = summarize(evaluate(model, val, metrics, torch.device("cpu")))
    for key in ("semseg/miou", "semseg/pixel_acc", "depth/abs_rel", "depth/rmse", "depth/delta1"):
        assert recs[1][f"val/{key}"] == pytest.approx(single[key], rel=1e-5, abs=1e-6), key

    # The 2-process checkpoint resumes in this single process and continues at epoch 3.
    train(config_for_resume(run / "last.pt", ["train.epochs=3"]), resume=run / "last.pt")
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
