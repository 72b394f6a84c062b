"""The objects task: target encoding, decoding, losses, box transforms, metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from densemtl.data.objects import boxes_from_instances
from densemtl.data.transforms import crop_sample, hflip_sample, resize_sample
from densemtl.tasks.objects import OBJECTS
from densemtl.tasks.objects_codec import (
    COL,
    EXTRA_CHANNELS,
    FIELDS,
    FOCAL_REF_PX,
    MAX_OBJECTS,
    STRIDE,
    YAW_BINS,
    decode,
    default_focal,
    encode_heatmap,
    grid_size,
    ignore_regions,
    regression_targets,
    trainable,
)
from densemtl.tasks.objects_head import ObjectsHead, ObjectsLoss, focal_loss
from densemtl.tasks.objects_metrics import ObjectsMetrics, ignored, nuscenes_ap

K = 2  # car, person


def row(cls: int, box, distance: float = 0.0, box3d=None) -> np.ndarray:
    """One target row; box3d = (centre xyz, size lwh, yaw)."""
    r = np.zeros(len(FIELDS), np.float32)
    r[COL["class"]] = cls
    r[COL["x0"] : COL["y1"] + 1] = box
    r[COL["distance"]] = distance
    r[COL["visible"]] = 1.0
    if box3d is not None:
        centre, size, yaw = box3d
        r[COL["cx3"] : COL["cz3"] + 1] = centre
        r[COL["l"] : COL["h"] + 1] = size
        r[COL["yaw"]], r[COL["has3d"]] = yaw, 1.0
        r[COL["distance"]] = centre[2]
    return r


def padded(*rows: np.ndarray, focal: float = 0.0) -> torch.Tensor:
    """A packed target; ``focal``: the image's focal length in every row (0: none)."""
    out = torch.zeros(MAX_OBJECTS, len(FIELDS))
    out[:, COL["class"]] = -1
    for i, r in enumerate(rows):
        out[i] = torch.from_numpy(r)
    out[:, COL["focal"]] = focal
    return out


