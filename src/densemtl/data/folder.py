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
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

from densemtl.data.format import (
    IMAGE_EXTS,
    TASK_DIRS,
    DatasetFormatError,
    decode_depth,
    decode_normals,
    read_dataset_json,
)
from densemtl.tasks import IGNORE_INDEX

Sample = dict[str, Any]
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit grayscale PNGs


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (so truncation surfaces here), naming the file on failure."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: {what} file not found; restore it or remove the sample")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: cannot decode {what} ({e}); the file is corrupt or truncated, re-export it"
        ) from e
    return img


def _check_size(arr: np.ndarray, path: Path, size: tuple[int, int], what: str) -> None:
    """Raise unless ``arr`` is ``size`` (H, W): targets must match their image pixel for pixel."""
    if arr.shape[:2] != size:
        raise DatasetFormatError(
            f"{path}: {what} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {size[1]}x{size[0]}; "
            "targets must match the (EXIF-rotated) image pixel for pixel: re-export at the image size "
            "(nearest-neighbour resampling for labels and depth)"
        )


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3): EXIF orientation applied, grayscale/RGBA/palette converted to RGB."""
    img = _open(path, "image")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError) as e:  # malformed EXIF block
        raise DatasetFormatError(f"{path}: unreadable EXIF data ({e}); re-save the image without EXIF") from e
    return np.array(img.convert("RGB"))  # writable copy for torch.from_numpy


def load_semseg(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class ids (H, W) int64 from a single-channel PNG; ids must be < ``num_classes`` or 255 (ignore)."""
    img = _open(path, "semseg label")
    if img.mode not in ("L", "P", *_DEPTH_MODES):
        raise DatasetFormatError(
            f"{path}: semseg labels must be a single-channel PNG of class ids, got mode {img.mode}; "
            "convert colour-coded labels to ids (0..num_classes-1, 255 = ignore)"
        )
    arr = np.asarray(img).astype(np.int64)
    _check_size(arr, path, size, "semseg label")
    bad = (arr >= num_classes) & (arr != IGNORE_INDEX) | (arr < 0)
    if bad.any():
        ids = np.unique(arr[bad])[:10].tolist()
        raise DatasetFormatError(
            f"{path}: label ids {ids} are outside the {num_classes} classes of dataset.json; map them to "
            f"0..{num_classes - 1}, or to {IGNORE_INDEX} (ignore), or add the classes to dataset.json"
        )
    return arr


def load_depth(path: Path, size: tuple[int, int], scale: float) -> np.ndarray:
    """Depth (H, W) float32 metres from a uint16 PNG (value / ``scale``); 0 stays 0 (invalid)."""
    img = _open(path, "depth")
    if img.mode not in _DEPTH_MODES:
        hint = "an 8-bit PNG" if img.mode in ("L", "P") else f"mode {img.mode}"
        raise DatasetFormatError(
            f"{path}: depth must be a 16-bit grayscale PNG (uint16, metres * {scale:g}, 0 = invalid), got {hint}; "
            "write it with densemtl.data.format.encode_depth / write_sample"
        )
    raw = np.asarray(img)
    _check_size(raw, path, size, "depth")
    if raw.min(initial=0) < 0:
        raise DatasetFormatError(f"{path}: depth PNG has negative values; store uint16 (0 = invalid)")
    return decode_depth(raw, scale=scale)


def load_normals(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Unit normals (H, W, 3) float32 from an RGB PNG (n = v / 127.5 - 1); (0, 0, 0) = invalid."""
    img = _open(path, "normals")
    if img.mode != "RGB":
        raise DatasetFormatError(
            f"{path}: normals must be an 8-bit RGB PNG, got mode {img.mode}; "
            "write them with densemtl.data.format.encode_normals / write_sample"
        )
    raw = np.asarray(img)
    _check_size(raw, path, size, "normals")
    return decode_normals(raw)


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
    """``<split>/<task dir>/<id>.png`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / TASK_DIRS[task] / f"{image_path.stem}.png"


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
        if not path.is_file():
            out[task] = None
        elif task == "semseg":
            out[task] = load_semseg(path, size, len(info["classes"]))
        elif task == "depth":
            out[task] = load_depth(path, size, float(info["depth"]["scale"]))
        else:
            out[task] = load_normals(path, size)
    out["intrinsics"] = load_intrinsics(meta_path(image_path))
    return out


def validate_sample(
    image_path: Path, info: dict[str, Any], tasks: tuple[str, ...] = tuple(TASK_DIRS)
) -> list[str]:
    """Every problem with one sample's files as messages (empty when the sample is fine); never raises."""
    try:
        size = load_image(image_path).shape[:2]
    except DatasetFormatError as e:
        return [str(e)]
    checks: list[Callable[[], object]] = [lambda: load_intrinsics(meta_path(image_path))]
    loaders = {
        "semseg": lambda p: load_semseg(p, size, len(info["classes"])),
        "depth": lambda p: load_depth(p, size, float(info["depth"]["scale"])),
        "normals": lambda p: load_normals(p, size),
    }
    for task in tasks:
        path = task_path(image_path, task)
        if path.is_file():
            checks.append(lambda f=loaders[task], p=path: f(p))
    errors = []
    for check in checks:
        try:
            check()
        except DatasetFormatError as e:
            errors.append(str(e))
    return errors


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
        tasks: targets to load; "normals" is loaded only when asked for.
        max_samples: keep the first N samples by id (0 = all).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[Sample], Sample] | None = None,
        tasks: tuple[str, ...] | list[str] = ("semseg", "depth"),
        max_samples: int = 0,
    ) -> None:
        unknown = [t for t in tasks if t not in TASK_DIRS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the folder format has {sorted(TASK_DIRS)}")
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.tasks = tuple(tasks)
        self.info: dict[str, Any] = read_dataset_json(self.root)
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
            arr = raw[task]
            valid[task] = arr is not None
            if task == "semseg":
                t = torch.from_numpy(arr) if arr is not None else torch.full((h, w), IGNORE_INDEX)  # (H, W)
            elif task == "depth":
                t = torch.from_numpy(arr)[None] if arr is not None else torch.zeros(1, h, w)  # (1, H, W)
            else:
                t = torch.from_numpy(arr).permute(2, 0, 1) if arr is not None else torch.zeros(3, h, w)
            sample[task] = tv_tensors.Mask(t.contiguous())
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
