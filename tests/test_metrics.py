"""Dataset-level metrics against hand-computed cases, torchmetrics, merging, and the multi-task Δm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torchmetrics.classification import MulticlassJaccardIndex

from densemtl.config import Config, DataConfig, ModelConfig
from densemtl.metrics import (
    LOWER_IS_BETTER,
    MultiTaskMetrics,
    build_metrics,
    delta_m,
    load_metrics_json,
    summarize,
)
from densemtl.tasks.depth_metrics import DepthMetrics
from densemtl.tasks.semseg import SegMetrics


def _multitask(classes: list[str] | None = None, max_depth: float = 80.0) -> MultiTaskMetrics:
    """Semseg (3 classes) + depth metrics as training builds them (``build_metrics``)."""
    cfg = Config(
        model=ModelConfig(tasks=("semseg", "depth"), num_classes=3), data=DataConfig(eval_depth_max=max_depth)
    )
    return build_metrics(cfg, {"classes": classes or []})


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "profile"}


# 2x3 image, 3 classes; the last pixel is ignored (its prediction 2 must not count)
SEG_GT = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
SEG_PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
# counted (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0)


def test_seg_hand_example() -> None:
    m = SegMetrics(3)
    m.update(SEG_PRED, SEG_GT)
    r = m.compute()
    # class 0: tp 1, gt 2, pred 2 -> iou 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 0, gt 1, pred 0 -> 0
    assert r["iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert r["dice"] == pytest.approx((2 / 4 + 4 / 5 + 0) / 3)
    assert r["pixels"] == 5
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_seg_logits_give_the_same_as_ids() -> None:
    logits = torch.nn.functional.one_hot(SEG_PRED, 3).permute(0, 3, 1, 2).float()  # (1, 3, 2, 3)
    a, b = SegMetrics(3), SegMetrics(3)
    a.update(SEG_PRED, SEG_GT)
    b.update(logits, SEG_GT)
    assert a.compute() == b.compute()


def test_absent_classes_are_excluded_from_the_means() -> None:
    m = SegMetrics(5, class_names=["road", "car", "sky", "tree", "person"])
    pred = SEG_PRED.clone()
    m.update(pred, SEG_GT)  # classes 3 and 4 appear in neither GT nor prediction
    r = m.compute()
    assert math.isnan(r["iou"][3]) and math.isnan(r["iou"][4])
    assert r["miou"] == pytest.approx(1 / 3) and r["mean_acc"] == pytest.approx(1 / 2)
    assert r["dice"] == pytest.approx((2 / 4 + 4 / 5 + 0) / 3)
    assert r["per_class"]["car"]["iou"] == pytest.approx(2 / 3)
    # a class that is only predicted (a false positive) counts as IoU 0, but not in mean_acc (no GT)
    pred[0, 0, 0] = 3
    m.reset()
    m.update(pred, SEG_GT)
    r = m.compute()
    assert r["iou"][3] == 0.0 and math.isnan(r["recall"][3])
    # class 0 now: tp 0, gt 2, pred 1 -> 0; class 1: 2/3; class 2: 0; class 3: 0
    assert r["miou"] == pytest.approx((0 + 2 / 3 + 0 + 0) / 4)
    assert r["mean_acc"] == pytest.approx((0 + 1 + 0) / 3)


def test_out_of_range_predictions_are_wrong_but_not_false_positives() -> None:
    pred = SEG_PRED.clone()
    pred[0, 0, 0] = 7  # was a correct class-0 prediction
    m = SegMetrics(3)
    m.update(pred, SEG_GT)
    r = m.compute()
    # class 0: tp 0, gt 2, pred 1 (only the pixel of class 2) -> 0; other classes unchanged
    assert r["iou"] == pytest.approx([0.0, 2 / 3, 0.0])
    assert r["pixel_acc"] == pytest.approx(2 / 5) and r["pixels"] == 5


def test_target_ids_out_of_range_are_an_error() -> None:
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        SegMetrics(3).update(SEG_PRED, torch.tensor([[[0, 0, 1], [1, 9, 255]]]))


def test_ignore_pixels_are_excluded() -> None:
    m = SegMetrics(3)
    m.update(SEG_PRED, torch.full_like(SEG_GT, 255))
    r = m.compute()
    assert r["pixels"] == 0 and math.isnan(r["miou"]) and math.isnan(r["pixel_acc"])


def test_miou_matches_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    c = 6
    target = torch.randint(0, c, (4, 16, 16), generator=g)
    noise = torch.randint(0, c, (4, 16, 16), generator=g)
    pred = torch.where(torch.rand(4, 16, 16, generator=g) < 0.6, target, noise)
    target[:, :3] = 255
    ours = SegMetrics(c)
    ref = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="macro")
    for i in range(4):  # batch by batch: dataset-level, not a mean of per-batch values
        ours.update(pred[i : i + 1], target[i : i + 1])
        ref.update(pred[i : i + 1], target[i : i + 1])
    per_class = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="none")(pred, target)
    assert ours.compute()["miou"] == pytest.approx(float(ref.compute()), rel=1e-6)
    assert ours.compute()["iou"] == pytest.approx(per_class.tolist(), rel=1e-6)


# 2x4 depth image; min 0.5 m, max 10 m. Skipped: gt 0 (no measurement), 0.2 (< min), 20 (> max).
# The prediction 16 on a valid pixel is clamped to 10.
DEPTH_GT = torch.tensor([[1.0, 2.0, 4.0, 0.0], [0.2, 20.0, 2.0, 3.0]]).view(1, 1, 2, 4)
DEPTH_PRED = torch.tensor([[1.2, 3.0, 2.2, 9.0], [5.0, 3.0, 16.0, 3.0]]).view(1, 1, 2, 4)
VALID_PAIRS = [(1.2, 1.0), (3.0, 2.0), (2.2, 4.0), (10.0, 2.0), (3.0, 3.0)]  # (pred, gt) written out


def test_depth_hand_example_with_range_filtering() -> None:
    m = DepthMetrics(min_depth=0.5, max_depth=10.0)
    m.update(DEPTH_PRED, DEPTH_GT)
    r = m.compute()
    n = 5
    assert r["pixels"] == n
    # errors p - g: 0.2, 1, -1.8, 8, 0
    assert r["abs_rel"] == pytest.approx((0.2 / 1 + 1 / 2 + 1.8 / 4 + 8 / 2 + 0) / n)
    assert r["sq_rel"] == pytest.approx((0.04 / 1 + 1 / 2 + 3.24 / 4 + 64 / 2 + 0) / n)
    assert r["rmse"] == pytest.approx(math.sqrt((0.04 + 1 + 3.24 + 64 + 0) / n))
    assert r["mae"] == pytest.approx((0.2 + 1 + 1.8 + 8 + 0) / n)
    d = [math.log(1.2), math.log(1.5), math.log(0.55), math.log(5.0), 0.0]
    assert r["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in d) / n))
    assert r["log10"] == pytest.approx(sum(abs(x) for x in d) / math.log(10) / n)
    mean_d, mean_d2 = sum(d) / n, sum(x * x for x in d) / n
    assert r["silog"] == pytest.approx(100 * math.sqrt(mean_d2 - mean_d**2))
    # ratios max(p/g, g/p): 1.2, 1.5, 1.818, 5, 1 -> < 1.25: 2, < 1.5625: 3, < 1.953: 4
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((2 / 5, 3 / 5, 4 / 5))
    assert len(VALID_PAIRS) == n


def test_depth_per_image_differs_from_pooled() -> None:
    gt = torch.zeros(3, 1, 2, 2)
    pred = torch.ones(3, 1, 2, 2)
    gt[0, 0, 0, 0] = 1.0  # image 0: one valid pixel, pred 2 -> abs_rel 1
    pred[0, 0, 0, 0] = 2.0
    gt[1, 0, 0, :] = 1.0  # image 1: three perfect pixels
    gt[1, 0, 1, 0] = 1.0  # image 2: no valid pixel at all (skipped in per-image mode)
    pooled, per_image = DepthMetrics(), DepthMetrics(per_image=True)
    pooled.update(pred, gt)
    per_image.update(pred, gt)
    assert pooled.compute()["abs_rel"] == pytest.approx(1 / 4)
    assert per_image.compute()["abs_rel"] == pytest.approx((1 + 0) / 2)
    assert pooled.compute()["delta1"] == pytest.approx(3 / 4)
    assert per_image.compute()["delta1"] == pytest.approx((0 + 1) / 2)
    assert per_image.compute()["rmse"] == pytest.approx((1 + 0) / 2)
    assert pooled.compute()["rmse"] == pytest.approx(math.sqrt(1 / 4))


def test_depth_nothing_valid_is_nan_not_an_error() -> None:
    m = DepthMetrics()
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    r = m.compute()
    assert r["pixels"] == 0 and math.isnan(r["abs_rel"]) and math.isnan(r["delta1"])


def _random_depth(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(4, 1, 8, 8, generator=g) * 90
    gt[gt < 5] = 0
    pred = gt * torch.exp(0.2 * torch.randn(4, 1, 8, 8, generator=g)) + 0.1
    return pred, gt


@pytest.mark.parametrize("per_image", [False, True])
def test_depth_merge_of_halves_equals_whole(per_image: bool) -> None:
    pred, gt = _random_depth(1)
    whole, a, b = (DepthMetrics(per_image=per_image) for _ in range(3))
    whole.update(pred, gt)
    a.update(pred[:1], gt[:1])
    b.update(pred[1:], gt[1:])
    a.merge(b)
    assert _scalars(a.compute()) == pytest.approx(_scalars(whole.compute()), rel=1e-12)
    assert a.compute()["profile"]["count"] == whole.compute()["profile"]["count"]


def test_seg_merge_of_halves_equals_whole() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.randint(0, 5, (4, 8, 8), generator=g)
    target[0, :2] = 255
    pred = torch.randint(0, 5, (4, 8, 8), generator=g)
    whole, a, b = SegMetrics(5), SegMetrics(5), SegMetrics(5)
    whole.update(pred, target)
    a.update(pred[:3], target[:3])
    b.update(pred[3:], target[3:])
    a.merge(b)
    assert torch.equal(a.state()["confusion"], whole.state()["confusion"])
    assert a.compute() == whole.compute()


def test_all_reduce_is_a_noop_without_distributed_and_sums_with_it(tmp_path: Path) -> None:
    pred, gt = _random_depth(3)
    m = _multitask()
    m.update({"semseg": SEG_PRED, "depth": pred[:1]}, {"semseg": SEG_GT, "depth": gt[:1]})
    before = m.compute()
    m.all_reduce()  # no process group: nothing changes
    assert m.compute() == before
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()  # one process: the sum over processes is the state itself
        assert m.compute() == before
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """One of two processes: each sees half the data, all_reduce gives the whole dataset's metrics."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    pred, gt = _random_depth(5)
    m = _multitask()
    half = slice(0, 1) if rank == 0 else slice(1, 4)
    seg_pred = SEG_PRED if rank == 0 else torch.zeros_like(SEG_PRED)
    m.update({"semseg": seg_pred, "depth": pred[half]}, {"semseg": SEG_GT, "depth": gt[half]})
    m.all_reduce()
    if rank == 0:
        torch.save(m.compute(), out)
    dist.destroy_process_group()


