"""Read a dataset in the densemtl folder format (see ``densemtl.data.format`` and docs/folder_format.md).

``FolderDataset`` returns one dict per sample: the RGB image, one target per requested task (all-ignore or
all-invalid when that sample has no file for the task, flagged in ``valid_tasks``), camera intrinsics and the
sample id. Every file is checked as it is read (size, bit depth, class ids, truncation) by :func:`read_sample`,
the one reader behind both training and ``densemtl data check``: it raises at the first bad file, or collects
every problem when given a list. ``write_sample`` runs the same checks before it writes anything. Each error
names the offending file and says how to fix it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
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
    check_name,
    image_to_uint8,
    jpeg_bytes,
    open_image,
    png_bytes,
    read_dataset_json,
    rgb_array,
)
from densemtl.fileio import atomic_write
from densemtl.tasks import TASKS, Task, check_tasks, get_task

Sample = dict[str, Any]
Problem = tuple[Path, str, str]  # (file, what: "image" | a task name | "meta", message naming file and fix)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3): EXIF orientation applied, grayscale/RGBA/palette converted to RGB, 16-bit
    grayscale scaled to 8 bits (see ``densemtl.data.format.rgb_array``)."""
    img = open_image(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:  # malformed EXIF block
        raise DatasetFormatError(f"{path}: unreadable EXIF data ({e}); re-save the image without EXIF") from e
    return rgb_array(img, path)


def load_intrinsics(path: Path) -> np.ndarray | None:
    """[fx, fy, cx, cy] float32 from a meta JSON, or None when the file or its intrinsics are absent."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: meta file is not valid JSON ({e}); fix or delete it") from e
    return check_meta(meta, path)


def check_meta(meta: Any, path: Path) -> np.ndarray | None:
    """Check a sample's meta (parsed JSON) for file ``path``; its intrinsics as float32, or None without."""
    if not isinstance(meta, dict):
        raise DatasetFormatError(
            f'{path}: meta must be a JSON object like {{"intrinsics": [fx, fy, cx, cy]}}'
        )
    k = meta.get("intrinsics")
    if k is None:
        return None
    ok = isinstance(k, list) and len(k) == 4
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in k)
    if not ok or not np.all(np.isfinite(k)) or k[0] <= 0 or k[1] <= 0:
        raise DatasetFormatError(
            f"{path}: 'intrinsics' must be four numbers [fx, fy, cx, cy] in pixels with fx, fy > 0, got {k!r}"
        )
    return np.asarray(k, dtype=np.float32)


def task_path(image_path: Path, task: str) -> Path:
    """``<split>/<task folder>/<id><suffix>`` (``.png``; objects ``.json``) for the sample whose image is
    ``image_path``."""
    t = get_task(task)
    return image_path.parent.parent / t.folder / f"{image_path.stem}{t.suffix}"


def meta_path(image_path: Path) -> Path:
    """``<split>/meta/<id>.json`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / "meta" / f"{image_path.stem}.json"


def read_sample(
    image_path: Path, info: dict[str, Any], tasks: tuple[str, ...], problems: list[Problem] | None = None
) -> dict[str, Any]:
    """Load and check one sample's files as numpy arrays: ``image``, each of ``tasks``, ``intrinsics``.

    A task whose file is absent maps to None. This is the one reader behind ``FolderDataset`` and
    ``densemtl data check``, so both accept exactly the same files. With ``problems=None`` the first bad file
    raises :class:`DatasetFormatError`; given a list, each bad file's ``(path, what, message)`` is appended,
    its entry is None and reading goes on (after an unreadable image only ``image`` = None is returned: the
    targets cannot be checked against its size).
    """

    def attempt(path: Path, what: str, load: Callable[[], Any]) -> Any:
        if problems is None:
            return load()
        try:
            return load()
        except DatasetFormatError as e:
            problems.append((path, what, str(e)))
            return None

    image = attempt(image_path, "image", lambda: load_image(image_path))
    out: dict[str, Any] = {"image": image}
    if image is None:
        return out
    size = image.shape[:2]
    for task in tasks:
        path = task_path(image_path, task)
        load = partial(TASKS[task].load, path, size, info)
        out[task] = attempt(path, task, load) if path.is_file() else None
    meta = meta_path(image_path)
    out["intrinsics"] = attempt(meta, "meta", lambda: load_intrinsics(meta))
    return out


def validate_sample(
    image_path: Path, info: dict[str, Any], tasks: tuple[str, ...] | None = None
) -> list[str]:
    """Every problem with one sample's files as messages (empty when the sample is fine); never raises."""
    problems: list[Problem] = []
    read_sample(image_path, info, tasks if tasks is not None else dataset_tasks(info), problems)
    return [message for _, _, message in problems]


