"""A picture of a dataset split: one row per sample, RGB and each task's target, plus a class legend.

The first thing to look at after converting data: misaligned labels, wrong depth units (everything one
colour) or swapped class ids show up at a glance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from densemtl.data.folder import FolderDataset, dataset_tasks
from densemtl.data.format import read_dataset_json
from densemtl.tasks import TASKS
from densemtl.viz.colors import BACKGROUND, make_grid, save_png

MAX_PANEL_WIDTH = 384  # preview panels are shrunk to this width (aspect kept) so the grid stays viewable


def panel_size(height: int, width: int, max_width: int = MAX_PANEL_WIDTH) -> tuple[int, int]:
    """(H, W) of one preview panel for an image of ``height`` x ``width``."""
    if width <= max_width:
        return height, width
    return max(1, round(height * max_width / width)), max_width


def _fit(panel: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    if panel.shape[:2] == size:
        return panel
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(panel).resize((size[1], size[0]), resample))


def legend_strip(class_names: list[str], palette: list[list[int]], width: int, pad: int = 2) -> np.ndarray:
    """uint8 (h, ``width``, 3): a colour swatch and name per class, wrapped over as many lines as needed."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max([probe.textbbox((0, 0), n or " ", font=font)[3] for n in class_names] + [10]) + 2 * pad
    swatch = line_h - 2 * pad
    items, x, y = [], pad, 0
    for name, color in zip(class_names, palette, strict=True):
        item_w = swatch + pad + int(probe.textlength(name, font=font)) + 4 * pad
        if x + item_w > width and x > pad:
            x, y = pad, y + line_h
        items.append((x, y, name, tuple(int(c) for c in color)))
        x += item_w
    strip = Image.new("RGB", (width, y + line_h + pad), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(strip)
    for x, y, name, color in items:
        draw.rectangle([x, y + pad, x + swatch - 1, y + pad + swatch - 1], fill=color, outline=(0, 0, 0))
        draw.text((x + swatch + pad, y + pad), name, fill=(0, 0, 0), font=font)
    return np.asarray(strip)


def write_preview(root: str | Path, split: str = "val", n: int = 8, out: str | Path = "preview.png") -> Path:
    """Write a PNG grid of the first ``n`` samples of ``split``: RGB, then each task's target picture
    (``Task.colorize_target``), and the class legend; returns the written path."""
    info = read_dataset_json(root)
    tasks = dataset_tasks(info)
    ds = FolderDataset(root, split, tasks=tasks, max_samples=max(1, n))
    samples = [ds[i] for i in range(len(ds))]
    size = panel_size(*samples[0]["image"].shape[-2:])
    rows = []
    for s in samples:
        rgb = np.round(s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        row = [_fit(rgb, size, smooth=True)]
        for t in tasks:
            row.append(
                _fit(TASKS[t].colorize_target(TASKS[t].pack(s[t], s), rgb, info), size, smooth=False)
            )
        rows.append(row)
    grid = make_grid(rows, titles=["RGB", *tasks])
    if any(TASKS[t].uses_classes for t in tasks) and ds.class_names:
        grid = np.concatenate([grid, legend_strip(ds.class_names, ds.palette, grid.shape[1])], axis=0)
    return save_png(out, grid)