@pytest.mark.slow  # spawning two Python processes that import torch takes ~10 s on a small machine
def test_all_reduce_across_two_processes_equals_one_process(tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    pred, gt = _random_depth(5)
    single = _multitask()
    single.update({"semseg": SEG_PRED, "depth": pred[:1]}, {"semseg": SEG_GT, "depth": gt[:1]})
    single.update(
        {"semseg": torch.zeros_like(SEG_PRED), "depth": pred[1:]}, {"semseg": SEG_GT, "depth": gt[1:]}
    )
    got = torch.load(out, weights_only=False)
    assert got["semseg"] == single.compute()["semseg"]
    assert _scalars(got["depth"]) == pytest.approx(_scalars(single.compute()["depth"]), rel=1e-12)
    want = single.compute()["depth"]["profile"]
    assert got["depth"]["profile"]["count"] == want["count"]
    assert got["depth"]["profile"]["mae"] == pytest.approx(want["mae"], rel=1e-12)


def test_multitask_metrics_skip_unlabelled_samples_and_summarize() -> None:
    pred, gt = _random_depth(4)
    seg_gt = torch.cat([SEG_GT, SEG_GT]).repeat(2, 1, 1)  # (4, 2, 3)
    seg_pred = torch.cat([SEG_PRED, torch.zeros_like(SEG_PRED)]).repeat(2, 1, 1)
    m = _multitask(["a", "b", "c"], max_depth=80.0)
    flags = {
        "semseg": torch.tensor([True, False, True, False]),
        "depth": torch.tensor([True, True, False, False]),
    }
    m.update({"semseg": seg_pred, "depth": pred}, {"semseg": seg_gt, "depth": gt, "valid_tasks": flags})
    res = m.compute()
    seg_alone, depth_alone = SegMetrics(3), DepthMetrics(max_depth=80.0)
    seg_alone.update(SEG_PRED, SEG_GT)  # only the samples flagged as labelled (both hold SEG_PRED)
    depth_alone.update(pred[:2], gt[:2])
    assert res["semseg"]["miou"] == pytest.approx(seg_alone.compute()["miou"])
    assert res["semseg"]["pixels"] == 10
    assert _scalars(res["depth"]) == pytest.approx(_scalars(depth_alone.compute()))
    assert res["depth"]["profile"] == depth_alone.compute()["profile"]
    flat = summarize(res)
    assert flat["semseg/miou"] == pytest.approx(1 / 3) and "depth/abs_rel" in flat and "depth/delta1" in flat
    assert flat["score"] == pytest.approx((res["semseg"]["miou"] + res["depth"]["delta1"]) / 2)
    assert all(isinstance(v, float) for v in flat.values()) and "semseg/iou" not in flat
    assert "depth/pixels" not in flat
    assert MultiTaskMetrics.summarize(res) == flat
    m.reset()
    assert m.compute()["depth"]["pixels"] == 0


def test_delta_m_sign_convention_hand_example() -> None:
    single = {"semseg/miou": 0.50, "depth/abs_rel": 0.10, "depth/rmse": 4.0}
    better = {"semseg/miou": 0.55, "depth/abs_rel": 0.09, "depth/rmse": 4.0}
    # miou +10 %, abs_rel 10 % lower = +10 %, rmse unchanged = 0 -> mean +6.67 %
    assert delta_m(better, single, LOWER_IS_BETTER) == pytest.approx((10 + 10 + 0) / 3)
    worse = {"semseg/miou": 0.45, "depth/abs_rel": 0.12, "depth/rmse": 5.0}
    # miou -10 %, abs_rel +20 % -> -20 %, rmse +25 % -> -25 %
    assert delta_m(worse, single, LOWER_IS_BETTER) == pytest.approx((-10 - 20 - 25) / 3)
    assert delta_m(better, single, LOWER_IS_BETTER, keys=["semseg/miou"]) == pytest.approx(10)
    assert delta_m({"x/err": 2.0}, {"x/err": 1.0}, {"err"}) == pytest.approx(-100)  # custom name
    with pytest.raises(ValueError, match="missing"):
        delta_m({"semseg/miou": 0.5}, single, LOWER_IS_BETTER)


def test_load_metrics_json(tmp_path: Path) -> None:
    flat = {"semseg/miou": 0.5, "depth/abs_rel": 0.1, "score": None}
    (tmp_path / "m.json").write_text(json.dumps(flat))
    got = load_metrics_json(tmp_path / "m.json")
    assert got["semseg/miou"] == 0.5 and math.isnan(got["score"])
    (tmp_path / "s.json").write_text(json.dumps({"summary": {"depth/rmse": 3}, "checkpoint": "best.pt"}))
    assert load_metrics_json(tmp_path / "s.json") == {"depth/rmse": 3.0}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_metrics_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"semseg": {"miou": 0.5}}))
    with pytest.raises(ValueError, match="flat dict"):
        load_metrics_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_metrics_json(tmp_path / "broken.json")