def dataset_tasks(info: dict[str, Any]) -> tuple[str, ...]:
    """The tasks dataset.json ``info`` has data for (``Task.available``: those it lists; objects when it has
    ``object_classes``), in the order of :data:`densemtl.tasks.TASKS`."""
    return tuple(t for t, task in TASKS.items() if task.available(info))


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
            sample[task] = TASKS[task].to_sample(raw[task], (h, w))  # a tv_tensor (or a dict of them)
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
    fsync: bool = True,
    **targets: np.ndarray | None,
) -> None:
    """Write one sample: the image and any task targets by name, e.g. ``semseg=`` (H, W) class ids,
    ``depth=`` (H, W) metres, ``normals=`` (H, W, 3) unit vectors (None = no file for that task).

    Every array is checked and encoded before anything is written, so a bad one never leaves half a sample
    behind: ``split`` and ``sample_id`` must be plain file names; the image is uint8 (H, W, 3) RGB or (H, W)
    grayscale, or float in [0, 1] (scaled by 255); each target goes through its task's ``encode`` (shape,
    dtype, range, finite) and, when ``root`` already has a dataset.json, ``check_target`` (e.g. label ids
    within its classes) and must have the image's size; ``meta`` must be JSON with valid intrinsics. Errors
    are :class:`DatasetFormatError` naming the file and the fix. ``image_format`` is "png" (lossless) or "jpg"
    (quality 95: ~20x faster to encode and ~4x smaller for noisy images). Targets are always lossless PNG.
    The image is written last: a sample exists once its image does. Each file is flushed to disk (fsync)
    unless ``fsync=False``: bulk writers pass that and finish with ``write_dataset_json``, which syncs them all
    at once before it marks the dataset complete.
    """
    base = Path(root) / check_name(split, "split")
    check_name(sample_id, "sample id")
    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    ext = "png" if image_format == "png" else "jpg"
    image_file = base / "images" / f"{sample_id}.{ext}"
    rgb = image_to_uint8(image, image_file)
    info = read_dataset_json(root) if (Path(root) / "dataset.json").is_file() else None
    files: dict[Path, bytes] = {}
    for name, arr in targets.items():
        if arr is not None:
            task = get_task(name)
            path = base / task.folder / f"{sample_id}.png"
            files[path] = png_bytes(_encode_target(task, arr, rgb.shape[:2], info, path))
    if meta is not None:
        files[base / "meta" / f"{sample_id}.json"] = _meta_bytes(meta, base / "meta" / f"{sample_id}.json")
    _refuse_second_image(image_file)
    files[image_file] = png_bytes(rgb) if ext == "png" else jpeg_bytes(rgb)
    for path, data in files.items():
        atomic_write(path, data, fsync=fsync)


def _encode_target(
    task: Task, arr: Any, size: tuple[int, int], info: dict[str, Any] | None, path: Path
) -> np.ndarray:
    """``task.encode(arr)`` after the size check, then ``task.check_target``; errors name ``path``."""
    shape = np.shape(arr)
    if shape[:2] != size:
        raise DatasetFormatError(
            f"{path}: {task.name} has shape {shape} but the image is {size[0]}x{size[1]} (HxW); targets must "
            "match the image pixel for pixel: resize them to it (nearest neighbour for labels and depth)"
        )
    try:
        encoded = task.encode(arr)
        if info is not None:
            task.check_target(encoded, info)
    except ValueError as e:
        raise DatasetFormatError(f"{path}: {e}") from e
    return encoded


def _json_default(value: Any) -> Any:
    """NumPy scalars and arrays in a meta dict as plain JSON numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _meta_bytes(meta: Any, path: Path) -> bytes:
    """``meta`` as the bytes of ``path``, checked as the loader checks it (a JSON object, valid intrinsics)."""
    try:
        text = json.dumps(meta, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: meta cannot be stored as JSON ({e}); pass a dict of numbers, strings, lists and dicts "
            "(no NaN or inf)"
        ) from e
    check_meta(json.loads(text), path)
    return (text + "\n").encode()


def _refuse_second_image(image_file: Path) -> None:
    """Raise when the sample already has an image in another format (the id would have two images)."""
    for other in (image_file.with_suffix(e) for e in IMAGE_EXTS):
        if other.suffix != image_file.suffix and other.exists():
            raise DatasetFormatError(
                f"{other}: sample {image_file.stem!r} already has this image, so writing {image_file.name} "
                f"would give it two; delete {other.name} first or write with the same image_format"
            )
