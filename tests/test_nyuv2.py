"""NYUv2: real metadata tables, a format-exact v7.3 HDF5 fixture, the MTAN .npy layout, real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset, write_sample
from densemtl.data.format import read_dataset_json, write_dataset_json
from densemtl.datasets.common import crop_box
from densemtl.datasets.nyuv2 import (
    NYU13_CLASSES,
    NYU_INTRINSICS,
    NYU_VALID_CROP,
    convert_nyuv2,
    load_mapping13,
    load_mapping40,
    load_nyu_normals,
    load_splits,
    nyu_normals_to_camera,
)
from densemtl.tasks.normals import normals_from_depth

h5py = pytest.importorskip("h5py")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
META = SHARED / "nyuv2_meta"
SAMPLES = SHARED / "nyu_samples"
N_FRAMES, H, W = 1449, 6, 8  # H != W so a missed MATLAB transpose cannot go unnoticed

needs_meta = pytest.mark.skipif(not META.is_dir(), reason="shared NYUv2 metadata not present")


def _frames(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame i in image axis order: RGB (H, W, 3), depth metres (H, W), raw labels (H, W)."""
    rows, cols = np.mgrid[0:H, 0:W]
    rgb = np.stack([rows * 20 + cols, np.full_like(rows, i % 256), cols * 30], -1).astype(np.uint8)
    depth = (0.5 + rows * 0.75 + cols * 0.125 + (i % 7) * 0.01).astype(np.float32)
    raw = ((rows * W + cols + i) % 895).astype(np.uint16)  # includes 0 = unlabelled
    return rgb, depth, raw


