"""What the objects head gets wrong, for benchmarks/objects.py: recall by object height, and what its confident
detections are.

Both are read off the same predictions as the distance comparison (``Predictor.predict``: detections at the
0.3 operating point, on the validation images at full resolution):

* recall at IoU >= 0.5 of the scored ground truth (``objects_metrics.ignored``: the COCO evaluation's scored
  set) per class and box-height band, with the mean of each object's best IoU with a detection of its class;
* every detection with a score >= ``CONFIDENT`` put in one category, in score order as COCO matches them: ``hit``
  (IoU >= 0.5 with a free scored object), ``on_ignored`` (half of it or more inside an object left out of
  scoring: COCO neither rewards nor penalises it), ``duplicate`` (IoU >= 0.5 only with an object already taken),
  ``mislocalised`` (best IoU with a scored object in [0.1, 0.5)) or ``background``; for the mislocalised ones
  the median ratio of their box's area to that object's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

HEIGHT_BANDS = (16, 32, 48, 64, 96)  # box-height band edges, pixels (the last band is open)
CONFIDENT = 0.5
IOU = 0.5
CATEGORIES = ("hit", "on_ignored", "duplicate", "mislocalised", "background")


class DetectionErrors:
    """Accumulates :meth:`add` per image; :meth:`summary` gives the figures of the module docstring."""

    def __init__(self, class_names: list[str]) -> None:
        self.names = list(class_names)
        self.best: dict[int, list[tuple[float, float]]] = {c: [] for c in range(len(self.names))}  # (height, IoU)
        self.counts = {c: dict.fromkeys(CATEGORIES, 0) for c in range(len(self.names))}
        self.area_ratio: dict[int, list[float]] = {c: [] for c in range(len(self.names))}

    def add(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, gt: torch.Tensor,
            gt_classes: torch.Tensor, skip: torch.Tensor) -> None:  # fmt: skip
        """One image: detections (n, 4) best first with scores and classes (n,); ground truth (m, 4), its
        classes (m,) and ``skip`` (m,) bool (left out of scoring)."""
        for c in range(len(self.names)):
            det, mine = boxes[classes == c], gt_classes == c
            ref, ref_skip = gt[mine], skip[mine]
            iou = box_iou(det, ref) if len(det) and len(ref) else torch.zeros(len(det), len(ref))
            best = iou.max(0).values if len(det) else torch.zeros(len(ref))
            heights = (ref[:, 3] - ref[:, 1]).tolist()
            self.best[c] += [(h, float(b)) for h, b, s in zip(heights, best, ref_skip, strict=True) if not s]
            confident = det[scores[classes == c] >= CONFIDENT]
            self._categorise(c, confident, iou[: len(confident)], ref, ref_skip)

    def _categorise(self, c: int, det: torch.Tensor, iou: torch.Tensor, ref: torch.Tensor, skip: torch.Tensor) -> None:
        taken = torch.zeros(len(ref), dtype=torch.bool)
        for i in range(len(det)):
            free = iou[i].masked_fill(skip | taken, -1.0)
            j = int(free.argmax()) if len(ref) else -1
            if j >= 0 and free[j] >= IOU:
                taken[j] = True
                self.counts[c]["hit"] += 1
                continue
            inter = (torch.minimum(det[i, 2:], ref[:, 2:]) - torch.maximum(det[i, :2], ref[:, :2])).clamp_min(0)
            inside = inter.prod(1) / (det[i, 2:] - det[i, :2]).prod().clamp_min(1e-9)
            scored = iou[i].masked_fill(skip, -1.0)
            if bool((inside[skip] >= 0.5).any()):
                self.counts[c]["on_ignored"] += 1
            elif bool((iou[i].masked_fill(~taken, -1.0) >= IOU).any()):
                self.counts[c]["duplicate"] += 1
            elif len(ref) and float(scored.max()) >= 0.1:
                k = int(scored.argmax())
                self.counts[c]["mislocalised"] += 1
                area = lambda b: float((b[2:] - b[:2]).prod())  # noqa: E731
                self.area_ratio[c].append(area(det[i]) / max(area(ref[k]), 1e-9))
            else:
                self.counts[c]["background"] += 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"confident_score": CONFIDENT, "height_bands_px": list(HEIGHT_BANDS)}
        edges = (*HEIGHT_BANDS, np.inf)
        for c, name in enumerate(self.names):
            pairs = np.array(self.best[c], dtype=np.float64).reshape(-1, 2)
            bands = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                sel = pairs[(pairs[:, 0] >= lo) & (pairs[:, 0] < hi)]
                bands.append({"from_px": lo, "n": len(sel), "recall": float(np.mean(sel[:, 1] >= IOU)) if len(sel) else None,
                              "mean_best_iou": float(sel[:, 1].mean()) if len(sel) else None})  # fmt: skip
            ratios = self.area_ratio[c]
            out[name] = {"recall_by_height": bands, "confident": self.counts[c],
                         "mislocalised_area_ratio_median": float(np.median(ratios)) if ratios else None}  # fmt: skip
        return out


def markdown(summary: dict[str, Any]) -> list[str]:
    """Markdown lines for results/objects.md."""
    lines = ["", "Recall at IoU >= 0.5 of the scored objects by box height (detections at score >= 0.3), and "
             f"what the detections with score >= {summary['confident_score']} are:", "",
             "| class | height (px) | n | recall | mean best IoU |", "|---|---|---:|---:|---:|"]  # fmt: skip
    names = [k for k, v in summary.items() if isinstance(v, dict)]
    for name in names:
        for b in summary[name]["recall_by_height"]:
            if b["n"]:
                lines.append(f"| {name} | >= {b['from_px']} | {b['n']} | {b['recall']:.2f} | {b['mean_best_iou']:.2f} |")
    lines += ["", "| class | " + " | ".join(CATEGORIES) + " | mislocalised area / object's |",
              "|---|" + "---:|" * (len(CATEGORIES) + 1)]  # fmt: skip
    for name in names:
        s = summary[name]
        ratio = s["mislocalised_area_ratio_median"]
        lines.append(f"| {name} | " + " | ".join(str(s["confident"][k]) for k in CATEGORIES)
                     + f" | {'' if ratio is None else f'{ratio:.2f}'} |")  # fmt: skip
    return lines
