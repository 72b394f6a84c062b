"""Asymmetric annotations: a dataset mixing seg-only and depth-only samples trains; teacher pseudo-labels."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from densemtl.config import ModelConfig, load_config, replace
from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset
from densemtl.data.pseudolabel import pseudolabel
from densemtl.train.engine import train
from densemtl.train.losses import build_loss
from helpers import records


def _make_mixed(src: Path, dst: Path, n_train: int = 64) -> Path:
    """Train split: even samples keep only semseg, odd samples only depth; val keeps both (for metrics)."""
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    shutil.copytree(src / "val", dst / "val", ignore=shutil.ignore_patterns("normals"))
    images = sorted((src / "train" / "images").iterdir())[:n_train]
    for i, image in enumerate(images):
        (dst / "train" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, dst / "train" / "images" / image.name)
        task = "semseg" if i % 2 == 0 else "depth"
        (dst / "train" / task).mkdir(exist_ok=True)
        shutil.copy(src / "train" / task / f"{image.stem}.png", dst / "train" / task / f"{image.stem}.png")
        if (src / "train" / "meta" / f"{image.stem}.json").is_file():
            (dst / "train" / "meta").mkdir(exist_ok=True)
            shutil.copy(src / "train" / "meta" / f"{image.stem}.json", dst / "train" / "meta")
    return dst


@pytest.fixture(scope="module")
def mixed_run(synthetic_root, tmp_path_factory, tiny_overrides) -> tuple[Path, Path]:
    root = _make_mixed(synthetic_root, tmp_path_factory.mktemp("mixed"))
    out = tmp_path_factory.mktemp("mixed_run")
    train(load_config(None, [*tiny_overrides(root, out, epochs=4), "train.batch_size=16"]))
    return root, out


def test_losses_skip_unlabelled_samples():
    loss_fn = build_loss(replace(load_config(), model=ModelConfig(tasks=("semseg", "depth"), num_classes=3)))
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    depth = (torch.rand(2, 1, 8, 8) + 0.5).requires_grad_()
    batch = {"semseg": torch.randint(0, 3, (2, 8, 8)), "depth": torch.rand(2, 1, 8, 8) + 1,
             "valid_tasks": {"semseg": torch.tensor([True, False]), "depth": torch.tensor([False, False])}}  # fmt: skip
    terms = loss_fn({"semseg": logits, "depth": depth}, batch)
    assert math.isfinite(terms["total"].item()) and terms["depth"].item() == 0.0
    terms["total"].backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0  # sample 1 has no semseg label
    assert depth.grad.abs().sum() == 0


@pytest.mark.slow
def test_mixed_dataset_trains_and_both_tasks_improve(mixed_run):
    root, out = mixed_run
    ds = FolderDataset(root, "train")
    flags = [ds[i]["valid_tasks"] for i in range(4)]
    assert flags == [{"semseg": True, "depth": False}, {"semseg": False, "depth": True}] * 2
    assert check_dataset(root).ok  # missing task files are allowed, not errors
    epochs = records(out)
    assert len(epochs) == 4
    for r in epochs:
        assert all(math.isfinite(v) for k, v in r.items() if k.startswith("loss/")), r
        assert r["skipped_batches"] == 0  # the key the engine logs; a missing key fails
    first, last = epochs[0], epochs[-1]
    assert last["val/semseg/miou"] > first["val/semseg/miou"]
    assert last["val/depth/abs_rel"] < first["val/depth/abs_rel"]


@pytest.mark.slow
def test_pseudolabel_fills_only_missing_depth(mixed_run, tmp_path):
    root, out = mixed_run
    data = tmp_path / "data"
    shutil.copytree(root, data)
    real_depth = sorted(p.name for p in (data / "train" / "depth").iterdir())
    before = {n: (data / "train" / "depth" / n).read_bytes() for n in real_depth}
    result = pseudolabel(out / "best.pt", data, task="depth", splits=["train"], device="cpu")
    assert result["filled"] == {"train": 32} and result["kept"] == {"train": 32}
    assert all(
        (data / "train" / "depth" / n).read_bytes() == b for n, b in before.items()
    )  # real GT untouched
    ds = FolderDataset(data, "train")
    assert all(ds[i]["valid_tasks"]["depth"] for i in range(4))
    d = ds[0]["depth"][0].numpy()  # a pseudo-labelled sample: metres from the teacher
    assert np.isfinite(d).all() and d.min() > 0 and d.max() <= 80.0
    meta = json.loads((data / "train" / "meta" / f"{ds.ids[0]}.json").read_text())
    assert meta["pseudo"] == {"depth": "best.pt"} and "intrinsics" in meta  # merged into the existing meta
    assert "pseudo" not in json.loads((data / "train" / "meta" / f"{ds.ids[1]}.json").read_text())
    assert json.loads((data / "dataset.json").read_text())["pseudo_labels"]["depth"] == {
        "teacher": "best.pt",
        "count": 32,
    }
    assert check_dataset(data).ok
