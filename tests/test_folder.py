"""FolderDataset: round trip through the writers, missing tasks, collation, odd images, clear errors."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from densemtl.data.folder import FolderDataset, validate_sample, write_sample
from densemtl.data.format import DatasetFormatError
from helpers import CLASSES, PALETTE
from helpers import make_dataset as _make_dataset

H, W = 24, 32
make_dataset = partial(_make_dataset, size=(H, W))  # every task, train split only, by (split, id)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    make_dataset(tmp_path)
    return tmp_path


def test_round_trip(tmp_path: Path) -> None:
    written = make_dataset(tmp_path)
    ds = FolderDataset(tmp_path, "train", tasks=("semseg", "depth", "normals"))
    assert len(ds) == 2 and ds.ids == ["s000", "s001"]
    assert ds.class_names == CLASSES and ds.palette == PALETTE and ds.num_classes == 3
    assert ds.info["name"] == "tiny"
    s = ds[1]
    ref = written["train", "s001"]
    assert s["id"] == "s001"
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, H, W)
    assert torch.equal(
        (s["image"] * 255).round().to(torch.uint8), torch.from_numpy(ref["image"]).permute(2, 0, 1)
    )
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (H, W)
    assert np.array_equal(s["semseg"].numpy(), ref["semseg"])
    assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, H, W)
    assert np.abs(s["depth"][0].numpy() - ref["depth"]).max() <= 0.5 / 256 + 1e-6
    assert (s["depth"][0].numpy() == 0).sum() == 3
    assert s["normals"].shape == (3, H, W)
    assert np.abs(s["normals"].permute(1, 2, 0).numpy() - ref["normals"]).max() < 0.02
    assert s["valid_tasks"] == {"semseg": True, "depth": True, "normals": True}
    assert s["has_intrinsics"] is True
    assert torch.equal(s["intrinsics"], torch.tensor([31.0, 31.0, 15.5, 11.5]))


def test_normals_only_when_requested_and_max_samples(root: Path) -> None:
    ds = FolderDataset(root, "train", max_samples=1)
    assert len(ds) == 1
    assert "normals" not in ds[0] and set(ds[0]["valid_tasks"]) == {"semseg", "depth"}


def test_missing_task_files_are_ignore_and_invalid(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=0)
    img = np.zeros((H, W, 3), np.uint8)
    write_sample(tmp_path, "train", "a_depth_only", img, depth=np.full((H, W), 2.0))
    write_sample(tmp_path, "train", "b_semseg_only", img, semseg=np.ones((H, W), np.uint8))
    ds = FolderDataset(tmp_path, "train")
    a, b = ds[0], ds[1]
    assert a["valid_tasks"] == {"semseg": False, "depth": True}
    assert (a["semseg"] == 255).all() and a["semseg"].shape == (H, W)
    assert b["valid_tasks"] == {"semseg": True, "depth": False}
    assert (b["depth"] == 0).all() and b["depth"].shape == (1, H, W)
    assert not a["has_intrinsics"] and torch.equal(a["intrinsics"], torch.zeros(4))
    # A mixed batch collates: targets have full shape, flags become bool tensors.
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, H, W)
    assert batch["semseg"].shape == (2, H, W) and batch["depth"].shape == (2, 1, H, W)
    assert batch["valid_tasks"]["semseg"].tolist() == [False, True]
    assert batch["valid_tasks"]["depth"].tolist() == [True, False]
    assert batch["valid_tasks"]["depth"].dtype == torch.bool
    assert batch["has_intrinsics"].tolist() == [False, False]
    assert batch["intrinsics"].shape == (2, 4) and batch["id"] == ["a_depth_only", "b_semseg_only"]


def test_transform_is_applied(root: Path) -> None:
    ds = FolderDataset(root, "train", transform=lambda s: {**s, "seen": True})
    assert ds[0]["seen"] is True


def test_grayscale_and_rgba_images(root: Path) -> None:
    gray = np.arange(H * W, dtype=np.uint8).reshape(H, W)
    Image.fromarray(gray, mode="L").save(root / "train/images/s000.png")
    rgba = np.dstack([np.full((H, W, 3), 200, np.uint8), np.zeros((H, W), np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(root / "train/images/s001.png")
    ds = FolderDataset(root, "train")
    g = (ds[0]["image"] * 255).round()
    assert (
        g.shape == (3, H, W) and torch.equal(g[0], g[2]) and torch.equal(g[1], torch.from_numpy(gray).float())
    )
    assert ds[1]["image"].shape == (3, H, W) and torch.allclose(ds[1]["image"], torch.tensor(200 / 255))


def test_exif_rotated_jpeg(root: Path) -> None:
    # Stored landscape (W x H) with orientation 6 = "rotate 90 clockwise to display": displayed H x W portrait.
    stored = np.zeros((H, W, 3), np.uint8)
    stored[:, : W // 2] = 255  # left half white in storage -> top half white when displayed
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "train/images/s000.png").unlink()
    Image.fromarray(stored).save(root / "train/images/s000.jpg", exif=exif, quality=95)
    labels = np.zeros((W, H), np.uint8)  # displayed size (H' = W, W' = H)
    Image.fromarray(labels).save(root / "train/semseg/s000.png")
    depth = Image.open(root / "train/depth/s000.png")
    depth.transpose(Image.Transpose.TRANSPOSE).save(root / "train/depth/s000.png")
    s = FolderDataset(root, "train")[0]
    assert s["image"].shape == (3, W, H) and s["semseg"].shape == (W, H)
    assert s["image"][:, : W // 2 - 2].mean() > 0.9 and s["image"][:, W // 2 + 2 :].mean() < 0.1
    # A label saved in the stored (un-rotated) orientation no longer matches.
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "train/semseg/s000.png")
    with pytest.raises(DatasetFormatError, match="s000.png.*EXIF"):
        FolderDataset(root, "train")[0]


def _corrupt(root: Path, what: str) -> Path:
    """Break one file of sample s000 in the way ``what`` names; return the broken file."""
    split = root / "train"
    if what == "truncated image":
        p = split / "images/s000.png"
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    elif what == "garbage jpeg":
        (split / "images/s000.png").unlink()
        p = split / "images/s000.jpg"
        p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    elif what == "label size":
        p = split / "semseg/s000.png"
        Image.fromarray(np.zeros((H, W + 1), np.uint8)).save(p)
    elif what == "depth size":
        p = split / "depth/s000.png"
        Image.fromarray(np.zeros((H - 1, W), np.uint16)).save(p)
    elif what == "label ids":
        p = split / "semseg/s000.png"
        Image.fromarray(np.full((H, W), 7, np.uint8)).save(p)
    elif what == "rgb label":
        p = split / "semseg/s000.png"
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(p)
    elif what == "8-bit depth":
        p = split / "depth/s000.png"
        Image.fromarray(np.full((H, W), 10, np.uint8)).save(p)
    elif what == "broken meta":
        p = split / "meta/s000.json"
        p.write_text('{"intrinsics": [1, 2,')
    elif what == "bad intrinsics":
        p = split / "meta/s000.json"
        p.write_text(json.dumps({"intrinsics": [1.0, 2.0, 3.0]}))
    else:
        raise AssertionError(what)
    return p


CASES = [
    "truncated image",
    "garbage jpeg",
    "label size",
    "depth size",
    "label ids",
    "rgb label",
    "8-bit depth",
    "broken meta",
    "bad intrinsics",
]


@pytest.mark.parametrize("what", CASES)
def test_bad_inputs_name_the_file(root: Path, what: str) -> None:
    bad = _corrupt(root, what)
    ds = FolderDataset(root, "train", tasks=("semseg", "depth", "normals"))
    with pytest.raises(DatasetFormatError) as err:
        ds[0]
    assert str(bad) in str(err.value)
    ds[1]  # the other sample is still fine
    problems = validate_sample(ds.image_paths[0], ds.info)
    assert len(problems) == 1 and str(bad) in problems[0]
    assert validate_sample(ds.image_paths[1], ds.info) == []


def test_label_id_error_lists_ids_and_accepts_ignore(root: Path) -> None:
    labels = np.full((H, W), 255, np.uint8)
    labels[0, 0], labels[0, 1] = 2, 9
    Image.fromarray(labels).save(root / "train/semseg/s000.png")
    with pytest.raises(DatasetFormatError, match=r"\[9\]"):
        FolderDataset(root, "train")[0]
    labels[0, 1] = 1
    Image.fromarray(labels).save(root / "train/semseg/s000.png")
    assert FolderDataset(root, "train")[0]["semseg"][0, :2].tolist() == [2, 1]


def test_split_errors(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=1)
    with pytest.raises(DatasetFormatError, match="val"):
        FolderDataset(tmp_path, "val")
    (tmp_path / "empty/images").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=str(tmp_path / "empty/images")):
        FolderDataset(tmp_path, "empty")
    with pytest.raises(ValueError, match="unknown task"):
        FolderDataset(tmp_path, "train", tasks=("edges",))
    (tmp_path / "train/images/s000.png").unlink()
    (tmp_path / "train/images/s000.jpg").write_bytes(b"")
    ds = FolderDataset(tmp_path, "train")
    (tmp_path / "train/images/s000.jpg").unlink()
    with pytest.raises(DatasetFormatError, match="s000.jpg: image file not found"):
        ds[0]


# ------------------------------------------------------------------------------------- encoders and durability
@pytest.mark.parametrize(
    "shape,dtype,mode",
    [((7, 9), np.uint8, "L"), ((7, 9, 3), np.uint8, "RGB"), ((7, 9, 4), np.uint8, "RGBA"), ((7, 9), np.uint16, "I;16")],
)
def test_png_bytes_reads_back_exactly_in_pillow(shape, dtype, mode) -> None:
    """The OpenCV fast path stores RGB as RGB (not BGR) and 16 bits as 16 bits, pixel for pixel."""
    import io

    from densemtl.data.format import png_bytes

    arr = np.random.default_rng(0).integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=dtype)
    img = Image.open(io.BytesIO(png_bytes(arr)))
    assert img.mode == mode
    np.testing.assert_array_equal(np.asarray(img), arr)
    view = arr[:, ::-1]  # not contiguous
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(view)))), view)


def test_encode_normals_normalises_directions_and_keeps_zeros_invalid() -> None:
    from densemtl.data.format import decode_normals, encode_normals

    n = np.zeros((1, 5, 3), np.float32)
    n[0, 0] = (0, 0, -1)
    n[0, 1] = (0, 0, -3)  # same direction, length 3: must not clip to another direction
    n[0, 2] = (0.6, 0, 0)  # length > 0.5: a direction
    n[0, 3] = (0.4, 0, 0)  # length < 0.5: no normal
    n[0, 4] = (1e20, 0, 1e20)  # x*x overflows float32: still the direction (1, 0, 1) / sqrt(2)
    out = encode_normals(n)
    assert (out[0, 1] == out[0, 0]).all() and (out[0, 3] == 0).all()
    back = decode_normals(out)
    np.testing.assert_allclose(back[0, 2], (1, 0, 0), atol=0.01)
    np.testing.assert_allclose(back[0, 4], (2**-0.5, 0, 2**-0.5), atol=0.01)


def test_dataset_json_is_written_after_the_sample_files_are_synced(tmp_path: Path, monkeypatch) -> None:
    """Dataset writers skip the per-file fsync; write_dataset_json syncs everything before it marks the
    dataset complete, so a crash never leaves a dataset.json beside files that were not on disk yet."""
    import os

    from densemtl.data.format import write_dataset_json

    events = []
    monkeypatch.setattr(os, "sync", lambda: events.append(("sync", (tmp_path / "dataset.json").exists())))
    write_sample(tmp_path, "train", "a", np.zeros((H, W, 3), np.uint8), semseg=np.zeros((H, W), np.uint8),
                 fsync=False)  # fmt: skip
    assert not (tmp_path / "dataset.json").exists()
    write_dataset_json(tmp_path, name="t", tasks=["semseg"], classes=CLASSES, palette=PALETTE, splits=["train"],
                       depth_max=10.0)  # fmt: skip
    assert events == [("sync", False)]  # synced once, before dataset.json existed
    assert len(FolderDataset(tmp_path, "train", tasks=("semseg",))) == 1
