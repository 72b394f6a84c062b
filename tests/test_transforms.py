"""Joint transforms: shared geometry across keys, per-key fills, intrinsics that follow the pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from densemtl.data.folder import FolderDataset, write_sample
from densemtl.data.format import write_dataset_json
from densemtl.data.transforms import build_transforms, crop_sample, hflip_sample, resize_sample

H, W = 20, 30
K = [25.0, 27.0, 14.2, 9.7]  # fx, fy, cx, cy
OFF = 256  # label = pixel id + OFF, so no pixel carries the ignore id 255


def pattern_sample() -> dict:
    """Every pixel carries its own id = y * W + x in the image (R, G bytes), the labels (+ OFF) and depth (+1)."""
    ids = torch.arange(H * W).reshape(H, W)
    image = torch.stack([ids % 256, ids // 256, torch.full_like(ids, 128)]).float() / 255.0  # (3, H, W)
    xs = torch.arange(W).float().expand(H, W)
    normals = torch.stack([(xs + 1) / 100, ids.float() / 1e4, torch.ones(H, W)])  # x component > 0
    return {
        "image": image,
        "semseg": ids + OFF,
        "depth": (ids.float() + 1)[None],
        "normals": normals,
        "intrinsics": torch.tensor(K),
        "has_intrinsics": True,
        "id": "p",
        "valid_tasks": {"semseg": True},
    }


def image_ids(image: torch.Tensor) -> torch.Tensor:
    """Decode the id pattern from a (3, H, W) image in [0, 1]."""
    px = (image * 255).round().long()
    return px[0] + 256 * px[1]


def project(k: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """(N, 3) camera points -> (N, 2) pixel coordinates (u, v)."""
    return torch.stack([k[0] * point[:, 0] / point[:, 2] + k[2], k[1] * point[:, 1] / point[:, 2] + k[3]], 1)


def backproject(k: torch.Tensor, uv: torch.Tensor, z: float = 3.0) -> torch.Tensor:
    """(N, 2) pixels -> (N, 3) camera points at depth ``z``."""
    x = (uv[:, 0] - k[2]) / k[0] * z
    y = (uv[:, 1] - k[3]) / k[1] * z
    return torch.stack([x, y, torch.full_like(x, z)], 1)


@pytest.mark.parametrize("crop", [(16, 24), (26, 36)])  # inside the image, and larger (padded)
def test_train_pipeline_keeps_keys_aligned_and_intrinsics_consistent(crop: tuple[int, int]) -> None:
    t = build_transforms(train=True, crop=crop, scale_range=(1.0, 1.0), hflip=True, color_jitter=0.0)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = t(pattern_sample())
        assert out["image"].shape == (3, *crop) and type(out["semseg"]) is torch.Tensor
        assert out["id"] == "p" and out["valid_tasks"] == {"semseg": True}
        valid = out["semseg"] != 255
        sem = out["semseg"] - OFF
        assert valid.sum() == min(crop[0], H) * min(crop[1], W)
        assert torch.equal(image_ids(out["image"])[valid], sem[valid])
        assert torch.equal(out["depth"][0][valid], sem[valid].float() + 1)
        assert (out["depth"][0][~valid] == 0).all() and (out["normals"][:, ~valid] == 0).all()
        flipped = bool(out["normals"][0][valid][0] < 0)
        flips.add(flipped)
        # Normals follow the mirror: x negated exactly when flipped, other components untouched.
        src_u = (sem[valid] % W).float()
        sign = -1.0 if flipped else 1.0
        assert torch.allclose(out["normals"][0][valid], sign * (src_u + 1) / 100)
        assert torch.allclose(out["normals"][1][valid], sem[valid].float() / 1e4)
        # The 3-D point seen at a source pixel projects, through the new intrinsics, onto the output pixel.
        vs, us = torch.nonzero(valid, as_tuple=True)
        src = torch.stack([src_u, (sem[valid] // W).float()], 1)
        points = backproject(torch.tensor(K), src)
        if flipped:
            points[:, 0] = -points[:, 0]  # a mirrored image is the mirrored scene
        uv = project(out["intrinsics"], points)
        assert torch.allclose(uv, torch.stack([us, vs], 1).float(), atol=1e-4)
    assert flips == {True, False}


@pytest.mark.parametrize("s", [2.0, 0.5, 1.37, 0.61])
def test_resize_intrinsics_match_nearest_pixels(s: float) -> None:
    size = (round(H * s), round(W * s))
    out = resize_sample(pattern_sample(), size)
    sx, sy = size[1] / W, size[0] / H
    sem = out["semseg"] - OFF
    assert sem.shape == size and torch.equal(out["depth"][0], sem.float() + 1)  # same nearest pixels
    vs, us = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    src = torch.stack([(sem % W).flatten(), (sem // W).flatten()], 1).float()
    uv = project(out["intrinsics"], backproject(torch.tensor(K), src))
    du, dv = uv[:, 0] - us.flatten(), uv[:, 1] - vs.flatten()
    # Nearest picks a source pixel within half a source pixel of the exact position.
    assert du.abs().max() <= 0.5 * sx + 1e-4 and dv.abs().max() <= 0.5 * sy + 1e-4
    if s > 1:
        assert abs(du.mean()) < 0.05 and abs(dv.mean()) < 0.05  # pixel-centre convention: no half-pixel bias
    assert torch.equal(out["depth"].unique(), (sem.unique().float() + 1))  # depth values are never blended


@pytest.mark.parametrize("s", [1.37, 0.61, 2.0])
def test_scaled_label_edges_align_with_image_edges(s: float) -> None:
    cut = 13
    image = torch.zeros(3, H, W)
    image[:, :, cut:] = 1.0
    semseg = torch.zeros(H, W, dtype=torch.long)
    semseg[:, cut:] = 1
    depth = torch.where(semseg.bool(), 2.0, 1.0)[None]
    size = (round(H * s), round(W * s))
    out = resize_sample({"image": image, "semseg": semseg, "depth": depth}, size)
    sx = size[1] / W
    label_edge = int((out["semseg"][0] == 1).nonzero()[0])
    image_edge = int((out["image"][0, 0] > 0.5).nonzero()[0])
    assert (out["semseg"] == out["semseg"][0]).all()  # every row identical
    assert abs(label_edge - cut * sx) <= 0.5 + 1e-6  # the boundary x = cut - 0.5 maps to cut * sx - 0.5
    assert abs(image_edge - label_edge) <= 1
    assert int((out["depth"][0, 0] == 2.0).nonzero()[0]) == label_edge
    assert set(out["semseg"].unique().tolist()) == {0, 1} and set(out["depth"].unique().tolist()) == {
        1.0,
        2.0,
    }


def test_crop_pads_with_each_keys_fill() -> None:
    out = crop_sample(pattern_sample(), top=-3, left=-5, height=H + 6, width=W + 10)
    pad = torch.ones(H + 6, W + 10, dtype=torch.bool)
    pad[3 : 3 + H, 5 : 5 + W] = False
    assert (out["semseg"][pad] == 255).all() and (out["depth"][0][pad] == 0).all()
    assert (out["image"][:, pad] == 0).all() and (out["normals"][:, pad] == 0).all()
    assert torch.equal(out["semseg"][~pad].reshape(H, W), pattern_sample()["semseg"])
    assert torch.allclose(out["intrinsics"], torch.tensor([K[0], K[1], K[2] + 5, K[3] + 3]))
    # Small image, random crop: the image is padded black (the model normalises its RGB itself).
    torch.manual_seed(0)
    t = build_transforms(train=True, crop=(30, 40), scale_range=(0.5, 0.5), hflip=False, color_jitter=0.0)
    out = t(pattern_sample())
    pad = out["semseg"] == 255
    assert pad.sum() == 30 * 40 - 10 * 15
    black = torch.zeros(3)
    assert torch.allclose(out["image"][:, pad], black[:, None].expand(3, int(pad.sum())))


def test_hflip_intrinsics_and_normals() -> None:
    out = hflip_sample(pattern_sample())
    assert torch.equal(out["semseg"], pattern_sample()["semseg"].flip(-1))
    assert torch.allclose(out["normals"][0], -pattern_sample()["normals"][0].flip(-1))
    assert torch.allclose(out["intrinsics"], torch.tensor([K[0], K[1], W - 1 - K[2], K[3]]))


def test_unknown_intrinsics_stay_zero_and_colour_jitter_touches_image_only() -> None:
    sample = pattern_sample()
    sample["intrinsics"], sample["has_intrinsics"] = torch.zeros(4), False
    torch.manual_seed(0)
    out = build_transforms(train=True, crop=(10, 10), scale_range=(0.8, 1.2))(sample)
    assert torch.equal(out["intrinsics"], torch.zeros(4))
    torch.manual_seed(0)
    t = build_transforms(train=True, crop=None, scale_range=(1.0, 1.0), hflip=False, color_jitter=0.5)
    out = t(pattern_sample())
    assert torch.equal(out["semseg"], pattern_sample()["semseg"])
    assert torch.equal(out["depth"], pattern_sample()["depth"])
    assert not torch.allclose(out["image"], pattern_sample()["image"], atol=1e-3)


def test_eval_transform_resizes_by_base_scale_only() -> None:
    t = build_transforms(train=False, crop=(8, 8), base_scale=0.5)
    a, b = t(pattern_sample()), t(pattern_sample())
    assert a["image"].shape == (3, H // 2, W // 2) and torch.equal(a["image"], b["image"])
    assert torch.allclose(
        a["intrinsics"], torch.tensor([K[0] / 2, K[1] / 2, (K[2] + 0.5) / 2 - 0.5, (K[3] + 0.5) / 2 - 0.5])
    )
    full = build_transforms(train=False, crop=None)(pattern_sample())
    assert torch.allclose(full["image"], pattern_sample()["image"], atol=1e-6)
    torch.manual_seed(1)
    phase = build_transforms(train=True, crop=(16, 24), scale_range=(1.0, 1.0), base_scale=0.5)
    assert phase(pattern_sample())["semseg"].shape == (8, 12)


def test_pipeline_keeps_rgb_in_unit_range() -> None:
    """Samples carry RGB in [0, 1] unnormalised: the model owns its normalisation (see test_models)."""
    full = build_transforms(train=False, crop=None)(pattern_sample())
    assert torch.equal(full["image"], pattern_sample()["image"])
    assert float(full["image"].min()) >= 0.0 and float(full["image"].max()) <= 1.0


def test_dataloader_with_folder_dataset(tmp_path) -> None:
    write_dataset_json(
        tmp_path,
        name="t",
        tasks=["semseg", "depth"],
        classes=["a", "b"],
        palette=[[0, 0, 0], [255, 255, 255]],
        splits=["train"],
        depth_max=10.0,
    )
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(20, 30), (26, 22), (18, 40)]):
        write_sample(
            tmp_path,
            "train",
            f"{i}",
            rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
            semseg=rng.integers(0, 2, (h, w)).astype(np.uint8),
            depth=rng.uniform(1, 9, (h, w)),
            meta={"intrinsics": [20.0, 20.0, w / 2, h / 2]},
        )
    t = build_transforms(train=True, crop=(16, 16))
    batch = next(iter(DataLoader(FolderDataset(tmp_path, "train", transform=t), batch_size=3)))
    assert batch["image"].shape == (3, 3, 16, 16) and batch["semseg"].shape == (3, 16, 16)
    assert batch["depth"].shape == (3, 1, 16, 16) and batch["intrinsics"].shape == (3, 4)
    assert set(batch["semseg"].unique().tolist()) <= {0, 1, 255}
    assert (
        batch["depth"][batch["semseg"][:, None] == 255] == 0
    ).all()  # padding is ignore and invalid together
