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
  the median ratio of their box's area to that object's;
* per scored object, whether the box regressed at its own centre cell (what a peak there decodes) has IoU >= 0.5
  with it (``centre_box_ok``: the regression is right, so a miss is the heatmap's), and whether it is *crowded*:
  another object of its class is centred in the 3 x 3 cells around it on the network's grid, where peak extraction
  keeps one peak; recall of the crowded and of the other objects.
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
        # per scored object: (height, best IoU, centre-cell box IoU, crowded)
        self.best: dict[int, list[tuple[float, float, float, bool]]] = {c: [] for c in range(len(self.names))}
        self.counts = {c: dict.fromkeys(CATEGORIES, 0) for c in range(len(self.names))}
        self.area_ratio: dict[int, list[float]] = {c: [] for c in range(len(self.names))}

    def add(self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, gt: torch.Tensor,
            gt_classes: torch.Tensor, skip: torch.Tensor, centre_boxes: torch.Tensor | None = None,
            cell_px: float = 4.0) -> None:  # fmt: skip
        """One image: detections (n, 4) best first with scores and classes (n,); ground truth (m, 4), its
        classes (m,) and ``skip`` (m,) bool (left out of scoring); ``centre_boxes`` (m, 4): the box regressed at
        each object's centre cell (:func:`centre_cell_boxes`), ``cell_px``: the network's cell in image pixels."""
        for c in range(len(self.names)):
            det, mine = boxes[classes == c], gt_classes == c
            ref, ref_skip = gt[mine], skip[mine]
            iou = box_iou(det, ref) if len(det) and len(ref) else torch.zeros(len(det), len(ref))
            best = iou.max(0).values if len(det) else torch.zeros(len(ref))
            centre = (box_iou(centre_boxes[mine], ref).diagonal() if centre_boxes is not None and len(ref)
                      else torch.full((len(ref),), float("nan")))  # fmt: skip
            cells = torch.floor((ref[:, :2] + ref[:, 2:]) / (2 * cell_px))  # (m, 2) centre cells
            near = (cells[:, None] - cells[None]).abs().amax(-1) <= 1
            crowded = (near & ~torch.eye(len(ref), dtype=torch.bool)).any(1)
            heights = (ref[:, 3] - ref[:, 1]).tolist()
            self.best[c] += [(h, float(b), float(o), bool(k)) for h, b, o, k, s
                             in zip(heights, best, centre, crowded, ref_skip, strict=True) if not s]  # fmt: skip
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
            rows = np.array(self.best[c], dtype=np.float64).reshape(-1, 4)
            bands = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                sel = rows[(rows[:, 0] >= lo) & (rows[:, 0] < hi)]
                bands.append({"from_px": lo, "n": len(sel), "recall": float(np.mean(sel[:, 1] >= IOU)) if len(sel) else None,
                              "mean_best_iou": float(sel[:, 1].mean()) if len(sel) else None})  # fmt: skip
            ratios = self.area_ratio[c]
            out[name] = {"recall_by_height": bands, "confident": self.counts[c],
                         "mislocalised_area_ratio_median": float(np.median(ratios)) if ratios else None,
                         **_centre_and_crowding(rows)}  # fmt: skip
        return out


def _centre_and_crowding(rows: np.ndarray) -> dict[str, Any]:
    """From (height, best IoU, centre-cell box IoU, crowded) rows: the share of right centre-cell boxes, the
    crowded share, and the recall (IoU >= 0.5) of the crowded and the other objects."""
    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    crowded = rows[:, 3] > 0
    centre = rows[:, 2][~np.isnan(rows[:, 2])]
    return {"centre_box_ok": mean(centre >= IOU), "crowded": mean(crowded),
            "recall_crowded": mean(rows[crowded, 1] >= IOU), "recall_alone": mean(rows[~crowded, 1] >= IOU)}  # fmt: skip


def centre_cell_boxes(raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The boxes (m, 4) pixels that the raw objects output (K + 14, h, w) of one image regresses at the cells
    holding the centres of the ground-truth boxes ``gt`` (m, 4) in that image's pixels."""
    from densemtl.tasks.objects_codec import EXTRA_CHANNELS, cell_boxes, centre_cells

    k = raw.shape[0] - EXTRA_CHANNELS
    iy, ix = centre_cells(gt, (raw.shape[1], raw.shape[2]))
    return cell_boxes(raw[k : k + 4, iy, ix].T, iy, ix)


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
    lines += ["", "Regression at each scored object's own centre cell, and objects crowded on the network's grid "
              "(another centred within 3 x 3 cells: one peak for both):", "",
              "| class | centre-cell box IoU >= 0.5 | crowded | recall crowded | recall others |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
    for name in names:
        s = summary[name]
        lines.append(f"| {name} | {fmt(s.get('centre_box_ok'))} | {fmt(s.get('crowded'))} | "
                     f"{fmt(s.get('recall_crowded'))} | {fmt(s.get('recall_alone'))} |")  # fmt: skip
    lines += ["", "| class | " + " | ".join(CATEGORIES) + " | mislocalised area / object's |",
              "|---|" + "---:|" * (len(CATEGORIES) + 1)]  # fmt: skip
    for name in names:
        s = summary[name]
        ratio = s["mislocalised_area_ratio_median"]
        lines.append(f"| {name} | " + " | ".join(str(s["confident"][k]) for k in CATEGORIES)
                     + f" | {'' if ratio is None else f'{ratio:.2f}'} |")  # fmt: skip
    return lines
