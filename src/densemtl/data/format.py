"""The densemtl folder format: how a dataset is laid out on disk, and the encoders for each file.

Layout (see docs/folder_format.md)::

    <root>/dataset.json                  tasks, class names, palette, ignore index, depth encoding
    <root>/<split>/images/<id>.png|jpg   RGB
    <root>/<split>/semseg/<id>.png       uint8 class ids, 255 = ignore
    <root>/<split>/depth/<id>.png        uint16, metres = value / 256, 0 = invalid (KITTI convention)
    <root>/<split>/normals/<id>.png      optional, uint8 RGB, n = v / 127.5 - 1, (0, 0, 0) = invalid
    <root>/<split>/meta/<id>.json        optional, {"intrinsics": [fx, fy, cx, cy], ...}

Any task folder may be missing for some or all samples. Files are written atomically (temp file + rename) so
an interrupted writer never leaves a half-written image behind. The checks shared by the reader and the writer
live here too: :func:`open_image` (every file densemtl reads), :func:`rgb_array` (images as 8-bit RGB),
:func:`image_to_uint8` (arrays about to become an image file) and :func:`check_name` (ids and split names).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from densemtl.fileio import atomic_write

FORMAT_VERSION = 1
DEPTH_SCALE = 256.0  # uint16 value per metre
DEPTH_MAX_ENCODABLE = 65535 / DEPTH_SCALE  # 255.99609375 m: print it with 3 decimals (255.996), never .1f
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_NAME_BYTES = (
    200  # longest id or split name: leaves room for an extension and a temp-file prefix in 255 bytes
)


DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # how Pillow opens 16-bit grayscale PNGs


class DatasetFormatError(ValueError):
    """A dataset file that does not follow the folder format; the message names the file and the fix."""


def decoded_size(path: Path) -> tuple[int, int]:
    """(H, W) of image file ``path`` as stored, after reading all of its data (so truncation shows), cheaply:
    a PNG's chunks and CRCs are verified without inflating the pixels, a JPEG is decoded at 1/8 scale."""
    with Image.open(path) as im:
        w, h = im.size
        if im.format == "PNG":
            im.verify()
        else:
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
    return h, w