def perfect_raw(target: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The raw output that a perfect head would give for padded targets (B, N, FIELDS): the heatmaps, and at every
    cell inside a box (the box centred there, else the smaller box where two overlap) that box's edges and
    attributes."""
    b = target.shape[0]
    heat = encode_heatmap(target, K, grid).clamp(1e-6, 1 - 1e-6)
    raw = torch.zeros(b, K + EXTRA_CHANNELS, *grid)
    raw[:, :K] = torch.log(heat / (1 - heat))
    raw[:, K + 11 : K + 14 : 2] = 1.0  # residual (sin 0, cos 0)
    cy = (torch.arange(grid[0]) + 0.5) * STRIDE
    cx = (torch.arange(grid[1]) + 0.5) * STRIDE
    for i in range(b):
        rows = target[i][target[i, :, 0] >= 0]
        area = (rows[:, 3] - rows[:, 1]) * (rows[:, 4] - rows[:, 2])
        for centres_only in (False, True):  # every cell inside, then the centre cells over them
            for r in rows[area.argsort(descending=True)]:
                _perfect_regression(raw[i, K:], r, cy, cx, centres_only)
    return raw


def _perfect_regression(reg: torch.Tensor, r: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, centre: bool) -> None:
    """Write row ``r``'s edges and attributes into ``reg`` (14, h, w) at its box's cells (``centre``: its centre
    cell only)."""
    iy = int(((r[2] + r[4]) / (2 * STRIDE)).floor())
    ix = int(((r[1] + r[3]) / (2 * STRIDE)).floor())
    ys = torch.tensor([iy]) if centre else torch.nonzero((cy > r[2]) & (cy < r[4])).flatten()
    xs = torch.tensor([ix]) if centre else torch.nonzero((cx > r[1]) & (cx < r[3])).flatten()
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    for y, x in zip(yy.flatten().tolist(), xx.flatten().tolist(), strict=True):
        edges = torch.stack([cx[x] - r[1], cy[y] - r[2], r[3] - cx[x], r[4] - cy[y]]) / STRIDE
        reg[0:4, y, x] = edges.clamp_min(1e-3).log()
        focal = float(r[COL["focal"]]) if r[COL["focal"]] > 0 else FOCAL_REF_PX
        reg[4, y, x] = (r[COL["distance"]] * FOCAL_REF_PX / focal).clamp_min(1e-3).log()
        reg[5:8, y, x] = r[COL["l"] : COL["h"] + 1].clamp_min(1e-3).log()
        yaw = float(r[COL["yaw"]])
        bin_ = int(yaw >= 0)
        reg[8:10, y, x] = torch.tensor([5.0, 0.0] if bin_ == 0 else [0.0, 5.0])
        res = yaw - YAW_BINS[bin_]
        reg[10 + 2 * bin_, y, x], reg[11 + 2 * bin_, y, x] = math.sin(res), math.cos(res)


def test_a_box_splats_its_peak_at_its_centre_on_its_class_map() -> None:
    target = padded(row(1, [40, 20, 60, 52]))  # person, centre (50, 36) px
    grid = grid_size(64, 96)
    iy, ix = 36 // STRIDE, 50 // STRIDE  # the cell holding the centre
    heat = encode_heatmap(target[None], K, grid)
    assert heat.shape == (1, K, *grid)
    assert heat[0, 1, iy, ix] == 1.0
    assert int(heat[0, 1].argmax()) == iy * grid[1] + ix
    assert float(heat[0, 1].max()) == 1.0 and int((heat[0, 1] == 1.0).sum()) == 1
    assert float(heat[0, 0].max()) == 0.0  # the car map stays empty
    assert 0 < float(heat[0, 1, iy, ix + 1]) < 1 and float(heat[0, 1, 0, 0]) < 1e-3  # a Gaussian around it


def test_encode_then_decode_returns_the_boxes_distance_and_3d_box() -> None:
    a = row(0, [10.5, 30.0, 70.25, 61.0], box3d=((1.0, 1.2, 12.5), (4.2, 1.8, 1.5), -1.3))
    b = row(1, [100.0, 8.0, 113.0, 48.0], box3d=((-2.0, 0.9, 7.0), (0.6, 0.5, 1.7), 2.0))
    target = padded(a, b, focal=150.0)[None]
    grid = grid_size(64, 128)
    det = decode(perfect_raw(target, grid), K, threshold=0.5, focal=target[:, 0, COL["focal"]])
    assert int(det["count"][0]) == 2
    order = det["classes"][0, :2].argsort()
    boxes = det["boxes"][0, :2][order]
    assert torch.allclose(boxes, torch.from_numpy(np.stack([a[1:5], b[1:5]])), atol=1e-3)
    assert torch.allclose(det["distance"][0, :2][order], torch.tensor([12.5, 7.0]), rtol=1e-5)
    assert torch.allclose(det["size3d"][0, :2][order], torch.tensor([[4.2, 1.8, 1.5], [0.6, 0.5, 1.7]]), rtol=1e-5)
    assert torch.allclose(det["yaw"][0, :2][order], torch.tensor([-1.3, 2.0]), atol=1e-5)


def test_focal_loss_is_lowest_for_the_target_and_normalised_by_objects() -> None:
    target = padded(row(0, [0, 0, 16, 16]), row(1, [20, 20, 36, 36]))[None]
    heat = encode_heatmap(target, K, grid_size(64, 64))
    good = torch.log(heat.clamp(1e-4, 1 - 1e-4) / (1 - heat.clamp(1e-4, 1 - 1e-4)))
    assert focal_loss(good, heat) < 0.05 < focal_loss(torch.zeros_like(good), heat)
    # Two copies of the image: the same per-object loss (the sum doubles, the object count too).
    assert torch.isclose(focal_loss(torch.cat([good, good]), torch.cat([heat, heat])), focal_loss(good, heat))


def test_objects_loss_masks_samples_and_a_sample_without_objects_has_only_negatives() -> None:
    loss = ObjectsLoss(K)
    target = torch.stack([padded(row(0, [8, 8, 40, 30], 9.0)), padded()])
    raw = torch.zeros(2, K + EXTRA_CHANNELS, *grid_size(64, 64), requires_grad=True)
    none = loss(raw, target, torch.tensor([False, False]))
    none.backward()
    assert float(none.detach()) == 0.0 and float(raw.grad.abs().sum()) == 0.0
    empty = loss(raw, target, torch.tensor([False, True]))  # the file says: no objects here
    assert float(empty.detach()) > 0 and set(loss.last) == {"heat"}
    both = loss(raw, target, torch.tensor([True, True]))
    assert {"heat", "box", "distance", "box3d"} <= set(loss.last)
    assert float(both.detach()) > float(empty.detach())
    perfect = perfect_raw(target[:1], grid_size(64, 64))
    assert float(loss(perfect, target[:1], torch.tensor([True]))) < 0.3 * float(loss(raw[:1].detach(), target[:1], torch.tensor([True])))


@pytest.mark.parametrize("trunks", [1, 2])
def test_head_output_is_the_raw_layout_on_the_objects_grid(trunks: int) -> None:
    head = ObjectsHead(16, K, "separable", 8, trunks=trunks).eval()
    assert (head.reg_trunk is None) == (trunks == 1)
    out = head(torch.randn(2, 16, 16, 24), (62, 94))  # stride-4 features of a 62 x 94 image (16 x 24 cells)
    assert out.shape == (2, K + EXTRA_CHANNELS, *grid_size(62, 94))
    boxes = decode(out, K)["boxes"]
    assert bool((boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all())  # proper boxes
    assert torch.allclose(torch.sigmoid(out[:, :K]).mean(), torch.tensor(0.1), atol=0.05)  # the heat prior
    with pytest.raises(ValueError, match="objects_trunks"):
        ObjectsHead(16, K, trunks=3)


def _sample_with_mask() -> tuple[dict, torch.Tensor]:
    """A sample with one object's instance mask (an irregular blob) and its box from the mask."""
    h, w = 48, 80
    mask = torch.zeros(1, h, w, dtype=torch.int64)
    mask[0, 10:30, 12:40] = 1
    mask[0, 30:37, 20:26] = 1
    box = boxes_from_instances(mask[0].numpy().astype(np.uint16))[1]
    rows = row(0, box, box3d=((2.0, 1.0, 10.0), (4.0, 1.8, 1.5), -1.0))[None]
    sample = {
        "image": torch.rand(3, h, w),
        "objects": OBJECTS.to_sample(rows, (h, w)),
        "intrinsics": torch.tensor([100.0, 100.0, 40.0, 24.0]),
        "has_intrinsics": True,
    }
    return sample, mask


def _box_of(mask: torch.Tensor) -> list[float]:
    return boxes_from_instances(mask[0].numpy().astype(np.uint16))[1]


def test_flipped_and_cropped_boxes_match_the_transformed_instance_mask() -> None:
    sample, mask = _sample_with_mask()
    flipped = hflip_sample(sample)
    got = OBJECTS.pack(flipped["objects"], flipped)
    assert got[0, 1:5].tolist() == _box_of(TF.horizontal_flip(mask))
    assert got[0, COL["cx3"]] == -2.0  # the mirrored world
    assert math.isclose(float(got[0, COL["yaw"]]), math.pi - (-1.0) - 2 * math.pi, abs_tol=1e-6)
    cropped = crop_sample(sample, 15, 20, 30, 50)  # cuts the blob's top-left
    got = OBJECTS.pack(cropped["objects"], cropped)
    assert got[0, 1:5].tolist() == _box_of(TF.crop(mask, 15, 20, 30, 50))
    assert got[0, COL["truncated"]] > 0  # part of the box was cropped away
    assert got[0, COL["cx"]] == 40.0 - 20  # the principal point moved with the window
    zoomed = resize_sample(sample, (96, 160))
    got = OBJECTS.pack(zoomed["objects"], zoomed)
    assert got[0, 1:5].tolist() == [2 * v for v in _box_of(mask)]
    assert got[0, COL["distance"]] == 10.0  # a zoom keeps metric distances
    assert got[0, COL["focal"]] == 200.0 and got[0, COL["fx"]] == 200.0  # ... and doubles the focal length


def test_the_distance_is_learned_per_focal_length_so_a_zoom_keeps_its_decoded_metres() -> None:
    """A zoomed image shows the same car twice as large: its target (distance at the reference focal length)
    halves, and decoding with the zoomed image's focal length gives back the same metres. Without intrinsics the
    assumed camera's focal length follows the zoom the same way."""
    sample, _ = _sample_with_mask()
    plain = OBJECTS.pack(sample["objects"], sample)[None]
    zoomed = resize_sample(sample, (96, 160))
    big = OBJECTS.pack(zoomed["objects"], zoomed)[None]
    d_plain = regression_targets(plain, grid_size(48, 80))["log_distance"][0]
    d_big = regression_targets(big, grid_size(96, 160))["log_distance"][0]
    assert math.isclose(float(d_plain), math.log(10.0 * FOCAL_REF_PX / 100.0), rel_tol=1e-6)
    assert math.isclose(float(d_plain - d_big), math.log(2.0), rel_tol=1e-5)
    det = decode(perfect_raw(big, grid_size(96, 160)), K, threshold=0.5, focal=big[:, 0, COL["focal"]])
    assert math.isclose(float(det["distance"][0, 0]), 10.0, rel_tol=1e-5)
    unknown = {**sample, "has_intrinsics": False, "intrinsics": torch.zeros(4)}
    assumed = OBJECTS.pack(resize_sample(unknown, (96, 160))["objects"], {})
    assert math.isclose(float(assumed[0, COL["focal"]]), 2 * default_focal(80), rel_tol=1e-6)
    assert float(assumed[5, COL["focal"]]) == float(assumed[0, COL["focal"]])  # the padding rows too


def test_boxes_cropped_away_or_too_small_are_dropped() -> None:
    sample, _ = _sample_with_mask()
    away = crop_sample(sample, 0, 45, 48, 35)  # the window right of the blob
    assert int((OBJECTS.pack(away["objects"], away)[:, 0] >= 0).sum()) == 0
    sliver = crop_sample(sample, 0, 38, 48, 42)  # keeps a 2-pixel-wide sliver of a 28-pixel-wide box
    assert int((OBJECTS.pack(sliver["objects"], sliver)[:, 0] >= 0).sum()) == 0


def test_flip_output_maps_a_mirrored_prediction_back() -> None:
    target = padded(row(0, [10.0, 12.0, 31.0, 40.0], box3d=((1.0, 1.0, 9.0), (4.0, 1.8, 1.5), -1.2)))[None]
    grid = grid_size(64, 64)
    sample = {"image": torch.rand(3, 64, 64), "objects": OBJECTS.to_sample(target[0, :1].numpy(), (64, 64))}
    mirrored = OBJECTS.pack(hflip_sample(sample)["objects"], {})[None]
    back = decode(OBJECTS.flip_output(perfect_raw(mirrored, grid)), K, threshold=0.5)
    assert torch.allclose(back["boxes"][0, 0], target[0, 0, 1:5], atol=1e-4)
    assert math.isclose(float(back["yaw"][0, 0]), -1.2, abs_tol=1e-5)


def test_upsample_keeps_boxes_in_image_pixels() -> None:
    target = padded(row(0, [16.0, 12.0, 48.0, 36.0], 20.0), focal=90.0)[None]  # in a 64 x 128 image
    small = perfect_raw(target, grid_size(64, 128))
    big = OBJECTS.upsample(small, (128, 256))  # the same scene seen at twice the resolution (focal 180 px)
    det = decode(big, K, threshold=0.3, focal=torch.tensor([180.0]))
    assert int(det["count"][0]) == 1
    # the same detections as on the source grid, down to the faintest peak
    assert int(decode(big, K, threshold=1e-4)["count"][0]) == int(decode(small, K, threshold=1e-4)["count"][0])
    assert torch.allclose(det["boxes"][0, 0], 2 * target[0, 0, 1:5], atol=2.0)
    assert math.isclose(float(det["distance"][0, 0]), 20.0, rel_tol=1e-4)


def test_nuscenes_ap_by_hand() -> None:
    # 2 ground truths, detections by score: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    ap = nuscenes_ap(np.array([True, False, True]), np.array([0.9, 0.8, 0.7]), 2)
    points = np.linspace(0, 1, 101)
    interp = np.where(points <= 0.5, 1.0, 2 / 3)
    expected = np.clip(interp[points > 0.1 + 1e-9] - 0.1, 0, None).mean() / 0.9
    assert math.isclose(ap, expected, rel_tol=1e-9)
    assert math.isnan(nuscenes_ap(np.array([], bool), np.array([]), 0))


def _det(boxes, scores, classes, distance) -> torch.Tensor:
    """A raw map whose decoding gives exactly these detections (each in its own cell)."""
    target = padded(*[row(c, b, d) for b, c, d in zip(boxes, classes, distance, strict=True)])[None]
    raw = perfect_raw(target, grid_size(128, 128))
    raw[:, :K] = -20.0
    for b, s, c in zip(boxes, scores, classes, strict=True):
        cx, cy = (b[0] + b[2]) / (2 * STRIDE), (b[1] + b[3]) / (2 * STRIDE)
        raw[0, c, int(cy), int(cx)] = math.log(s / (1 - s))
    return raw


def test_metrics_on_a_hand_made_case() -> None:
    """Two cars and one person; detections: car hit (IoU 1), car duplicate-ish miss (IoU < .5), person hit.

    COCO AP50 for cars: detections by score hit (P=1, R=.5), miss; the second car is never found: precision 1
    at the 51 recall points 0, 0.01, ..., 0.5 of COCO's 101 and 0 above, AP = 51/101. Person AP50 = 1.
    Distances of matched objects: car 11 m for 10 m, person 4.5 m for 5 m -> rel. errors 0.1 and 0.1.
    """
    gt = padded(row(0, [0, 0, 40, 40], 10.0), row(0, [64, 64, 104, 100], 20.0), row(1, [120, 8, 128, 40], 5.0))
    pred = _det(
        [[0, 0, 40, 40], [60, 0, 100, 30], [120, 8, 128, 40]], [0.9, 0.8, 0.7], [0, 0, 1], [11.0, 30.0, 4.5]
    )
    m = ObjectsMetrics(["car", "person"], score_threshold=0.3)
    m.update(pred, gt[None])
    r = m.compute()
    assert math.isclose(r["ap50_car"], 51 / 101, abs_tol=1e-6)
    assert math.isclose(r["ap50_person"], 1.0, abs_tol=1e-6)
    assert math.isclose(r["ap50"], (51 / 101 + 1) / 2, abs_tol=1e-6)
    assert r["matched"] == 2
    assert math.isclose(r["distance_relerr"], 0.1, rel_tol=1e-4)
    assert r["distance_delta1"] == 1.0
    assert r["gt_objects"] == 3 and len(r["pr_car"]) == 101
    # merge: the same case twice gives the same AP and twice the matches
    other = ObjectsMetrics(["car", "person"])
    other.update(pred, gt[None])
    m.merge(other)
    r2 = m.compute()
    assert math.isclose(r2["ap50"], r["ap50"], abs_tol=1e-6) and r2["matched"] == 4


def test_empty_metrics_have_every_key() -> None:
    r = ObjectsMetrics(["car", "person"]).compute()
    assert {"map", "ap50", "ap75", "ap50_car", "ap50_person", "distance_relerr", "bev_ap"} <= set(r)
    assert math.isnan(r["ap50"])


@pytest.mark.parametrize("bad", ["not json", '{"objects": [{"id": 1}]}'])
def test_a_bad_objects_file_is_an_error_naming_it(tmp_path, bad: str) -> None:
    from densemtl.data.format import DatasetFormatError

    path = tmp_path / "000001.json"
    path.write_text(bad)
    with pytest.raises(DatasetFormatError, match="000001.json"):
        OBJECTS.load(path, (32, 32), {"object_classes": ["car"]})
    with pytest.raises(DatasetFormatError, match="object_classes"):
        OBJECTS.load(path, (32, 32), {})


@pytest.mark.parametrize(("distance", "expected"), [(10.3, 1.0), (11.5, 0.5)])
def test_bev_centre_ap_by_hand(distance: float, expected: float) -> None:
    """One car at X = 1 m, Z = 10 m (fx 100, cx 64): a detection whose box centre ray is x = 1 / 10 at ``distance``
    is 0.3 m off (within all four thresholds: AP 1) or 1.5 m off (within 2 and 4 m only: mean 0.5)."""
    gt = padded(row(0, [64.5, 40, 84.5, 60], box3d=((1.0, 1.0, 10.0), (4.0, 1.8, 1.5), 0.0)))
    gt[:, COL["fx"]], gt[:, COL["cx"]] = 100.0, 64.0
    pred = _det([[64.5, 40, 84.5, 60]], [0.9], [0], [distance])  # u = 74.5 edges -> 74 in pixel centres
    m = ObjectsMetrics(["car", "person"])
    m.update(pred, gt[None])
    r = m.compute()
    x = (74.0 - 64.0) * distance / 100.0
    off = math.hypot(x - 1.0, distance - 10.0)
    assert (off < 0.5) == (expected == 1.0)
    assert math.isclose(r["bev_ap_car"], expected, abs_tol=1e-9)
    assert math.isnan(r["bev_ap_person"]) and math.isclose(r["bev_ap"], expected, abs_tol=1e-9)


def test_a_plateau_of_equal_scores_is_one_detection_and_upsampling_keeps_it_one() -> None:
    raw = torch.zeros(1, K + EXTRA_CHANNELS, 16, 16)
    raw[:, :K] = -10.0
    raw[0, 0, 4:7, 5:9] = 2.0  # a flat 3 x 4 patch: every cell is its 3x3 maximum
    raw[0, 1, 12, 12] = 1.0  # and a single peak on the other class
    assert int(decode(raw, K, threshold=0.5)["count"][0]) == 2
    for size in ((128, 128), (256, 256)):  # x2 and x4: an upsampled peak stays one peak
        assert int(decode(OBJECTS.upsample(raw, size), K, threshold=0.5)["count"][0]) == 2


def test_baseline_statistics_do_not_read_objects_files(tmp_path) -> None:
    """Objects has no trivial baseline, so evaluation's baseline pass never opens its training files (a broken
    one would otherwise stop every evaluation, and 200 JSON reads are wasted)."""
    from dataclasses import replace

    from densemtl.config import Config, DataConfig, ModelConfig
    from densemtl.data.format import read_dataset_json
    from densemtl.evaluation import training_statistics
    from densemtl.synth.generate import generate_dataset
    from densemtl.tasks import TASKS
    from densemtl.train.engine import resolve_config

    generate_dataset(tmp_path, n_train=3, n_val=1, size=(32, 64), seed=1, workers=1, progress=False)
    for f in (tmp_path / "train" / OBJECTS.folder).iterdir():
        f.write_text("not json")
    semseg = next(t for t in TASKS if TASKS[t].uses_classes)
    cfg = replace(Config(), data=DataConfig(root=str(tmp_path)), model=ModelConfig(tasks=(semseg, OBJECTS.name)))
    stats = training_statistics(resolve_config(cfg, read_dataset_json(tmp_path)))
    assert set(stats) == {semseg}


def test_predictions_scale_with_the_given_focal_length_and_say_which_camera_they_assume() -> None:
    """``to_numpy`` decodes distances for the camera it is told (``Predictor.predict(focal_px=...)``): twice the
    focal length, twice the metres for the same pixels; without one, the assumed 70-degree camera, and the
    ``<id>_objects.json`` document says which."""
    info = {"object_classes": ["car", "person"]}
    target = padded(row(0, [16.0, 12.0, 48.0, 36.0], 20.0), focal=90.0)[None]  # a 64 x 128 image
    raw = perfect_raw(target, grid_size(64, 128))
    given = OBJECTS.to_numpy(raw, info, focal_px=90.0)
    assert np.allclose(given["objects_distance"], [20.0], rtol=1e-5)
    assert np.allclose(OBJECTS.to_numpy(raw, info, focal_px=180.0)["objects_distance"], [40.0], rtol=1e-5)
    assumed = OBJECTS.to_numpy(raw, info)
    assert np.allclose(assumed["objects_distance"], [20.0 * default_focal(128) / 90.0], rtol=1e-5)
    doc = OBJECTS.documents(assumed, info)["objects"]
    assert doc["distance_camera"].startswith("assumed") and doc["distance_focal_px"] == round(default_focal(128), 3)
    assert OBJECTS.documents(given, info)["objects"]["distance_camera"] == "given"


def test_the_benchmark_error_analysis_puts_each_confident_detection_in_one_category() -> None:
    """benchmarks/objects_errors.py on a hand-made image: a hit, its duplicate, a box half inside an object left
    out of scoring, a too-small box on a second car, a box on nothing; recall by height counts scored objects."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "objects_errors.py"
    spec = importlib.util.spec_from_file_location("objects_errors", path)
    errors_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(errors_mod)
    gt = torch.tensor([[0.0, 0, 40, 20], [100, 0, 140, 40], [200, 0, 260, 60]])  # 20, 40, 60 px high
    skip = torch.tensor([False, False, True])
    det = torch.tensor([[0.0, 0, 40, 20], [2, 0, 40, 20], [210, 10, 250, 50], [100, 0, 120, 20], [300, 0, 320, 20]])
    e = errors_mod.DetectionErrors(["car"])
    e.add(det, torch.tensor([0.9, 0.8, 0.7, 0.6, 0.55]), torch.zeros(5, dtype=torch.long), gt, torch.zeros(3,
          dtype=torch.long), skip)  # fmt: skip
    s = e.summary()["car"]
    assert s["confident"] == {"hit": 1, "duplicate": 1, "on_ignored": 1, "mislocalised": 1, "background": 1}
    assert s["mislocalised_area_ratio_median"] == pytest.approx(0.25)
    bands = {b["from_px"]: b for b in s["recall_by_height"]}
    assert bands[16]["n"] == 1 and bands[16]["recall"] == 1.0  # the 20-px car was found
    assert bands[32]["n"] == 1 and bands[32]["recall"] == 0.0 and bands[32]["mean_best_iou"] == pytest.approx(0.25)
    assert sum(b["n"] for b in s["recall_by_height"]) == 2  # the ignored one is not scored
    # Centre cells: two cars centred one 4-px cell apart are crowded; the second's centre cell regresses the
    # first's box (IoU 0.45 with its own: wrong); the far one is alone and its centre cell right.
    gt = torch.tensor([[0.0, 0, 16, 16], [6, 0, 22, 16], [100, 0, 140, 40]])
    centre = torch.tensor([[0.0, 0, 16, 16], [0, 0, 16, 16], [100, 0, 140, 40]])
    e = errors_mod.DetectionErrors(["car"])
    none = torch.zeros(3, dtype=torch.long)
    e.add(gt[:1], torch.tensor([0.9]), none[:1], gt, none, torch.zeros(3, dtype=torch.bool), centre, 4.0)
    s = e.summary()["car"]
    assert s["crowded"] == pytest.approx(2 / 3) and s["centre_box_ok"] == pytest.approx(2 / 3)
    assert s["recall_crowded"] == 0.5 and s["recall_alone"] == 0.0
    # ... and the centre-cell boxes of a perfect head are the objects' boxes
    target = padded(row(0, [10.0, 12.0, 31.0, 40.0]), row(1, [40.0, 8.0, 60.0, 30.0]))[None]
    boxes = errors_mod.centre_cell_boxes(perfect_raw(target, grid_size(64, 64))[0], target[0, :2, 1:5])
    assert torch.allclose(boxes, target[0, :2, 1:5], atol=1e-4)


def test_a_cell_regresses_the_object_centred_there_before_a_smaller_one_covering_it() -> None:
    """TTFNet gives a cell two objects claim to the smaller; an object's own centre cell, where decoding reads its
    box, stays its own even when a smaller object in front covers it (a row of parked cars)."""
    big, small = row(0, [6.0, 6.0, 54.0, 46.0]), row(0, [22.0, 14.0, 46.0, 38.0])  # centres (30, 26), (34, 26)
    target = padded(big, small)[None]
    where = regression_targets(target, grid_size(64, 64))
    at = lambda x, y: (where["ix"] == int(x // STRIDE)) & (where["iy"] == int(y // STRIDE))  # noqa: E731
    assert where["box"][at(30, 26)].tolist() == [big[1:5].tolist()]  # big's centre, inside small's box
    assert where["box"][at(34, 26)].tolist() == [small[1:5].tolist()]  # small's centre
    assert where["box"][at(38, 26)].tolist() == [small[1:5].tolist()]  # near both centres: the smaller


def test_training_learns_the_objects_evaluation_scores_and_ignores_the_rest() -> None:
    """An object the metrics leave out (under 1/16 of the image high, under 30 % visible or over 30 % truncated)
    is an ignore region in training too: no positive on the heatmap, no regression, and its cells are not
    background; a scored object is learned."""
    learned = row(0, [8.0, 8.0, 40.0, 24.0])  # 16 px high in a 128-px image: 1/8
    short = row(0, [60.0, 8.0, 80.0, 14.0])  # 6 px: more than a cell, less than 1/16 of 128 px
    hidden = row(1, [90.0, 40.0, 100.0, 80.0])
    hidden[COL["visible"]] = 0.25
    cut = row(0, [8.0, 60.0, 40.0, 90.0])
    cut[COL["truncated"]] = 0.4
    target = padded(learned, short, hidden, cut)[None]
    grid = grid_size(128, 128)
    heat, ignore = encode_heatmap(target, K, grid), ignore_regions(target, K, grid)
    assert int((heat == 1.0).sum()) == 1 and float(heat[0, 0, 16 // STRIDE, 24 // STRIDE]) == 1.0
    assert bool(ignore[0, 0, 11 // STRIDE, 70 // STRIDE]) and bool(ignore[0, 1, 60 // STRIDE, 95 // STRIDE])
    assert bool(ignore[0, 0, 75 // STRIDE, 24 // STRIDE]) and not bool(ignore[0, 0, 16 // STRIDE, 24 // STRIDE])
    assert {tuple(b) for b in regression_targets(target, grid)["box"].tolist()} == {tuple(learned[1:5].tolist())}
    # the metrics score exactly the objects training learns
    rows = target[0, :4]
    assert ignored(rows, 128).tolist() == [False, True, True, True]
    assert trainable(rows, 128).tolist() == [True, False, False, False]
    # the same 6-px object in a 64-px image is 1/11 of it high: scored and learned
    assert trainable(rows[1:2], 64).tolist() == [True]


def test_the_objects_loss_terms_are_configurable_and_unknown_ones_refused() -> None:
    from densemtl.config import load_config
    from densemtl.tasks import TASKS

    cfg = load_config(None, ["model.tasks=[objects]", "model.object_classes=[car]", "loss.objects_terms.heat=2"])
    assert TASKS["objects"].make_loss(cfg).weights == {"heat": 2.0, "box": 5.0, "distance": 1.0, "box3d": 0.5}
    with pytest.raises(ValueError, match=r"unknown term\(s\) \['size'\]"):
        ObjectsLoss(K, {"size": 1.0})