@pytest.fixture(scope="module")
def labeled_mat(tmp_path_factory) -> Path:
    """A tiny ``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 writes it: HDF5, 512-byte userblock, axes reversed."""
    path = tmp_path_factory.mktemp("nyu") / "nyu_depth_v2_labeled.mat"
    frames = [_frames(i) for i in range(N_FRAMES)]
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset(
            "images", data=np.stack([r.transpose(2, 1, 0) for r, _, _ in frames])
        )  # (N, 3, W, H)
        f.create_dataset("depths", data=np.stack([d.T for _, d, _ in frames]))  # (N, W, H)
        f.create_dataset("labels", data=np.stack([lab.T for _, _, lab in frames]))
    with path.open("r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))
    return path


@needs_meta
def test_real_mapping_tables_and_splits():
    lut40, names40 = load_mapping40(META / "classMapping40.mat")
    assert lut40.shape == (895,) and lut40[0] == 255
    assert set(np.unique(lut40[1:])) <= set(range(40)) and len(names40) == 40
    assert names40[:2] == ["wall", "floor"]
    lut13, names13 = load_mapping13(META / "class13Mapping.mat")
    assert names13 == NYU13_CLASSES
    common = set(names40) & set(names13)
    assert len(common) == 10  # wall, floor, bed, chair, sofa, table, window, picture, ceiling, books
    for name in common:
        assert names13[lut13[names40.index(name)]] == name  # classes named alike in both sets map together
    assert names13[lut13[names40.index("television")]] == "tv"
    assert lut13[255] == 255 and set(np.unique(lut13[:40])) == set(range(13))
    splits = load_splits(META / "splits.mat")
    assert len(splits["train"]) == 795 and len(splits["val"]) == 654
    both = np.concatenate([splits["train"], splits["val"]])
    assert np.array_equal(np.sort(both), np.arange(1449))  # disjoint and complete, 0-based


@needs_meta
@pytest.mark.parametrize("classes", [40, 13])
def test_convert_labeled_mat(labeled_mat, tmp_path, classes):
    dst = tmp_path / "nyu"
    stats = convert_nyuv2(labeled_mat, dst, meta_dir=META, classes=classes, max_per_split=2)
    assert stats["counts"] == {"train": 2, "val": 2}
    info = read_dataset_json(dst)
    assert len(info["classes"]) == classes and info["depth"]["units"] == "metres"
    lut, _ = load_mapping40(META / "classMapping40.mat")
    if classes == 13:
        lut = load_mapping13(META / "class13Mapping.mat")[0][lut]
    first_train = int(load_splits(META / "splits.mat")["train"][0])
    ds = FolderDataset(dst, "train")
    assert ds.ids[0] == f"{first_train + 1:04d}"  # ids are the official 1-based frame numbers
    s = ds[0]
    rgb, depth, raw = _frames(first_train)
    assert s["image"].shape == (3, H, W)
    assert np.array_equal((s["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), rgb)
    assert np.allclose(s["depth"][0].numpy(), depth, atol=0.5 / 256)
    assert np.array_equal(s["semseg"].numpy(), lut[raw].astype(np.int64))
    assert (s["semseg"].numpy()[raw == 0] == 255).all()
    assert s["intrinsics"].tolist() == pytest.approx(list(NYU_INTRINSICS), abs=1e-3)
    assert check_dataset(dst).ok


def test_valid_crop_shifts_principal_point():
    sample = {"image": np.zeros((480, 640, 3), np.uint8), "depth": np.ones((480, 640), np.float32)}
    out = crop_box({**sample, "intrinsics": NYU_INTRINSICS}, *NYU_VALID_CROP)
    assert out["image"].shape == (427, 561, 3) and out["depth"].shape == (427, 561)
    fx, fy, cx, cy = out["intrinsics"]
    assert (fx, fy) == NYU_INTRINSICS[:2]
    assert cx == pytest.approx(NYU_INTRINSICS[2] - 40) and cy == pytest.approx(NYU_INTRINSICS[3] - 44)


def test_convert_mtan_layout(tmp_path):
    src, rng = tmp_path / "mtan", np.random.default_rng(0)
    h, w = 12, 16  # the real layout is 288x384; the axis conventions are what matters here
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            for name, arr in {
                "image": rng.random((h, w, 3)).astype(np.float32),
                "label": np.where(rng.random((h, w)) < 0.2, -1, rng.integers(0, 13, (h, w))).astype(
                    np.float32
                ),
                "depth": (rng.random((h, w, 1)) * 9 + 0.5).astype(np.float32),
                "normal": np.tile(np.float32([0, 0, -1]), (h, w, 1)),
            }.items():
                (src / split / name).mkdir(parents=True, exist_ok=True)
                np.save(src / split / name / f"{i}.npy", arr)
    stats = convert_nyuv2(src, tmp_path / "out")
    assert stats["counts"] == {"train": 3, "val": 2}
    assert read_dataset_json(tmp_path / "out")["classes"] == NYU13_CLASSES
    s = FolderDataset(tmp_path / "out", "val", tasks=("semseg", "depth", "normals"))[1]
    label = np.load(src / "val" / "label" / "1.npy")
    assert np.array_equal(s["semseg"].numpy(), np.where(label < 0, 255, label).astype(np.int64))
    assert np.allclose(
        s["depth"][0].numpy(), np.load(src / "val" / "depth" / "1.npy")[..., 0], atol=0.5 / 256
    )
    image = np.load(src / "val" / "image" / "1.npy")
    assert np.abs(s["image"].permute(1, 2, 0).numpy() - image).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(s["normals"][:, 0, 0].numpy(), [0, 0, -1], atol=0.01)
    assert read_dataset_json(tmp_path / "out")["tasks"] == ["semseg", "depth", "normals"]
    assert s["intrinsics"][0].item() == pytest.approx(NYU_INTRINSICS[0] * w / 640, rel=1e-4)


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared NYU samples not present")
def test_real_frames_through_folder_format(tmp_path):
    """Two real Kinect frames: depth uint16/5000 -> metres -> our uint16/256 PNG -> metres, labels 0..39."""
    classes = [f"class{i}" for i in range(40)]
    write_dataset_json(tmp_path, name="nyu2", tasks=["semseg", "depth"], classes=classes,
                       palette=[[i, i, i] for i in range(40)], splits=["val"], depth_max=10.0)  # fmt: skip
    originals = {}
    for sid in ("000433", "000464"):
        rgb = np.asarray(Image.open(SAMPLES / f"{sid}.png").convert("RGB"))
        depth = np.asarray(Image.open(SAMPLES / f"depth_gt_{sid}.png")).astype(np.float32) / 5000.0
        labels = np.asarray(Image.open(SAMPLES / f"segm_gt_{sid}.png"))
        write_sample(
            tmp_path, "val", sid, rgb, semseg=labels, depth=depth, meta={"intrinsics": list(NYU_INTRINSICS)}
        )
        originals[sid] = depth, labels
    ds = FolderDataset(tmp_path, "val")
    assert len(ds) == 2
    for s in ds:
        depth, labels = originals[s["id"]]
        d = s["depth"][0].numpy()
        valid = d > 0
        assert np.array_equal(valid, depth > 0)  # 0 = no measurement survives the re-encoding
        assert d[valid].min() > 0.3 and d[valid].max() < 10.0  # Kinect range, metres (not mm, not /5000 raw)
        assert 1.0 < float(np.median(d[valid])) < 6.0  # an indoor room
        assert np.abs(d - depth).max() <= 0.5 / 256 + 1e-6
        ids = np.unique(s["semseg"].numpy())
        assert set(ids.tolist()) <= set(range(40)) | {255} and len(ids) > 3
        assert np.array_equal(s["semseg"].numpy(), labels.astype(np.int64))
    assert check_dataset(tmp_path).ok


@needs_meta
def test_cli_convert_nyuv2(labeled_mat, tmp_path):
    from densemtl.cli import main

    dst = tmp_path / "cli"
    args = ["data", "convert", "nyuv2", str(labeled_mat), str(dst), "--meta", str(META), "--classes", "13",
            "--max-per-split", "1", "--size", "3x4"]  # fmt: skip
    assert main(args) == 0
    assert read_dataset_json(dst)["classes"] == NYU13_CLASSES
    s = FolderDataset(dst, "val")[0]
    assert s["image"].shape == (3, 3, 4)
    assert s["intrinsics"][0].item() == pytest.approx(NYU_INTRINSICS[0] / 2)
    assert main(["data", "convert", "nyuv2", str(labeled_mat), str(tmp_path / "x")]) == 2  # --meta missing
    assert (
        main(
            [
                "data",
                "convert",
                "nyuv2",
                str(labeled_mat),
                str(tmp_path / "y"),
                "--meta",
                str(META),
                "--crop-valid",
            ]
        )
        == 2
    )  # fmt: skip  (6x8 frames are smaller than the valid region)


def _nyu_encode(cam: np.ndarray) -> np.ndarray:
    """Camera-frame normals (..., 3) -> NYU normal-map pixels (R, G, B) = (x, z, -y), value = (n + 1) * 127.5."""
    nyu = np.stack([cam[..., 0], cam[..., 2], -cam[..., 1]], -1)
    return np.clip(np.rint((nyu + 1) * 127.5), 0, 255).astype(np.uint8)


def _angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a.astype(np.float64) * b).sum(-1), -1.0, 1.0)))


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="shared NYU samples not present")
def test_real_nyu_normals_encoding_and_axes_agree_with_depth():
    """Frame 433: the converted map is unit length inside the valid Kinect region, invalid (127, 127, 127)
    outside, and agrees with normals differenced from its own depth on planar wall and floor pixels."""
    raw = np.asarray(Image.open(SAMPLES / "norm_gt_000433.png"))
    cam = load_nyu_normals(SAMPLES / "norm_gt_000433.png", (480, 640))
    assert cam.shape == (480, 640, 3) and cam.dtype == np.float32
    valid = np.any(cam != 0, axis=-1)
    assert np.array_equal(~valid, (raw == 127).all(-1))  # grey is the only invalid value
    top, bottom, left, right = NYU_VALID_CROP
    inside = np.zeros_like(valid)
    inside[top:bottom, left:right] = True
    assert not valid[~inside].any() and valid[inside].mean() > 0.99
    assert np.allclose(np.linalg.norm(cam[valid], axis=-1), 1.0, atol=1e-5)

    depth = np.asarray(Image.open(SAMPLES / "depth_gt_000433.png")).astype(np.float32) / 5000.0
    est, planar = normals_from_depth(
        depth, NYU_INTRINSICS, step=8, planar_tol=0.01
    )  # Kinect noise: wide stencil
    labels = np.asarray(Image.open(SAMPLES / "segm_gt_000433.png"))  # 40 classes: 0 wall, 1 floor
    wall, floor = planar & valid & (labels == 0), planar & valid & (labels == 1)
    assert wall.sum() > 5000 and floor.sum() > 5000
    err = _angles_deg(est, cam)
    # measured: walls and floor 5.1, floor 3.4, walls 11.4 degrees (median)
    assert np.median(err[wall | floor]) < 10.0
    assert np.median(err[floor]) < 8.0 and np.median(err[wall]) < 20.0
    mirrored = cam * np.float32([-1, 1, 1])  # the runner-up mapping: fits the floor, not the walls (72)
    assert np.median(_angles_deg(est, mirrored)[wall]) > 40.0


