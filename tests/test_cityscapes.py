"""Cityscapes: label table, disparity -> metres, depth preparation, conversion and the direct reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset
from densemtl.data.format import read_dataset_json
from densemtl.datasets.cityscapes import (
    CityscapesDataset,
    DepthPrep,
    class_names,
    convert_cityscapes,
    disparity_to_depth,
    label_lut,
    prepare_depth,
)
from densemtl.datasets.convert import convert_dataset

H, W = 32, 64
BASELINE, FX, FY, U0, V0 = 0.209313, 2262.52, 2265.30, 1096.98, 513.137  # a real Cityscapes camera
FRAMES = {"train": [("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")],
          "val": [("frankfurt", "frankfurt_000000_000294")]}  # fmt: skip


def _disparity_for(depth_m: np.ndarray) -> np.ndarray:
    """uint16 disparity PNG values giving ``depth_m`` (0 -> p = 0)."""
    p = np.zeros(depth_m.shape, np.uint16)
    ok = depth_m > 0
    p[ok] = np.round(BASELINE * FX / depth_m[ok] * 256 + 1).astype(np.uint16)
    return p


def _frame(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    label_ids = rng.integers(0, 34, (H, W)).astype(np.uint8)
    label_ids[label_ids == 23] = 26  # sky only on top (car elsewhere)
    label_ids[:6] = 23  # sky on top
    depth = np.linspace(4, 60, W, dtype=np.float32)[None].repeat(H, 0)
    depth[:6] = 0  # no disparity in the sky
    depth[20:24, 30:36] = 0  # a hole
    return rgb, label_ids, depth


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    """A tiny Cityscapes tree in the official layout; the bochum frame has no disparity file."""
    root = tmp_path_factory.mktemp("cityscapes")
    k = 0
    for split, frames in FRAMES.items():
        for city, stem in frames:
            rgb, label_ids, depth = _frame(k)
            k += 1
            for folder in ("leftImg8bit", "gtFine", "disparity", "camera"):
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
            d = root / "{}" / split / city
            Image.fromarray(rgb).save(str(d).format("leftImg8bit") + f"/{stem}_leftImg8bit.png")
            Image.fromarray(label_ids).save(str(d).format("gtFine") + f"/{stem}_gtFine_labelIds.png")
            if city != "bochum":
                Image.fromarray(_disparity_for(depth)).save(
                    str(d).format("disparity") + f"/{stem}_disparity.png"
                )
            cam = {"extrinsic": {"baseline": BASELINE, "pitch": 0.038, "roll": 0.0, "x": 1.7, "y": 0.1, "yaw": -0.0195,
                                 "z": 1.18}, "intrinsic": {"fx": FX, "fy": FY, "u0": U0, "v0": V0}}  # fmt: skip
            Path(str(d).format("camera") + f"/{stem}_camera.json").write_text(json.dumps(cam, indent=4))
    return root


def test_label_table():
    lut19, lut7 = label_lut(19), label_lut(7)
    assert sorted(np.unique(lut19[lut19 != 255]).tolist()) == list(range(19))
    names = class_names(19)
    assert names[0] == "road" and names[10] == "sky" and names[18] == "bicycle" and len(names) == 19
    assert lut19[7] == 0 and lut19[26] == 13 and lut19[33] == 18  # road, car, bicycle
    assert lut19[0] == lut19[1] == lut19[9] == lut19[29] == 255  # unlabeled, ego vehicle, parking, caravan
    assert lut7[7] == 0 and lut7[26] == 6 and lut7[24] == 5 and lut7[23] == 4  # flat, vehicle, human, sky
    assert lut7[9] == 255 and (lut7 != 255).sum() == 19  # only evaluated labels get a category


def test_disparity_to_depth_hand_computed():
    raw = np.array([[0, 1, 257, 10 * 256 + 1, 2 * 256 + 1]], np.uint16)
    depth = disparity_to_depth(raw, BASELINE, FX, max_depth=250.0)
    bf = BASELINE * FX  # 473.6 m at d = 1 px: beyond 250 m -> invalid
    assert depth[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert depth[0, 3] == pytest.approx(bf / 10, rel=1e-5) and depth[0, 4] == pytest.approx(bf / 2, rel=1e-5)


def test_convert_and_direct_reader_agree(cs_root, tmp_path):
    stats = convert_dataset("cityscapes", cs_root, tmp_path / "cs")
    assert stats["counts"] == {"train": 2, "val": 1}
    info = read_dataset_json(tmp_path / "cs")
    assert info["classes"] == class_names(19) and info["palette"][0] == [128, 64, 128]
    assert check_dataset(tmp_path / "cs").ok
    conv, direct = FolderDataset(tmp_path / "cs", "train"), CityscapesDataset(cs_root, "train")
    assert conv.ids == [stem for _, stem in FRAMES["train"]] and len(direct) == 2
    for a, b in zip(conv, direct, strict=True):
        assert a["id"] == b["id"] and a["valid_tasks"] == b["valid_tasks"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["semseg"], b["semseg"])
        assert torch.allclose(a["depth"], b["depth"], atol=0.5 / 256)
        assert a["intrinsics"].tolist() == pytest.approx([FX, FY, U0, V0], abs=1e-3)
    rgb, label_ids, depth = _frame(0)
    s = conv[0]
    assert np.array_equal(s["semseg"].numpy(), label_lut(19)[label_ids])
    d = s["depth"][0].numpy()
    assert np.array_equal(d > 0, depth > 0)
    assert np.abs(d - depth)[depth > 0].max() < 0.02 * 60  # disparity quantisation (1/256 px) at <= 60 m
    assert conv[1]["valid_tasks"] == {
        "semseg": True,
        "depth": False,
    }  # no disparity for bochum: no depth file


def test_seven_categories_and_size(cs_root, tmp_path):
    convert_cityscapes(cs_root, tmp_path / "cs7", size=(16, 32), classes=7, splits=("val",))
    s = FolderDataset(tmp_path / "cs7", "val")[0]
    assert s["image"].shape == (3, 16, 32) and s["depth"].shape == (1, 16, 32)
    assert set(np.unique(s["semseg"].numpy()).tolist()) <= set(range(7)) | {255}
    assert s["intrinsics"][0].item() == pytest.approx(FX / 2) and s["intrinsics"][2].item() == pytest.approx(
        (U0 + 0.5) / 2 - 0.5
    )


def test_depth_prep_steps(cs_root):
    plain = CityscapesDataset(cs_root, "val")[0]
    assert (plain["depth"][0, 20:24, 30:36] == 0).all()  # off by default: the hole stays a hole
    prep = DepthPrep(crop_bottom=0.25, crop_left=0.125, inpaint=True, clip=50.0)
    s = CityscapesDataset(cs_root, "val", prep=prep)[0]
    assert s["image"].shape == (3, 24, 56) and s["depth"].shape == (1, 24, 56)
    assert s["intrinsics"][2].item() == pytest.approx(U0 - 8) and s["intrinsics"][3].item() == pytest.approx(
        V0
    )
    d = s["depth"][0].numpy()
    assert (d[20:24, 22:28] > 0).all()  # the hole (shifted by the 8-column crop) is filled
    hole, around = d[20:24, 22:28], d[18, 20:30]
    assert around.min() - 1 <= hole.min() and hole.max() <= around.max() + 1
    assert (d[:6] == 0).all()  # sky is not inpainted
    assert d.max() <= 50.0 + 1e-4  # clipped
    speckled = np.full((9, 9), 10.0, np.float32)
    speckled[4, 4], speckled[0, :3] = 40.0, 0.0  # a stereo outlier and a hole
    smooth = prepare_depth(speckled, DepthPrep(smooth=3))
    assert smooth[4, 4] == 10.0 and (smooth[0, :3] == 0).all()  # outlier removed, holes stay holes


def test_cli_convert_with_depth_prep(cs_root, tmp_path):
    from densemtl.cli import main

    dst = tmp_path / "cli"
    args = ["data", "convert", "cityscapes", str(cs_root), str(dst), "--size", "16x32", "--classes", "7",
            "--crop", "0,0.25,0,0", "--inpaint", "--split", "val"]  # fmt: skip
    assert main(args) == 0
    info = read_dataset_json(dst)
    assert info["splits"] == ["val"] and len(info["classes"]) == 7
    assert info["depth_prep"]["crop_bottom"] == 0.25 and info["depth_prep"]["inpaint"] is True
    s = FolderDataset(dst, "val")[0]
    assert s["image"].shape == (3, 16, 32)
    assert (s["depth"][0, 4:] > 0).all()  # below the sky every pixel has (inpainted) depth
    assert (
        main(["data", "convert", "cityscapes", str(cs_root), str(dst), "--crop", "0,0.2"]) == 2
    )  # clear error
