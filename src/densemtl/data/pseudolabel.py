"""``densemtl pseudolabel``: fill a task's missing targets with a teacher network's predictions (distillation).

Typical use: a dataset with segmentation labels but no depth gets depth from a stronger teacher (a stereo or
large monocular network exported to ONNX, or a densemtl checkpoint). Any task works: the teacher's prediction
becomes a target through the task's own ``pseudo_label`` and ``encode`` and is written into its ``folder``.
Only samples *without* a file for the task are filled; real labels are never overwritten. Every filled sample
is marked as pseudo in its ``meta/<id>.json`` (``"pseudo": {"depth": "<teacher file>"}``) and
``dataset.json`` records ``"pseudo_labels": {task: {"teacher", "count"}}``, so a later run or a reader can
tell teacher labels from ground truth (and re-run the teacher by deleting those files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densemtl.data.folder import list_images, meta_path, task_path
from densemtl.data.format import DatasetFormatError, png_bytes, read_dataset_json
from densemtl.data.progress import track
from densemtl.fileio import atomic_write
from densemtl.tasks import Task, get_task
from densemtl.tasks.depth import DEPTH


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


def _mark(path: Path, task: str, teacher: str) -> None:
    """Add ``"pseudo": {task: teacher}`` to a sample's meta JSON, keeping what is there."""
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"{path}: meta file is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{path}: meta must be a JSON object; fix or delete it")
    meta.setdefault("pseudo", {})[task] = teacher
    atomic_write(path, (json.dumps(meta) + "\n").encode())


def _check_teacher(predictor: Any, info: dict[str, Any], task: Task, teacher: str | Path) -> None:
    """The teacher must predict ``task`` and, for a task that depends on the class list, use the dataset's."""
    if task.name not in predictor.tasks:
        raise ValueError(
            f"teacher {teacher} does not predict {task.name!r} (it predicts {list(predictor.tasks)})"
        )
    if task.uses_classes and predictor.class_names and predictor.class_names != list(info["classes"]):
        raise ValueError(
            f"the teacher predicts classes {predictor.class_names[:5]}... but the dataset has "
            f"{list(info['classes'])[:5]}...; {task.name} pseudo-labels need the same class list"
        )


def pseudolabel(
    teacher: str | Path,
    data_root: str | Path,
    task: str = DEPTH.name,
    splits: list[str] | None = None,
    min_confidence: float = 0.0,
    max_rel_std: float = 0.0,
    device: str = "auto",
    size: tuple[int, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``task`` targets predicted by ``teacher`` for every sample of ``data_root`` that lacks one.

    Args:
        teacher: densemtl checkpoint (.pt) or ONNX export (.onnx) that predicts ``task``.
        data_root: folder-format dataset, modified in place.
        task: any task name of ``densemtl.tasks.TASKS`` (default depth: metres, clipped to dataset.json's
            depth max); its ``pseudo_label`` turns the prediction into a target.
        splits: splits to fill (default: every split listed in dataset.json that exists on disk).
        min_confidence: for tasks whose ``pseudo_label`` uses it (semseg: pixels whose softmax maximum is
            below it are written as 255, ignore); the others ignore it.
        max_rel_std: for tasks with a predicted std (depth: pixels whose std exceeds this fraction of the depth
            are written as 0, invalid; the teacher must predict ``depth_std``); 0 keeps every pixel.
        device, size: passed to the ``Predictor`` (``size`` = fixed network input (H, W)).
        progress: report the images done on stderr (``densemtl.data.progress.track``).

    Returns:
        ``{"task", "teacher", "filled": {split: n}, "kept": {split: n}}``.
    """
    t = get_task(task)
    root = Path(data_root)
    info = read_dataset_json(root)
    predictor = load_teacher(teacher, device, size)
    _check_teacher(predictor, info, t, teacher)
    splits = splits or [s for s in info.get("splits", []) if (root / s / "images").is_dir()]
    filled: dict[str, int] = {}
    kept: dict[str, int] = {}
    for split in splits:
        filled[split] = kept[split] = 0
        for image_path in track(
            list_images(root / split), f"pseudolabel {split}", enabled=progress, unit="img"
        ):
            out = task_path(image_path, t.name)
            if out.is_file():
                kept[split] += 1
                continue
            unsure = {"max_rel_std": max_rel_std} if max_rel_std > 0 else {}  # older plug-ins lack the keyword
            target = t.pseudo_label(predictor.predict(image_path), info, min_confidence, **unsure)
            atomic_write(out, png_bytes(t.encode(target)))
            _mark(meta_path(image_path), t.name, Path(teacher).name)
            filled[split] += 1
    _record(root, t.name, Path(teacher).name, sum(filled.values()))
    return {"task": t.name, "teacher": str(teacher), "filled": filled, "kept": kept}


def _record(root: Path, task: str, teacher: str, count: int) -> None:
    """Note the pseudo-labels in dataset.json (raw JSON rewritten with every other key unchanged)."""
    path = root / "dataset.json"
    info = json.loads(path.read_text())
    if task not in info.get("tasks", []):
        info["tasks"] = [*info.get("tasks", []), task]
    entry = info.setdefault("pseudo_labels", {}).setdefault(task, {"teacher": teacher, "count": 0})
    entry["teacher"], entry["count"] = teacher, int(entry.get("count", 0)) + count
    atomic_write(path, (json.dumps(info, indent=2) + "\n").encode())