def test_nyu_normals_to_camera_axes_and_checks():
    cam = np.array([[[0.36, -0.48, -0.8], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]], np.float32)  # (1, 3, 3)
    rgb = _nyu_encode(cam)
    rgb[0, 2] = 127  # NYU's invalid grey
    assert rgb[0, 1].tolist() == [128, 128, 255]  # a floor (y up) is blue in NYU maps
    out = nyu_normals_to_camera(rgb)
    assert np.allclose(out[0, :2], cam[0, :2], atol=0.01) and (out[0, 2] == 0).all()
    for bad in (rgb[..., 0], rgb.astype(np.float32), np.zeros((2, 2, 4), np.uint8)):
        with pytest.raises(ValueError, match="uint8 RGB"):
            nyu_normals_to_camera(bad)


@needs_meta
def test_convert_labeled_mat_with_normals_dir(labeled_mat, tmp_path):
    splits = load_splits(META / "splits.mat")
    first_train, first_val = int(splits["train"][0]), int(splits["val"][0])
    normal = np.float32([0.36, -0.48, -0.8])
    normals_dir = tmp_path / "normals"
    normals_dir.mkdir()
    for frame in (first_train, first_val):  # the second train frame has no map
        rgb = _nyu_encode(np.tile(normal, (H, W, 1)))
        Image.fromarray(rgb).save(normals_dir / f"norm_gt_{frame + 1:06d}.png")  # 1-based frame numbers
    dst = tmp_path / "nyu"
    convert_nyuv2(labeled_mat, dst, meta_dir=META, max_per_split=2, normals_dir=normals_dir)
    assert read_dataset_json(dst)["tasks"] == ["semseg", "depth", "normals"]
    ds = FolderDataset(dst, "train", tasks=("semseg", "depth", "normals"))
    with_map, without = ds[0], ds[1]
    assert with_map["valid_tasks"]["normals"] and not without["valid_tasks"]["normals"]
    assert np.abs(with_map["normals"].permute(1, 2, 0).numpy() - normal).max() < 0.02
    assert (without["normals"] == 0).all()
    assert FolderDataset(dst, "val", tasks=("normals",))[0]["valid_tasks"]["normals"]
    assert check_dataset(dst).ok

    Image.fromarray(np.zeros((H + 1, W, 3), np.uint8)).save(
        normals_dir / f"norm_gt_{first_train + 1:06d}.png"
    )
    with pytest.raises(ValueError, match="normal map is"):
        convert_nyuv2(labeled_mat, tmp_path / "bad", meta_dir=META, max_per_split=1, normals_dir=normals_dir)
    with pytest.raises(FileNotFoundError, match="normals_dir"):
        convert_nyuv2(labeled_mat, tmp_path / "x", meta_dir=META, normals_dir=tmp_path / "missing")
