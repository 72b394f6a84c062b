"""Colour maps, overlays and panel grids: numpy in, uint8 RGB numpy out.

Used by the dataset preview, ``predict`` and run reports. Invalid pixels (label 255, depth 0, zero normals)
are drawn black everywhere so "no data" never looks like a class or a distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 255  # grid padding and title strip: white


def colorize_labels(ids: np.ndarray, palette: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> uint8 (H, W, 3) via ``palette`` (N, 3); 255 and ids >= N are black."""
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: min(len(pal), 255)] = pal[:255]
    ids = np.asarray(ids)
    safe = np.where((ids >= 0) & (ids < 256), ids, 255).astype(np.intp)
    return lut[safe]


def colorize_depth(
    depth: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "turbo",
    log: bool = False,
) -> np.ndarray:
    """Depth (H, W) metres -> uint8 (H, W, 3); 0 / non-finite (invalid) -> black.

    ``vmin``/``vmax`` default to the range of the valid pixels; with ``log`` the colour is spread over log
    depth (near structure stays readable next to the sky), and ``vmin`` is kept above 1 mm. The default
    "turbo" has no black end, so far depth never looks like invalid; "magma_r" is a perceptually uniform
    alternative whose far end is near-black.
    """
    d = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(d) & (d > 0)
    out = np.zeros((*d.shape, 3), dtype=np.uint8)
    if not valid.any():
        return out
    lo = float(d[valid].min()) if vmin is None else float(vmin)
    hi = float(d[valid].max()) if vmax is None else float(vmax)
    if log:
        lo = max(lo, 1e-3)
        hi = max(hi, lo)
        vals, lo, hi = np.log(np.maximum(d[valid], 1e-3)), np.log(lo), np.log(hi)
    else:
        vals = d[valid]
    t = np.clip((vals - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](t)  # (N, 4) floats in [0, 1]
    out[valid] = np.round(rgba[:, :3] * 255).astype(np.uint8)
    return out


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """Unit normals (H, W, 3) in [-1, 1] -> uint8 RGB ((n + 1) / 2 * 255); zero vectors -> black."""
    n = np.asarray(normals, dtype=np.float32)
    out = np.round((np.clip(n, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    out[~np.any(n != 0, axis=-1)] = 0
    return out


def overlay(image: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend uint8 ``colors`` over uint8 ``image`` (both (H, W, 3)): (1 - alpha) * image + alpha * colors."""
    if image.shape != colors.shape:
        raise ValueError(f"overlay: image {image.shape} and colours {colors.shape} differ in shape")
    mixed = (1.0 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _rgb(panel: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, 1|3|4) -> (H, W, 3)."""
    p = np.asarray(panel)
    if p.dtype != np.uint8:
        raise ValueError(f"grid panels must be uint8, got {p.dtype}; colourise them first")
    if p.ndim == 2:
        p = p[..., None]
    if p.shape[-1] == 1:
        p = np.repeat(p, 3, axis=-1)
    return p[..., :3]


def _title_strip(titles: list[str], cell_w: int, pad: int, width: int) -> np.ndarray:
    """A white strip with each title centred over its column, in PIL's default font."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t in titles)
    strip = Image.new("RGB", (width, text_h + 2 * pad + 2), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for j, title in enumerate(titles):
        tw = draw.textlength(title, font=font)
        x = pad + j * (cell_w + pad) + max(0.0, (cell_w - tw) / 2)
        draw.text((x, pad), title, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def make_grid(rows: list[list[np.ndarray]], titles: list[str] | None = None, pad: int = 2) -> np.ndarray:
    """Tile equal-size uint8 panels row by row with ``pad`` white pixels around; optional column titles.

    Rows may hold different numbers of panels (missing cells stay white). Returns uint8 (H, W, 3).
    """
    panels = [[_rgb(p) for p in row] for row in rows]
    if not panels or not any(panels):
        raise ValueError("make_grid needs at least one panel")
    ph, pw = next(p for row in panels for p in row).shape[:2]
    for row in panels:
        for p in row:
            if p.shape[:2] != (ph, pw):
                raise ValueError(f"make_grid: panels must share one size, got {p.shape[:2]} and {(ph, pw)}")
    ncols = max(max(len(row) for row in panels), len(titles or []))
    height = len(panels) * (ph + pad) + pad
    width = ncols * (pw + pad) + pad
    grid = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for i, row in enumerate(panels):
        for j, p in enumerate(row):
            y, x = pad + i * (ph + pad), pad + j * (pw + pad)
            grid[y : y + ph, x : x + pw] = p
    if titles:
        grid = np.concatenate([_title_strip(titles, pw, pad, width), grid], axis=0)
    return grid


def save_png(path: str | Path, array: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG, creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path
