"""Image I/O for prediction and deployment: any path, PIL image or array to uint8 RGB, and input lists.

Dataset files are read by :mod:`densemtl.data.folder`, whose ``load_image`` (EXIF-rotated, named errors) is the
one image reader behind both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from densemtl.data.folder import load_image
from densemtl.data.format import IMAGE_EXTS

ImageLike = np.ndarray | Image.Image | str | Path


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB, EXIF rotation applied; errors name the file and the fix."""
    return load_image(Path(path))


def as_rgb(image: ImageLike) -> np.ndarray:
    """Accept a path, a PIL image or an array (H, W, 3|4) / (H, W) and return uint8 RGB (H, W, 3)."""
    if isinstance(image, str | Path):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {arr.dtype}; scale floats to 0..255 first")
    return arr[..., :3]


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Expand files and folders (non-recursive) into a sorted list of image files."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FileNotFoundError(f"folder {item} contains no .png/.jpg images")
            paths += found
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return paths
