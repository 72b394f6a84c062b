"""``densemtl pseudolabel``: fill a task's missing targets with a teacher network's predictions (distillation).

Typical use: a dataset with segmentation labels but no depth gets depth from a stronger teacher (a stereo or
large monocular network exported to ONNX, or a densemtl checkpoint). Only samples *without* a file for the
task are filled; real labels are never overwritten. Every filled sample is marked as pseudo in its
``meta/<id>.json`` (``"pseudo": {"depth": "<teacher file>"}``) and ``dataset.json`` records
``"pseudo_labels": {task: {"teacher", "count"}}``, so a later run or a reader can tell teacher labels from
ground truth (and re-run the teacher by deleting those files).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densemtl.data.folder import list_images, meta_path, task_path
from densemtl.data.format import DEPTH_MAX_ENCODABLE, atomic_write_bytes, encode_depth, read_dataset_json
from densemtl.tasks import IGNORE_INDEX


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_teacher(teacher: str | Path, device: str = "auto", size: tuple[int, int] | None = None):
    """A ``Predictor`` for a densemtl ``.pt`` checkpoint or an exported ``.onnx`` file."""
    from densemtl.inference import Predictor

    teacher = Path(teacher)
    if not teacher.is_file():
        raise FileNotFoundError(
            f"teacher {teacher} not found; pass a densemtl .pt checkpoint or an exported .onnx"
        )
    if teacher.suffix.lower() == ".onnx":
        return Predictor.from_onnx(teacher, size=size)
    return Predictor.from_checkpoint(teacher, device=device, size=size)


def _target(pred: dict[str, np.ndarray], task: str, depth_max: float, min_confidence: float) -> np.ndarray:
    """The file content for ``task`` from one prediction: uint16 depth PNG values or uint8 class ids."""
    if task == "depth":
        depth = np.clip(pred["depth"], 0.0, min(depth_max, DEPTH_MAX_ENCODABLE))  # (H, W) metres
        return encode_depth(depth)
    ids = pred["semseg"].copy()  # (H, W) uint8
    if min_confidence > 0:
        ids[pred["confidence"] < min_confidence] = IGNORE_INDEX  # unsure pixels stay unlabelled
    return ids


def _mark(path: Path, task: str, teacher: str) -> None:
    """Add ``"pseudo": {task: teacher}`` to a sample's meta JSON, keeping what is there."""
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.setdefault("pseudo", {})[task] = teacher
    atomic_write_bytes(path, (json.dumps(meta) + "\n").encode())


def _check_teacher(predictor: Any, info: dict[str, Any], task: str) -> None:
    if task == "semseg" and predictor.class_names and predictor.class_names != list(info["classes"]):
        raise ValueError(
            f"the teacher predicts classes {predictor.class_names[:5]}... but the dataset has "
            f"{list(info['classes'])[:5]}...; semseg pseudo-labels need the same class list"
        )


def pseudolabel(
    teacher: str | Path,
    data_root: str | Path,
    task: str = "depth",
    splits: list[str] | None = None,
    min_confidence: float = 0.0,
    device: str = "auto",
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write ``task`` targets predicted by ``teacher`` for every sample of ``data_root`` that lacks one.

    Args:
        teacher: densemtl checkpoint (.pt) or ONNX export (.onnx) that predicts ``task``.
        data_root: folder-format dataset, modified in place.
        task: "depth" (metres, clipped to dataset.json's depth max) or "semseg".
        splits: splits to fill (default: every split listed in dataset.json that exists on disk).
        min_confidence: semseg only; pixels whose softmax maximum is below it are written as 255 (ignore).
        device, size: passed to the ``Predictor`` (``size`` = fixed network input (H, W)).

    Returns:
        ``{"task", "teacher", "filled": {split: n}, "kept": {split: n}}``.
    """
    if task not in ("depth", "semseg"):
        raise ValueError(f"pseudolabel task must be 'depth' or 'semseg', got {task!r}")
    root = Path(data_root)
    info = read_dataset_json(root)
    predictor = load_teacher(teacher, device, size)
    _check_teacher(predictor, info, task)
    splits = splits or [s for s in info.get("splits", []) if (root / s / "images").is_dir()]
    filled: dict[str, int] = {}
    kept: dict[str, int] = {}
    for split in splits:
        filled[split] = kept[split] = 0
        for image_path in list_images(root / split):
            out = task_path(image_path, task)
            if out.is_file():
                kept[split] += 1
                continue
            pred = predictor.predict(image_path)
            if task not in pred:
                raise ValueError(f"teacher {teacher} does not predict {task!r} (it gives {sorted(pred)})")
            atomic_write_bytes(out, _png(_target(pred, task, float(info["depth"]["max"]), min_confidence)))
            _mark(meta_path(image_path), task, Path(teacher).name)
            filled[split] += 1
    _record(root, task, Path(teacher).name, sum(filled.values()))
    return {"task": task, "teacher": str(teacher), "filled": filled, "kept": kept}


def _record(root: Path, task: str, teacher: str, count: int) -> None:
    """Note the pseudo-labels in dataset.json (raw JSON rewritten with every other key unchanged)."""
    path = root / "dataset.json"
    info = json.loads(path.read_text())
    if task not in info.get("tasks", []):
        info["tasks"] = [*info.get("tasks", []), task]
    entry = info.setdefault("pseudo_labels", {}).setdefault(task, {"teacher": teacher, "count": 0})
    entry["teacher"], entry["count"] = teacher, int(entry.get("count", 0)) + count
    atomic_write_bytes(path, (json.dumps(info, indent=2) + "\n").encode())
