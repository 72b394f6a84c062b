"""Colour maps, overlays, grids and the dataset preview."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from densemtl.data.folder import write_sample
from densemtl.data.format import write_dataset_json
from densemtl.viz.colors import (
    colorize_depth,
    colorize_labels,
    colorize_normals,
    make_grid,
    overlay,
    save_png,
)
from densemtl.viz.preview import legend_strip, panel_size, write_preview

PALETTE = [[10, 20, 30], [200, 100, 0], [0, 255, 0]]


def test_colorize_labels() -> None:
    ids = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    out = colorize_labels(ids, PALETTE)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert (
        out[0, 0].tolist() == PALETTE[0]
        and out[0, 1].tolist() == PALETTE[1]
        and out[1, 0].tolist() == PALETTE[2]
    )
    assert out[1, 1].tolist() == [0, 0, 0]
    # ids past the palette are black too, and int64 input works the same
    assert colorize_labels(np.array([[3, 1]], dtype=np.int64), np.array(PALETTE))[0].tolist() == [
        [0, 0, 0],
        PALETTE[1],
    ]


def test_colorize_depth() -> None:
    depth = np.array([[1.0, 2.0, 3.0], [0.0, np.nan, 2.0]], dtype=np.float32)
    out = colorize_depth(depth, cmap="turbo")
    cmap = matplotlib.colormaps["turbo"]
    expect = np.round(np.array(cmap(0.0)[:3]) * 255)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == expect.tolist()  # nearest -> start of the map
    assert out[0, 2].tolist() == np.round(np.array(cmap(1.0)[:3]) * 255).tolist()
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 0, 0]  # invalid -> black
    assert out[1, 2].tolist() == out[0, 1].tolist()
    # Explicit range clips; log spreads colours by ratio (2 m is halfway between 1 and 4 m).
    clipped = colorize_depth(np.array([[0.5, 10.0]]), vmin=1.0, vmax=4.0, cmap="turbo")
    assert clipped[0, 0].tolist() == expect.tolist()
    mid = colorize_depth(np.array([[1.0, 2.0, 4.0]]), log=True, cmap="turbo")[0, 1]
    assert mid.tolist() == np.round(np.array(cmap(0.5)[:3]) * 255).tolist()
    assert not colorize_depth(np.zeros((3, 3))).any()
    assert colorize_depth(np.ones((2, 2)), vmin=0.0, log=True).shape == (2, 2, 3)  # vmin 0 is safe with log


def test_colorize_normals_and_overlay() -> None:
    n = np.array([[[0.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]], dtype=np.float32)
    out = colorize_normals(n)
    assert out.dtype == np.uint8 and out[0].tolist() == [[128, 128, 255], [0, 255, 128], [0, 0, 0]]
    img = np.full((2, 2, 3), 100, np.uint8)
    col = np.full((2, 2, 3), 200, np.uint8)
    assert (overlay(img, col, alpha=0.25) == 125).all()
    assert (overlay(img, col, alpha=0.0) == img).all() and (overlay(img, col, alpha=1.0) == col).all()
    with pytest.raises(ValueError, match="shape"):
        overlay(img, col[:1])


def test_make_grid_layout_and_titles() -> None:
    a = np.zeros((4, 6, 3), np.uint8)
    b = np.full((4, 6), 50, np.uint8)  # grayscale panels are accepted
    grid = make_grid([[a, b, a], [b]], pad=2)
    assert grid.shape == (2 * 4 + 3 * 2, 3 * 6 + 4 * 2, 3)
    assert grid[2:6, 2:8].max() == 0 and (grid[2:6, 10:16] == 50).all()
    assert (grid[8:12, 10:16] == 255).all()  # missing cell in the short row stays background
    titled = make_grid([[a, b, a], [b]], titles=["x", "y", "z"], pad=2)
    strip = titled.shape[0] - grid.shape[0]
    assert strip > 6 and titled.shape[1] == grid.shape[1]
    assert np.array_equal(titled[strip:], grid)
    assert (titled[:strip] < 128).any()  # text was drawn
    with pytest.raises(ValueError, match="share one size"):
        make_grid([[a, np.zeros((5, 6, 3), np.uint8)]])


def test_save_png(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = save_png(tmp_path / "sub" / "x.png", arr)
    assert np.array_equal(np.asarray(Image.open(path)), arr)


def test_write_preview_grid_size(tmp_path: Path) -> None:
    h, w = 16, 24
    classes = ["road", "car", "sky"]
    write_dataset_json(
        tmp_path,
        name="p",
        tasks=["semseg", "depth", "normals"],
        classes=classes,
        palette=PALETTE,
        splits=["val"],
        depth_max=50.0,
    )
    rng = np.random.default_rng(0)
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2] = 1.0
    for i in range(3):
        write_sample(
            tmp_path,
            "val",
            f"{i}",
            rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            semseg=rng.integers(0, 3, (h, w)).astype(np.uint8) if i != 1 else None,
            depth=rng.uniform(1, 40, (h, w)),
            normals=normals if i == 0 else None,
        )
    out = write_preview(tmp_path, split="val", n=5, out=tmp_path / "prev" / "preview.png")
    grid = np.asarray(Image.open(out))
    panel = np.zeros((h, w, 3), np.uint8)
    expected = make_grid([[panel] * 4] * 3, titles=["RGB", "semseg", "depth", "normals"])
    legend = legend_strip(classes, PALETTE, expected.shape[1])
    assert grid.shape == (expected.shape[0] + legend.shape[0], expected.shape[1], 3)
    title_h = expected.shape[0] - (3 * (h + 2) + 2)
    # Row 0, normals panel: (0, 0, 1) -> (128, 128, 255); row 1 has no labels -> black label panel.
    y0 = title_h + 2
    assert grid[y0 : y0 + h, 2 + 3 * (w + 2) : 2 + 3 * (w + 2) + w].reshape(-1, 3).tolist() == [
        [128, 128, 255]
    ] * (h * w)
    y1 = y0 + h + 2
    assert not grid[y1 : y1 + h, 2 + (w + 2) : 2 + (w + 2) + w].any()
    for color in PALETTE:  # the legend shows every class colour
        assert (legend.reshape(-1, 3) == color).all(axis=1).any()


def test_panel_size_caps_width() -> None:
    assert panel_size(100, 200) == (100, 200)
    assert panel_size(1024, 2048, max_width=512) == (256, 512)
