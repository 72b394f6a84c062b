"""Detection metrics: COCO mAP (torchmetrics + faster-coco-eval), distance errors on matched objects, BEV centre AP.

* Scored ground truth (``objects_codec.scored``): boxes at least 1/16 of the image high, at least 30 % visible and
  at most 30 % truncated (KITTI's "moderate"); the others are ignore regions (COCO ``iscrowd``), counted as
  ``ignored``. Training learns the same objects (``objects_codec.trainable``).
* ``map`` (mAP@[.5:.95]), ``ap50``, ``ap75`` and per class ``ap50_<class>``, ``map_<class>``: torchmetrics'
  ``MeanAveragePrecision`` with the faster-coco-eval backend (COCOeval, not a re-implementation; the same
  numbers as pycocotools, 12x faster), on every decoded detection (top 100 per image). ``pr_<class>``: the
  AP50 precision at recall 0, 0.01, ..., 1.
* Distance, at the operating point (score >= ``score_threshold``): detections are matched to ground truth of
  their class greedily by score at IoU >= 0.5 (COCO's rule); over the matched pairs, ``distance_relerr`` (mean
  ``|d - d*| / d*``) and ``distance_delta1`` (share with ``max(d / d*, d* / d) < 1.25``), per class too. The
  trivial baseline (``*_baseline``) predicts each class's median true distance over those pairs (the
  validation set's own median, which favours it).
* ``bev_ap``: nuScenes' centre-distance AP (Caesar et al. 2020): detections matched to the nearest unmatched
  ground-plane centre (X, Z) within 0.5, 1, 2 and 4 m, AP over recall and precision above 0.1, averaged over
  the thresholds (``bev_ap_<class>`` per class). A detection's centre is its box centre's ray at its distance:
  ``X = (u - cx) Z / fx`` (u: the box centre in the intrinsics' pixel-centre convention) with the sample's intrinsics (samples without intrinsics, or objects without a 3-D
  box, are left out).

The state is the lists of detections and ground truth (not counts): ``merge`` concatenates and
``all_reduce`` gathers them from every process.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchvision.ops import box_iou

from densemtl.tasks.base import Accumulator
from densemtl.tasks.objects_codec import COL, STRIDE, decode, scored

IOU_MATCH = 0.5
COCO_BACKEND = "faster_coco_eval"  # COCOeval in C++: the same numbers as pycocotools' Python loops, 12x faster
BEV_THRESHOLDS_M = (0.5, 1.0, 2.0, 4.0)
BEV_MIN = 0.1  # nuScenes: recall and precision below 0.1 are not counted
MIN_SCORE = 1e-3  # detections kept for AP (COCO keeps the top 100 whatever their score)


def nuscenes_ap(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """nuScenes AP from per-detection true-positive flags and scores: precision interpolated on 101 recall
    points, the part above ``BEV_MIN`` in both averaged and rescaled to [0, 1]; NaN without ground truth."""
    if num_gt == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    tp = tp[order].astype(np.float64)
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, 1e-12)
    points = np.linspace(0, 1, 101)
    interp = np.zeros_like(points)
    for i, r in enumerate(points):  # best precision at recall >= r (0 when never reached)
        reach = precision[recall >= r]
        interp[i] = reach.max() if reach.size else 0.0
    kept = interp[points > BEV_MIN + 1e-9] - BEV_MIN
    return float(np.clip(kept, 0, None).mean() / (1 - BEV_MIN))


class ObjectsMetrics(Accumulator):
    """Detection metrics over a dataset (see the module docstring)."""

    def __init__(self, class_names: list[str], score_threshold: float = 0.3) -> None:
        self.class_names = list(class_names)
        self.score_threshold = score_threshold
        self.reset()

    def reset(self) -> None:
        self.preds: list[dict[str, Tensor]] = []
        self.targets: list[Tensor] = []
        self.ignored: list[Tensor] = []
        self._state = {}

    def update(self, pred: Tensor, target: Tensor) -> None:
        det = decode(pred.float(), len(self.class_names), focal=target[:, 0, COL["focal"]])
        image_height = pred.shape[-2] * STRIDE
        for i in range(pred.shape[0]):
            keep = det["scores"][i] >= MIN_SCORE
            self.preds.append({k: v[i][keep].cpu() for k, v in det.items() if k != "count"})
            rows = target[i]
            rows = rows[rows[:, COL["class"]] >= 0].float().cpu()
            self.targets.append(rows)
            self.ignored.append(ignored(rows, image_height))

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, ObjectsMetrics)
        self.preds += other.preds
        self.targets += other.targets
        self.ignored += other.ignored

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.preds, self.targets, self.ignored))
            self.preds = [p for part in gathered for p in part[0]]
            self.targets = [t for part in gathered for t in part[1]]
            self.ignored = [t for part in gathered for t in part[2]]

    def state(self) -> dict[str, Tensor]:
        return {}

    def compute(self) -> dict[str, Any]:
        n_ignored = int(sum(int(i.sum()) for i in self.ignored))
        result: dict[str, Any] = {
            "images": len(self.targets),
            "gt_objects": int(sum(len(t) for t in self.targets)) - n_ignored,
            "ignored": n_ignored,
        }
        result.update(self._coco())
        result.update(self._distance())
        result.update(self._bev())
        return result

    # ------------------------------------------------------------------------------------------------ COCO
    def _coco(self) -> dict[str, Any]:
        from torchmetrics.detection import MeanAveragePrecision

        preds = [{"boxes": p["boxes"], "scores": p["scores"], "labels": p["classes"]} for p in self.preds]
        gts = [
            {"boxes": t[:, COL["x0"] : COL["y1"] + 1], "labels": t[:, COL["class"]].long(), "iscrowd": i.long()}
            for t, i in zip(self.targets, self.ignored, strict=True)
        ]
        coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend=COCO_BACKEND)
        at50 = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox", iou_thresholds=[IOU_MATCH], class_metrics=True,
            extended_summary=True, backend=COCO_BACKEND,
        )  # fmt: skip
        out: dict[str, Any] = {"map": math.nan, "ap50": math.nan, "ap75": math.nan}
        for name in self.class_names:
            out.update({f"map_{name}": math.nan, f"ap50_{name}": math.nan, f"pr_{name}": []})
        if not self.targets:
            return out
        coco.update(preds, gts)
        at50.update(preds, gts)
        full, half = coco.compute(), at50.compute()
        out.update(map=_ap(full["map"]), ap50=_ap(full["map_50"]), ap75=_ap(full["map_75"]))
        for key, res in (("map", full), ("ap50", half)):
            for c, v in zip(_ints(res["classes"]), res["map_per_class"].reshape(-1).tolist(), strict=True):
                out[f"{key}_{self.class_names[c]}"] = _ap(v)
        precision = half["precision"]  # (T=1, R=101, K, A, M)
        for j, c in enumerate(_ints(half["classes"])):
            curve = precision[0, :, j, 0, -1].clamp_min(0)
            out[f"pr_{self.class_names[c]}"] = [round(float(v), 4) for v in curve]
        return out

    # -------------------------------------------------------------------------------------------- distance
    def _matches(self) -> list[tuple[int, float, float]]:
        """(class, predicted, true distance) of detections above the threshold matched at IoU >= 0.5."""
        pairs = []
        for p, t, skip in zip(self.preds, self.targets, self.ignored, strict=True):
            above = p["scores"] >= self.score_threshold
            boxes, classes, dist_ = p["boxes"][above], p["classes"][above], p["distance"][above]
            for i, j in match_boxes(boxes, classes, t):
                if t[j, COL["distance"]] > 0 and not bool(skip[j]):
                    pairs.append((int(classes[i]), float(dist_[i]), float(t[j, COL["distance"]])))
        return pairs

    def _distance(self) -> dict[str, Any]:
        pairs = self._matches()
        out: dict[str, Any] = {"matched": len(pairs)}
        groups = {"": pairs} | {f"_{n}": [p for p in pairs if p[0] == c] for c, n in enumerate(self.class_names)}
        for suffix, group in groups.items():
            cls = np.array([p[0] for p in group], dtype=np.int64)
            pred = np.array([p[1] for p in group], dtype=np.float64)
            true = np.array([p[2] for p in group], dtype=np.float64)
            prior = np.zeros_like(true)
            for c in np.unique(cls):
                prior[cls == c] = np.median(true[cls == c])
            for tag, value in (("", pred), ("_baseline", prior)):
                relerr, delta1 = _distance_errors(value, true)
                out[f"distance_relerr{suffix}{tag}"] = relerr
                out[f"distance_delta1{suffix}{tag}"] = delta1
        return out

    # ------------------------------------------------------------------------------------------------- BEV
    def _bev(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        per_class = []
        for c, name in enumerate(self.class_names):
            aps = [self._bev_ap(c, thr) for thr in BEV_THRESHOLDS_M]
            out[f"bev_ap_{name}"] = _nanmean(aps)
            per_class.append(out[f"bev_ap_{name}"])
        out["bev_ap"] = _nanmean(per_class)
        return out

    def _bev_ap(self, c: int, threshold: float) -> float:
        tps: list[bool] = []
        scores: list[float] = []
        num_gt = 0
        for p, t, skip in zip(self.preds, self.targets, self.ignored, strict=True):
            usable = (t[:, COL["class"]] == c) & (t[:, COL["has3d"]] > 0) & (t[:, COL["fx"]] > 0)
            gt, gt_skip = t[usable].numpy(), skip[usable].numpy()
            num_gt += int((~gt_skip).sum())
            mine = (p["classes"] == c).numpy()
            if not mine.any() or not len(t) or float(t[0, COL["fx"]]) <= 0:
                continue
            fx, cx = float(t[0, COL["fx"]]), float(t[0, COL["cx"]])
            z = p["distance"].numpy()[mine]
            u = (p["boxes"][:, 0] + p["boxes"][:, 2]).numpy()[mine] / 2 - 0.5  # edges -> pixel-centre convention
            centres = np.stack([(u - cx) * z / fx, z], 1)  # (n, 2) ground-plane X, Z
            hit, keep = _greedy_centres(centres, gt[:, [COL["cx3"], COL["cz3"]]], gt_skip, threshold)
            tps += hit[keep].tolist()
            scores += p["scores"].numpy()[mine][keep].tolist()
        return nuscenes_ap(np.array(tps, dtype=bool), np.array(scores), num_gt)


def _greedy_centres(
    centres: np.ndarray, gt: np.ndarray, gt_skip: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """nuScenes matching in one image, detections best first: each takes the nearest free ground truth within
    ``threshold`` metres. Returns per detection (hit, counted); one on an ignored object is not counted."""
    hit = np.zeros(len(centres), dtype=bool)
    counted = np.ones(len(centres), dtype=bool)
    if not len(gt):
        return hit, counted
    dist = np.linalg.norm(centres[:, None] - gt[None], axis=2)  # (n, m)
    free = np.ones(len(gt), dtype=bool)
    for i in range(len(centres)):
        d = np.where(free, dist[i], np.inf)
        j = int(d.argmin())
        if d[j] < threshold:
            free[j] = False
            hit[i], counted[i] = not gt_skip[j], not gt_skip[j]
    return hit, counted


def match_boxes(boxes: Tensor, classes: Tensor, gt: Tensor) -> list[tuple[int, int]]:
    """COCO's greedy matching in one image: detections ``boxes`` (n, 4) of ``classes`` (n,), best first, each take
    the free ground-truth row of ``gt`` (m, FIELDS) of their class with the highest IoU, if it is >= 0.5.
    Returns (detection index, ground-truth row index) pairs."""
    pairs = []
    for c in classes.unique().tolist():
        det = torch.nonzero(classes == c).flatten()
        rows = torch.nonzero(gt[:, COL["class"]] == c).flatten()
        if not len(rows):
            continue
        iou = box_iou(boxes[det], gt[rows, COL["x0"] : COL["y1"] + 1])
        taken = torch.zeros(len(rows), dtype=torch.bool)
        for i in range(len(det)):
            row = iou[i].masked_fill(taken, -1)
            j = int(row.argmax())
            if row[j] >= IOU_MATCH:
                taken[j] = True
                pairs.append((int(det[i]), int(rows[j])))
    return pairs


def ignored(rows: Tensor, image_height: float) -> Tensor:
    """(N,) bool: the ground-truth rows (N, FIELDS) left out of scoring (``objects_codec.scored``)."""
    return ~scored(rows, image_height)


def _distance_errors(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """Mean relative error and delta1 share; NaN for no pairs."""
    if not true.size:
        return math.nan, math.nan
    ratio = np.maximum(pred / true, true / np.maximum(pred, 1e-9))
    return float(np.mean(np.abs(pred - true) / true)), float(np.mean(ratio < 1.25))


def _ap(value: Any) -> float:
    """torchmetrics' AP as a float; its -1 (no ground truth) as NaN."""
    v = float(value)
    return math.nan if v < 0 else v


def _ints(t: Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan
