"""Read a dataset in the densemtl folder format (see ``densemtl.data.format`` and docs/folder_format.md).

``FolderDataset`` returns one dict per sample: the RGB image, one target per requested task (all-ignore or
all-invalid when that sample has no file for the task, flagged in ``valid_tasks``), camera intrinsics and the
sample id. Every file is checked as it is read (size, bit depth, class ids, truncation) by the small
``load_*`` functions below; ``validate_sample`` runs the same checks and collects the messages instead of
raising, for a dataset checker. Each error names the offending file and says how to fix it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

from densemtl.config import ModelConfig
from densemtl.data.format import (
    IMAGE_EXTS,
    DatasetFormatError,
    jpeg_bytes,
    open_image,
    png_bytes,
    read_dataset_json,
)
from densemtl.fileio import atomic_write
from densemtl.tasks import TASKS, check_tasks, get_task

Sample = dict[str, Any]


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3): EXIF orientation applied, grayscale/RGBA/palette converted to RGB."""
    img = open_image(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:  # malformed EXIF block
        raise DatasetFormatError(f"{path}: unreadable EXIF data ({e}); re-save the image without EXIF") from e
    return np.array(img.convert("RGB"))  # writable copy for torch.from_numpy


def load_intrinsics(path: Path) -> np.ndarray | None:
    """[fx, fy, cx, cy] float32 from a meta JSON, or None when the file or its intrinsics are absent."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: meta file is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise DatasetFormatError(
            f'{path}: meta must be a JSON object like {{"intrinsics": [fx, fy, cx, cy]}}'
        )
    k = meta.get("intrinsics")
    if k is None:
        return None
    ok = isinstance(k, list) and len(k) == 4 and all(isinstance(v, int | float) for v in k)
    if not ok or not np.all(np.isfinite(k)) or k[0] <= 0 or k[1] <= 0:
        raise DatasetFormatError(
            f"{path}: 'intrinsics' must be four numbers [fx, fy, cx, cy] in pixels with fx, fy > 0, got {k!r}"
        )
    return np.asarray(k, dtype=np.float32)


def task_path(image_path: Path, task: str) -> Path:
    """``<split>/<task folder>/<id>.png`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / get_task(task).folder / f"{image_path.stem}.png"


def meta_path(image_path: Path) -> Path:
    """``<split>/meta/<id>.json`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / "meta" / f"{image_path.stem}.json"


def read_sample(image_path: Path, info: dict[str, Any], tasks: tuple[str, ...]) -> dict[str, Any]:
    """Load and check one sample's files as numpy arrays; a task whose file is absent maps to None."""
    image = load_image(image_path)
    size = image.shape[:2]
    out: dict[str, Any] = {"image": image}
    for task in tasks:
        path = task_path(image_path, task)
        out[task] = TASKS[task].load(path, size, info) if path.is_file() else None
    out["intrinsics"] = load_intrinsics(meta_path(image_path))
    return out


def validate_sample(
    image_path: Path, info: dict[str, Any], tasks: tuple[str, ...] | None = None
) -> list[str]:
    """Every problem with one sample's files as messages (empty when the sample is fine); never raises."""
    try:
        size = load_image(image_path).shape[:2]
    except DatasetFormatError as e:
        return [str(e)]
    checks: list[Callable[[], object]] = [lambda: load_intrinsics(meta_path(image_path))]
    for task in tasks if tasks is not None else dataset_tasks(info):
        path = task_path(image_path, task)
        if path.is_file():
            checks.append(lambda t=TASKS[task], p=path: t.load(p, size, info))
    errors = []
    for check in checks:
        try:
            check()
        except DatasetFormatError as e:
            errors.append(str(e))
    return errors


def dataset_tasks(info: dict[str, Any]) -> tuple[str, ...]:
    """The tasks a dataset.json lists that densemtl knows, in the order of :data:`densemtl.tasks.TASKS`."""
    return tuple(t for t in TASKS if t in info.get("tasks", []))


def list_images(split_dir: Path) -> list[Path]:
    """Image files of a split sorted by id; raises when the split is missing, empty or has duplicate ids."""
    img_dir = split_dir / "images"
    if not img_dir.is_dir():
        raise DatasetFormatError(
            f"{img_dir} not found: split '{split_dir.name}' needs an images/ folder (see docs/folder_format.md); "
            "check the split name and the dataset root"
        )
    paths = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=lambda p: p.stem)
    if not paths:
        raise DatasetFormatError(
            f"{img_dir} contains no .png/.jpg/.jpeg images; add images or pick another split"
        )
    counts = Counter(p.stem for p in paths)  # linear: KITTI splits hold ~86k images
    dupes = sorted(s for s, n in counts.items() if n > 1)
    if dupes:
        raise DatasetFormatError(f"{img_dir}: ids {dupes[:5]} have several image files; keep one per id")
    return paths


class FolderDataset(Dataset):
    """Samples of one split of a folder-format dataset, as dicts of tensors ready for joint transforms.

    Args:
        root: dataset root (holds dataset.json).
        split: sub-folder name, e.g. "train" or "val".
        transform: callable taking and returning the sample dict (``build_transforms``); None = raw.
        tasks: targets to load (task names); default: the default model's (``ModelConfig().tasks``).
        max_samples: keep the first N samples by id (0 = all).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Sample], Sample] | None = None,
        tasks: tuple[str, ...] | list[str] | None = None,
        max_samples: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.info: dict[str, Any] = read_dataset_json(self.root)
        self.tasks = check_tasks(tuple(tasks) if tasks is not None else ModelConfig().tasks)
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetFormatError(
                f"{split_dir} not found: no split '{split}' in {self.root} (dataset.json lists splits "
                f"{self.info.get('splits', '?')}); pass an existing split"
            )
        self.image_paths = list_images(split_dir)
        if max_samples > 0:
            self.image_paths = self.image_paths[:max_samples]

    @property
    def class_names(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def palette(self) -> list[list[int]]:
        return [list(c) for c in self.info["palette"]]

    @property
    def num_classes(self) -> int:
        return len(self.info["classes"])

    @property
    def ids(self) -> list[str]:
        return [p.stem for p in self.image_paths]

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.image_paths[index]
        raw = read_sample(path, self.info, self.tasks)
        h, w = raw["image"].shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(raw["image"])).permute(2, 0, 1).float().div_(255.0)
        sample: Sample = {"image": tv_tensors.Image(image)}  # (3, H, W) in [0, 1]
        valid: dict[str, bool] = {}
        for task in self.tasks:
            valid[task] = raw[task] is not None
            sample[task] = tv_tensors.Mask(TASKS[task].to_tensor(raw[task], (h, w)).contiguous())
        sample["valid_tasks"] = valid
        k = raw["intrinsics"]
        sample["intrinsics"] = torch.from_numpy(k) if k is not None else torch.zeros(4)
        sample["has_intrinsics"] = k is not None
        sample["id"] = path.stem
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"FolderDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, tasks={self.tasks})"
        )


def write_sample(
    root: str | Path,
    split: str,
    sample_id: str,
    image: np.ndarray,
    meta: dict[str, Any] | None = None,
    image_format: str = "png",
    **targets: np.ndarray | None,
) -> None:
    """Write one sample: the image (H, W, 3) uint8 and any task targets by name, e.g. ``semseg=`` (H, W) class
    ids, ``depth=`` (H, W) metres, ``normals=`` (H, W, 3) unit vectors (None = no file for that task).

    Every array is checked and encoded (``Task.encode``) before anything is written, so a bad target never
    leaves half a sample behind. ``image_format`` is "png" (lossless) or "jpg" (quality 95: ~20x faster to
    encode and ~4x smaller for noisy images). Targets are always lossless PNG.
    """
    base = Path(root) / split
    h, w = image.shape[:2]
    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    files: dict[Path, bytes] = {}
    for name, arr in targets.items():
        if arr is None:
            continue
        task = get_task(name)
        if np.shape(arr)[:2] != (h, w):
            raise ValueError(f"{split}/{sample_id}: {name} is {np.shape(arr)[:2]} but the image is {(h, w)}")
        files[base / task.folder / f"{sample_id}.png"] = png_bytes(task.encode(arr))
    image = np.ascontiguousarray(image, np.uint8)
    ext = "png" if image_format == "png" else "jpg"
    encoded = png_bytes(image) if ext == "png" else jpeg_bytes(image)
    files = {base / "images" / f"{sample_id}.{ext}": encoded, **files}
    if meta is not None:
        files[base / "meta" / f"{sample_id}.json"] = (json.dumps(meta) + "\n").encode()
    for path, data in files.items():
        atomic_write(path, data)
