"""Shared fixtures: a tiny synthetic dataset rendered once per test session, and small model settings.

Helper functions shared by several test files live in tests/helpers.py (``from helpers import ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tiny settings so a full train/evaluate cycle takes seconds on 2 CPU cores.
TINY_SIZE = (64, 128)

if str(REPO / "tests") not in sys.path:  # `from helpers import ...` also under --import-mode=importlib
    sys.path.insert(0, str(REPO / "tests"))


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """96 training and 32 validation synthetic street scenes at 64x128."""
    from densemtl.synth.generate import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, n_train=96, n_val=32, size=TINY_SIZE, seed=0, workers=1, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_overrides():
    """A function giving ``--set`` strings for a seconds-long training run on ``root``."""
    return _tiny_overrides


def _tiny_overrides(root: Path, out_dir: Path, epochs: int = 2) -> list[str]:
    return [
        f"data.root={root}",
        f"train.out_dir={out_dir}",
        f"train.epochs={epochs}",
        "train.batch_size=8",
        "train.lr=3e-3",
        "data.crop=[64, 128]",
        "data.num_workers=0",
        "model.decoder_channels=32",
        "model.backbone=mobilenet_v3_small",
        "train.log_every=1",
    ]


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory) -> Path:
    """A run folder with a one-epoch checkpoint of a tiny model on the tiny synthetic dataset."""
    from densemtl.config import load_config
    from densemtl.train.engine import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(load_config(None, _tiny_overrides(synthetic_root, run, epochs=1)))
    return run
