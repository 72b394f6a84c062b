"""KITTI: sparse uint16/256 depth stays sparse, calibration, Garg/Eigen crops, semantics-only samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset
from densemtl.data.format import read_dataset_json
from densemtl.datasets.cityscapes import label_lut
from densemtl.datasets.convert import convert_dataset
from densemtl.datasets.kitti import eval_crop_mask, read_calib

H, W = 24, 80
DRIVE = "2011_09_26_drive_0002_sync"
P_RECT_02 = (721.5377, 721.5377, 609.5593, 172.854)
CALIB = """calib_time: 09-Jan-2012 13:57:47
corner_dist: 9.950000e-02
P_rect_00: 7.215377e+02 0.000000e+00 6.095593e+02 0.000000e+00 0.000000e+00 7.215377e+02 1.728540e+02 0.000000e+00 0.000000e+00 0.000000e+00 1.000000e+00 0.000000e+00
P_rect_02: 7.215377e+02 0.000000e+00 6.095593e+02 4.485728e+01 0.000000e+00 7.215377e+02 1.728540e+02 2.163791e-01 0.000000e+00 0.000000e+00 1.000000e+00 2.745884e-03
"""


def _sparse_depth(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    depth = np.zeros((H, W), np.float32)
    hit = rng.random((H, W)) < 0.08  # LiDAR returns on ~8 % of pixels
    depth[hit] = rng.uniform(2.0, 90.0, hit.sum())
    return np.round(depth * 256) / 256  # representable exactly


def _png16(path: Path, depth_m: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(depth_m * 256).astype(np.uint16)).save(path)


def _rgb(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def kitti_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kitti")
    raw = root / "raw" / DRIVE[:10]
    raw.mkdir(parents=True)
    (raw / "calib_cam_to_cam.txt").write_text(CALIB)
    for split, frames in (("train", ["0000000005", "0000000006"]), ("val", ["0000000007"])):
        for k, frame in enumerate(frames):
            seed = int(frame)
            _png16(root / "data_depth_annotated" / split / DRIVE / "proj_depth/groundtruth/image_02" / f"{frame}.png",
                   _sparse_depth(seed))  # fmt: skip
            _rgb(raw / DRIVE / "image_02" / "data" / f"{frame}.png", seed + k)
    sel = root / "depth_selection" / "val_selection_cropped"
    _rgb(sel / "image" / f"{DRIVE}_image_0000000009_image_02.png", 9)
    _png16(sel / "groundtruth_depth" / f"{DRIVE}_groundtruth_depth_0000000009_image_02.png", _sparse_depth(9))
    (sel / "intrinsics").mkdir()
    (sel / "intrinsics" / f"{DRIVE}_image_0000000009_image_02.txt").write_text(
        "721.5377 0.0 596.5593 0.0 721.5377 149.854 0.0 0.0 1.0\n"
    )
    for i in range(2):
        _rgb(root / "data_semantics/training/image_2" / f"00000{i}_10.png", 100 + i)
        ids = np.random.default_rng(i).integers(0, 34, (H, W)).astype(np.uint8)
        (root / "data_semantics/training/semantic").mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids).save(root / "data_semantics/training/semantic" / f"00000{i}_10.png")
    return root


def test_eval_crop_mask_hand_computed():
    m = eval_crop_mask(375, 1242, "garg")
    rows, cols = np.where(m)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (153, 371, 44, 1197)
    m = eval_crop_mask(375, 1242, "eigen")
    rows, cols = np.where(m)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (124, 342, 44, 1197)
    assert eval_crop_mask(10, 20, "none").all()
    with pytest.raises(ValueError, match="eval_crop"):
        eval_crop_mask(10, 20, "bogus")


def test_read_calib(kitti_root):
    assert read_calib(kitti_root / "raw" / DRIVE[:10] / "calib_cam_to_cam.txt", "02") == pytest.approx(
        P_RECT_02
    )


def test_convert_kitti_sparse_depth_and_semantics(kitti_root, tmp_path):
    stats = convert_dataset("kitti", kitti_root, tmp_path / "k", eval_crop="garg")
    assert stats["counts"] == {"train": 2, "val": 1, "val_selection": 1, "train_semantic": 2}
    info = read_dataset_json(tmp_path / "k")
    assert info["depth_sparse"] is True and len(info["classes"]) == 19
    train = FolderDataset(tmp_path / "k", "train")
    assert train.ids == [f"{DRIVE}_image_02_0000000005", f"{DRIVE}_image_02_0000000006", "sem_000000_10",
                         "sem_000001_10"]  # fmt: skip
    s = train[0]
    d, expected = s["depth"][0].numpy(), _sparse_depth(5)
    assert np.array_equal(d > 0, expected > 0) and np.allclose(d, expected)  # sparse, untouched, not cropped
    assert (d > 80).any()  # no cap at conversion: the 80 m cap is an evaluation setting
    assert s["intrinsics"].tolist() == pytest.approx(list(P_RECT_02), abs=1e-3)
    assert s["valid_tasks"] == {"semseg": False, "depth": True}
    sem = train[2]
    assert sem["valid_tasks"] == {"semseg": True, "depth": False}
    ids = np.random.default_rng(0).integers(0, 34, (H, W)).astype(np.uint8)
    assert np.array_equal(sem["semseg"].numpy(), label_lut(19)[ids])
    val = FolderDataset(tmp_path / "k", "val")[0]["depth"][0].numpy()
    inside = eval_crop_mask(H, W, "garg")
    assert (val[~inside] == 0).all() and np.allclose(val[inside], _sparse_depth(7)[inside])
    sel = FolderDataset(tmp_path / "k", "val_selection")[0]
    assert sel["intrinsics"].tolist() == pytest.approx([721.5377, 721.5377, 596.5593, 149.854], abs=1e-3)
    assert check_dataset(tmp_path / "k").ok


def test_missing_rgb_is_named(kitti_root, tmp_path):
    broken = tmp_path / "broken"
    gt = broken / "data_depth_annotated/train" / DRIVE / "proj_depth/groundtruth/image_02/0000000001.png"
    _png16(gt, _sparse_depth(1))
    with pytest.raises(FileNotFoundError, match="0000000001.png"):
        convert_dataset("kitti", broken, tmp_path / "out")
