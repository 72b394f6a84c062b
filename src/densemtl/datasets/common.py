"""``densemtl data convert {cityscapes,nyuv2,kitti} SRC DST``: real datasets -> the densemtl folder format.

Each dataset module (``nyuv2``, ``cityscapes``, ``kitti``) reads its official layout and hands numpy samples to
:func:`write_converted`, which crops/resizes them consistently (image bilinear, labels and depth nearest,
intrinsics rescaled) and writes them with :func:`densemtl.data.folder.write_sample`. The helpers here know
nothing about a particular dataset; :func:`read_rgb`, :func:`read_raw` and :func:`read_npy` are how the
converters open source files, so a corrupt, pickled or oversized file is an error naming it and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densemtl.data.folder import load_image, write_sample
from densemtl.data.format import DatasetFormatError, open_image

Intrinsics = tuple[float, float, float, float]  # fx, fy, cx, cy in pixels


def read_rgb(path: Path) -> np.ndarray:
    """A source image as uint8 (H, W, 3) RGB (the folder format's reader: named errors, 16-bit scaled)."""
    return load_image(Path(path))


def read_raw(path: Path, what: str) -> np.ndarray:
    """A source label / depth / disparity image's values as stored (e.g. uint8 ids, uint16); errors name it."""
    return np.asarray(open_image(Path(path), what))


def read_npy(path: Path, what: str) -> np.ndarray:
    """A numeric ``.npy`` array; never unpickles (a pickled file can run code) and names the file on failure."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DatasetFormatError(
                f"{path}: this {what} .npy holds pickled Python objects, which densemtl never loads (loading "
                "could run code); re-save it as a plain numeric array: np.save(path, np.asarray(a, np.float32))"
            ) from e
        raise DatasetFormatError(f"{path}: not a readable {what} .npy array ({e}); re-export it") from e
    except (OSError, EOFError) as e:
        raise DatasetFormatError(
            f"{path}: cannot read {what} .npy ({e}); the file is truncated or not a .npy: re-export it"
        ) from e


def label_palette(n: int) -> list[list[int]]:
    """``n`` distinct RGB colours (the PASCAL VOC bit-interleaving scheme), for datasets without official ones."""
    out = []
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out.append([r, g, b])
    return out


def crop_box(sample: dict[str, Any], top: int, bottom: int, left: int, right: int) -> dict[str, Any]:
    """Keep rows ``top:bottom`` and columns ``left:right`` of every array; shifts the principal point."""
    h, w = sample["image"].shape[:2]
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"crop rows {top}:{bottom}, columns {left}:{right} does not fit a {h}x{w} frame")
    out = dict(sample)
    for key in ("image", "semseg", "depth", "normals"):
        if out.get(key) is not None:
            out[key] = np.ascontiguousarray(out[key][top:bottom, left:right])
    if out.get("intrinsics") is not None:
        fx, fy, cx, cy = out["intrinsics"]
        out["intrinsics"] = (fx, fy, cx - left, cy - top)
    return out


def crop_fractions(
    sample: dict[str, Any], top: float = 0.0, bottom: float = 0.0, left: float = 0.0, right: float = 0.0
) -> dict[str, Any]:
    """Cut the given fractions of the height/width off each side (e.g. ``bottom=0.2`` drops the ego-vehicle)."""
    h, w = sample["image"].shape[:2]
    t, b = round(top * h), h - round(bottom * h)
    lft, r = round(left * w), w - round(right * w)
    if b - t < 1 or r - lft < 1:
        raise ValueError(
            f"crop fractions top={top} bottom={bottom} left={left} right={right} leave no pixels"
        )
    return crop_box(sample, t, b, lft, r)


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    h, w = size
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array).resize((w, h), resample))
    return np.stack(  # per channel so float32 multi-channel arrays (normals) work too
        [np.asarray(Image.fromarray(array[..., c]).resize((w, h), resample)) for c in range(array.shape[2])],
        -1,
    )


def resize_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Resize to ``size`` (H, W): image bilinear (antialiased), semseg/depth/normals nearest, intrinsics scaled.

    Depth stays metric: resizing changes how many pixels see a point, not how far it is, so the values are
    copied (nearest) and only the intrinsics change. Sparse depth stays sparse (some points are dropped).
    """
    h0, w0 = sample["image"].shape[:2]
    if (h0, w0) == tuple(size):
        return sample
    out = dict(sample)
    out["image"] = np.asarray(Image.fromarray(sample["image"]).resize((size[1], size[0]), Image.BILINEAR))
    for key in ("semseg", "depth", "normals"):
        if sample.get(key) is not None:
            out[key] = _resize(sample[key], size, Image.NEAREST)
    if sample.get("intrinsics") is not None:
        sx, sy = size[1] / w0, size[0] / h0
        fx, fy, cx, cy = sample["intrinsics"]
        out["intrinsics"] = (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)
    return out


def write_converted(
    root: Path,
    split: str,
    sample_id: str,
    sample: dict[str, Any],
    size: tuple[int, int] | None = None,
    image_format: str = "png",
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resize (when ``size`` is given) and write one sample; returns the sample as written.

    ``sample`` holds ``image`` (H, W, 3) uint8 and optionally ``semseg`` (H, W) uint8 ids, ``depth`` (H, W)
    metres (0 = invalid), ``normals`` (H, W, 3) and ``intrinsics`` (fx, fy, cx, cy) in pixels.
    """
    if size is not None:
        sample = resize_sample(sample, size)
    info = dict(meta or {})
    if sample.get("intrinsics") is not None:
        info["intrinsics"] = [round(float(v), 4) for v in sample["intrinsics"]]
    write_sample(
        root, split, sample_id, sample["image"], semseg=sample.get("semseg"), depth=sample.get("depth"),
        normals=sample.get("normals"), meta=info or None, image_format=image_format,
    )  # fmt: skip
    return sample
