"""The densemtl folder format: how a dataset is laid out on disk, and the encoders for each file.

Layout (see docs/folder_format.md)::

    <root>/dataset.json                  tasks, class names, palette, ignore index, depth encoding
    <root>/<split>/images/<id>.png|jpg   RGB
    <root>/<split>/semseg/<id>.png       uint8 class ids, 255 = ignore
    <root>/<split>/depth/<id>.png        uint16, metres = value / 256, 0 = invalid (KITTI convention)
    <root>/<split>/normals/<id>.png      optional, uint8 RGB, n = v / 127.5 - 1, (0, 0, 0) = invalid
    <root>/<split>/meta/<id>.json        optional, {"intrinsics": [fx, fy, cx, cy], ...}

Any task folder may be missing for some or all samples. Files are written atomically (temp file + rename) so
an interrupted writer never leaves a half-written image behind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from densemtl.fileio import atomic_write

FORMAT_VERSION = 1
DEPTH_SCALE = 256.0  # uint16 value per metre
DEPTH_MAX_ENCODABLE = 65535 / DEPTH_SCALE  # 255.996 m
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit grayscale PNGs


class DatasetFormatError(ValueError):
    """A dataset file that does not follow the folder format; the message names the file and the fix."""


def open_image(path: Path, what: str) -> Image.Image:
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


def check_size(arr: np.ndarray, path: Path, size: tuple[int, int], what: str) -> None:
    """Raise unless ``arr`` is ``size`` (H, W): targets must match their image pixel for pixel."""
    if arr.shape[:2] != size:
        raise DatasetFormatError(
            f"{path}: {what} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {size[1]}x{size[0]}; "
            "targets must match the (EXIF-rotated) image pixel for pixel: re-export at the image size "
            "(nearest-neighbour resampling for labels and depth)"
        )


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metres (float, 0 or non-finite = invalid) -> uint16 with value = round(metres * 256)."""
    d = np.asarray(depth_m, dtype=np.float64)
    d = np.where(np.isfinite(d) & (d > 0), d, 0.0)
    if d.max(initial=0.0) > DEPTH_MAX_ENCODABLE:
        raise ValueError(
            f"depth up to {d.max():.1f} m cannot be stored as uint16/256 (max {DEPTH_MAX_ENCODABLE:.1f} m); "
            "clip or invalidate far depth before writing"
        )
    return np.round(d * DEPTH_SCALE).astype(np.uint16)


def decode_depth(raw: np.ndarray, scale: float = DEPTH_SCALE) -> np.ndarray:
    """uint16 PNG values -> float32 metres, 0 stays 0 (invalid)."""
    return raw.astype(np.float32) / np.float32(scale)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) unit vectors in camera frame -> uint8 RGB; zero vectors (invalid) -> (0, 0, 0)."""
    n = np.asarray(normals, dtype=np.float32)
    valid = np.einsum("...c,...c->...", n, n) > 0.25  # |n| > 0.5: unit vectors vs zeros, cheaper than norm()
    scaled = (n + np.float32(1.0)) * np.float32(127.5)
    out = np.clip(np.rint(scaled, out=scaled), 1, 255).astype(np.uint8)
    out[~valid] = 0
    return out


def decode_normals(raw: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 (H, W, 3) unit vectors; invalid pixels are (0, 0, 0)."""
    n = raw.astype(np.float32) / 127.5 - 1.0
    valid = raw.any(axis=-1)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
    n[~valid] = 0.0
    return n


def write_dataset_json(
    root: str | Path,
    *,
    name: str,
    tasks: list[str],
    classes: list[str],
    palette: list[list[int]],
    splits: list[str],
    depth_max: float,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<root>/dataset.json`` describing the dataset; returns its path."""
    if len(palette) != len(classes):
        raise ValueError(f"palette has {len(palette)} colours for {len(classes)} classes")
    info = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "tasks": list(tasks),
        "classes": list(classes),
        "palette": [list(map(int, c)) for c in palette],
        "ignore_index": 255,
        "depth": {
            "encoding": "png_uint16",
            "scale": DEPTH_SCALE,
            "units": "metres",
            "invalid": 0,
            "max": float(depth_max),
        },
        "splits": list(splits),
        **(extra or {}),
    }
    path = Path(root) / "dataset.json"
    atomic_write(path, (json.dumps(info, indent=2) + "\n").encode())
    return path


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """Read and validate ``<root>/dataset.json``; errors name the file and what to fix."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetFormatError(
            f"{path} not found: a dataset root needs a dataset.json (see docs/folder_format.md), "
            "or run `densemtl data synth --out ROOT` to create the synthetic dataset"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} is not valid JSON ({e}); fix or regenerate it") from e
    required = {"tasks": list, "classes": list, "palette": list, "ignore_index": int, "depth": dict}
    for key, typ in required.items():
        if key not in info:
            raise DatasetFormatError(f"{path}: missing key {key!r}; see docs/folder_format.md")
        if not isinstance(info[key], typ):
            raise DatasetFormatError(
                f"{path}: {key!r} must be a {typ.__name__}, got {type(info[key]).__name__}"
            )
    if len(info["palette"]) != len(info["classes"]):
        raise DatasetFormatError(
            f"{path}: 'palette' has {len(info['palette'])} colours but 'classes' has {len(info['classes'])}"
        )
    info["depth"].setdefault("scale", DEPTH_SCALE)
    info["depth"].setdefault("max", 80.0)
    return info
