"""Helpers shared by the tests: a tiny folder-format dataset written through the public writers, run logs.

Import them as ``from helpers import ...`` (tests/conftest.py puts this folder on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from densemtl.data.folder import write_sample
from densemtl.data.format import write_dataset_json

CLASSES = ["road", "car", "sky"]
PALETTE = [[128, 64, 128], [0, 0, 142], [70, 130, 180]]


def make_dataset(
    root: Path,
    n: int = 2,
    splits: tuple[str, ...] = ("train",),
    size: tuple[int, int] = (24, 32),
    seed: int = 0,
    label_ids: int = len(CLASSES),
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """A tiny valid dataset: ``n`` samples ``s000, s001, ...`` per split with every built-in task and intrinsics.

    Each sample is random: an RGB image, labels drawn from ``0..label_ids - 1`` (fewer than ``len(CLASSES)``
    leaves the last classes absent) with 5 ignore (255) pixels, depth in 0.5..80 m with 3 invalid (0) pixels,
    unit normals, and intrinsics ``[30 + i, 31, (W - 1) / 2, (H - 1) / 2]`` (fx differs per sample so that a
    mix-up shows). ``size`` is (H, W), at least (2, 5).

    Returns:
        ``{(split, id): {"image", "semseg", "depth", "normals"}}``, the arrays that were written.
    """
    write_dataset_json(
        root,
        name="tiny",
        tasks=["semseg", "depth", "normals"],
        classes=CLASSES,
        palette=PALETTE,
        splits=list(splits),
        depth_max=80.0,
    )
    rng = np.random.default_rng(seed)
    h, w = size
    written = {}
    for split in splits:
        for i in range(n):
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            semseg = rng.integers(0, label_ids, (h, w)).astype(np.uint8)
            semseg[0, :5] = 255
            depth = rng.uniform(0.5, 80.0, (h, w)).astype(np.float32)
            depth[1, :3] = 0.0
            normals = rng.normal(size=(h, w, 3)).astype(np.float32)
            normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
            meta = {"intrinsics": [30.0 + i, 31.0, (w - 1) / 2, (h - 1) / 2]}
            sid = f"s{i:03d}"
            write_sample(root, split, sid, image, meta, semseg=semseg, depth=depth, normals=normals)
            written[split, sid] = {"image": image, "semseg": semseg, "depth": depth, "normals": normals}
    return written


def records(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The JSON lines a training run wrote: ``metrics.jsonl`` (one per epoch) or ``steps.jsonl``."""
    return [json.loads(line) for line in (run / name).read_text().splitlines()]