def open_image(path: Path, what: str) -> Image.Image:
    """Open and fully decode ``path`` (so truncation surfaces here), naming the file on failure.

    An image over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89 Mpx; Pillow only warns
    up to twice that) is refused here, warning or not, so every reader reports it the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: {what} file not found; restore it or remove the sample")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetFormatError(
            f"{path}: {what} refused as a possible decompression bomb ({e}); downscale it, or if you trust "
            "the file raise PIL.Image.MAX_IMAGE_PIXELS before loading"
        ) from e
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: cannot decode {what} ({e}); the file is corrupt or truncated, re-export it"
        ) from e
    return img


def rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    """A decoded image as uint8 (H, W, 3) RGB; 16-bit grayscale is scaled to 8 bits (value / 257, rounded).

    Pillow's ``convert("RGB")`` clips 16-bit grayscale (modes ``I;16*`` and ``I``) to 255, i.e. all white, so
    those are scaled here; 32-bit integer images beyond 0..65535 and float images have no agreed 8-bit
    meaning and are refused with the fix.
    """
    if img.mode in DEPTH_MODES:
        raw = np.asarray(img)
        if raw.size and (raw.min() < 0 or raw.max() > 65535):
            raise DatasetFormatError(
                f"{path}: 32-bit grayscale image with values {raw.min()}..{raw.max()} (not 0..65535); "
                "save it as an 8-bit RGB PNG or JPEG"
            )
        gray = np.rint(raw.astype(np.float32) / np.float32(257.0)).astype(np.uint8)  # 65535 -> 255
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode == "F":
        raise DatasetFormatError(
            f"{path}: float (mode F) image; an image is 8-bit RGB: save it as PNG or JPEG with values 0..255"
        )
    return np.array(img.convert("RGB"))  # a writable copy (torch.from_numpy)


def image_to_uint8(image: Any, path: Path | str) -> np.ndarray:
    """An array about to be written as image ``path``, checked: uint8 (H, W, 3) RGB or (H, W) grayscale.

    uint8 is kept; other integer arrays must hold 0..255; float arrays must be finite and in [0, 1] and are
    scaled by 255 (rounded). Everything else is refused with the fix, naming ``path``.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]  # (H, W, 1) -> (H, W)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or 0 in arr.shape:
        fix = (
            "drop the alpha channel: image[..., :3]"
            if arr.ndim == 3 and arr.shape[2] == 4
            else ("pass an (H, W, 3) RGB or (H, W) grayscale array")
        )
        raise DatasetFormatError(
            f"{path}: image must be (H, W, 3) RGB or (H, W) grayscale, got {arr.shape}; {fix}"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        bad = int((~np.isfinite(arr)).sum())
        if bad:
            raise DatasetFormatError(
                f"{path}: image has {bad} NaN/inf values; fix those pixels before writing"
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetFormatError(
                f"{path}: a float image must be in [0, 1] (it is scaled by 255), got {lo:.4g}..{hi:.4g}; "
                "for 0..255 floats pass np.clip(np.rint(image), 0, 255).astype(np.uint8)"
            )
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DatasetFormatError(
                f"{path}: {arr.dtype} image values {lo}..{hi} do not fit 8 bits (0..255); scale it first, "
                "e.g. a 16-bit image: np.rint(image / 257).astype(np.uint8)"
            )
        return arr.astype(np.uint8)
    raise DatasetFormatError(
        f"{path}: image dtype {arr.dtype} is not supported; pass uint8 0..255 or float in [0, 1]"
    )


def check_name(name: Any, what: str) -> str:
    """``name`` (a sample id or split) when it is a plain file name; raise naming it and the fix otherwise.

    Refused: empty, a path separator (``/`` or ``\\``), a leading dot (hidden files, ``.``, ``..``), control
    characters (NUL, newline), more than 200 bytes. Such a name could write outside the dataset, or its files
    would be skipped or misread by the loaders.
    """
    reason = ""
    if not isinstance(name, str):
        reason = f"it is a {type(name).__name__}, not a str"
    elif not name:
        reason = "it is empty"
    elif "/" in name or "\\" in name:
        reason = "it contains a path separator"
    elif name.startswith("."):
        reason = "it starts with a dot"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "it contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > _NAME_BYTES:
        reason = f"it is longer than {_NAME_BYTES} bytes"
    if reason:
        raise DatasetFormatError(
            f"{what} {name!r} is not a plain file name ({reason}); use a name such as 'frame_000123' "
            "(letters, digits, '_', '-', '.' but not first), no '/' or '\\'"
        )
    return name


def check_size(arr: np.ndarray, path: Path, size: tuple[int, int], what: str) -> None:
    """Raise unless ``arr`` is ``size`` (H, W): targets must match their image pixel for pixel."""
    if arr.shape[:2] != size:
        raise DatasetFormatError(
            f"{path}: {what} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is {size[1]}x{size[0]}; "
            "targets must match the (EXIF-rotated) image pixel for pixel: re-export at the image size "
            "(nearest-neighbour resampling for labels and depth)"
        )


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    """``array`` as PNG file bytes: uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA, or uint16 (H, W).

    Dataset writers are CPU-bound, so this is OpenCV's libpng at zlib level 1 with the "up" row filter only:
    2-3x faster than Pillow's adaptive filtering at about the same size (synthetic 256x512 depth: 5 against
    9 ms). Other arrays, or an explicit Pillow ``mode``, go through Pillow. Either way the pixels read back
    exactly.
    """
    arr = np.asarray(array)
    channels = 1 if arr.ndim == 2 else arr.shape[2] if arr.ndim == 3 else 0
    fast = mode is None and (
        (arr.dtype == np.uint8 and channels in (1, 3, 4)) or (arr.dtype == np.uint16 and channels == 1)
    )
    if fast and 0 not in arr.shape:
        import cv2

        if channels in (3, 4):  # OpenCV stores BGR(A)
            arr = arr[..., [2, 1, 0, 3][:channels]]
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr), params)
        if ok:
            return buf.tobytes()
    import io

    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    """``array`` as JPEG file bytes (no chroma subsampling)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def encode_depth(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 with value = round(metres * 256); 0, NaN and +inf mean no measurement (stored as 0).

    Negative depth (and -inf) is refused: it is no distance, usually a sign or unit mistake (disparity, inverse
    depth), and silently storing it as "invalid" would hide that. So is depth beyond 255.996 m.
    """
    d = np.asarray(depth_m, dtype=np.float64)
    negative = int((d < 0).sum())
    if negative:
        raise ValueError(
            f"depth has {negative} negative value(s) (min {np.nanmin(d):.6g} m); depth is a distance in metres: "
            "fix the sign or units, or set pixels without a measurement to 0 (or NaN)"
        )
    d = np.where(np.isfinite(d), d, 0.0)
    if d.max(initial=0.0) > DEPTH_MAX_ENCODABLE:
        raise ValueError(
            f"depth up to {d.max():.6g} m cannot be stored as uint16/256 (max {DEPTH_MAX_ENCODABLE:.3f} m); "
            "clip or invalidate (0) far depth before writing"
        )
    return np.round(d * DEPTH_SCALE).astype(np.uint16)


def decode_depth(raw: np.ndarray, scale: float = DEPTH_SCALE) -> np.ndarray:
    """uint16 PNG values -> float32 metres, 0 stays 0 (invalid)."""
    return raw.astype(np.float32) / np.float32(scale)


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame normals -> uint8 RGB, value = rint((n + 1) * 127.5) clipped to 1..255.

    A vector longer than 0.5 is a direction: it is normalised first (so a vector of length 3 cannot clip to
    another direction). Shorter ones, zero vectors included, mean "no normal" and are stored as (0, 0, 0).
    """
    n = np.asarray(normals, dtype=np.float32)
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    with np.errstate(over="ignore", invalid="ignore"):
        length = np.sqrt(x * x + y * y + z * z)  # the sum order of np.linalg.norm, written out: 4x faster
    overflow = np.isinf(length)  # |n| > 1.8e19: the float32 squares overflow
    if overflow.any():
        length[overflow] = np.linalg.norm(n[overflow].astype(np.float64), axis=-1)  # inf stays inf
    valid = length > np.float32(0.5)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scaled = n / length[..., None]
        scaled += np.float32(1.0)
        scaled *= np.float32(127.5)
        out = np.clip(np.rint(scaled, out=scaled), 1, 255).astype(np.uint8)  # NaN at zero vectors: reset
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
    """Write ``<root>/dataset.json`` describing the dataset; returns its path.

    dataset.json marks a dataset complete, so everything written before it is flushed to disk first (one
    ``os.sync``): dataset writers can then skip the per-file fsync (``write_sample(..., fsync=False)``), which
    cost the synthetic generator a third of its speed, and a crash still never leaves a dataset.json beside
    missing files.
    """
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
    if hasattr(os, "sync"):  # POSIX; Windows has none (dataset writes are then left to the OS cache)
        os.sync()
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
