"""``densemtl data convert``: one entry per public dataset, each converting its official layout to the folder format.

The converters themselves live in one module per dataset; shared resizing/writing helpers in ``common``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from densemtl.datasets.cityscapes import convert_cityscapes
from densemtl.datasets.kitti import convert_kitti
from densemtl.datasets.nyuv2 import convert_nyuv2


def _nyuv2(src: Path, dst: Path, size: tuple[int, int] | None, **options: Any) -> dict[str, Any]:
    return convert_nyuv2(src, dst, size=size, **options)


def _cityscapes(src: Path, dst: Path, size: tuple[int, int] | None, **options: Any) -> dict[str, Any]:
    return convert_cityscapes(src, dst, size=size, **options)


def _kitti(src: Path, dst: Path, size: tuple[int, int] | None, **options: Any) -> dict[str, Any]:
    return convert_kitti(src, dst, size=size, **options)


CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "cityscapes": _cityscapes,
    "nyuv2": _nyuv2,
    "kitti": _kitti,
}


def convert_dataset(
    kind: str,
    src: str | Path,
    dst: str | Path,
    size: tuple[int, int] | None = None,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Convert dataset ``kind`` from its official layout at ``src`` to the folder format at ``dst``.

    Returns per-split sample counts and the dataset name. ``options`` go to the dataset's converter
    (see ``convert_nyuv2``, ``convert_cityscapes``, ``convert_kitti``; ``objects=True`` adds object boxes for
    cityscapes and kitti); ``progress`` reports the frames written on stderr (a bar on a terminal, a line
    every 1000 frames or 30 s in a log).
    """
    if kind not in CONVERTERS:
        raise ValueError(f"unknown dataset {kind!r}; convertible datasets: {sorted(CONVERTERS)}")
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(
            f"{src} does not exist; pass the folder (or file) of the original {kind} data"
        )
    return CONVERTERS[kind](src, Path(dst), size, progress=progress, **options)
