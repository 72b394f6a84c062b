"""Segmentation metrics from one confusion matrix accumulated over the whole dataset (mIoU, accuracy, Dice).

Integer counts only, so results do not depend on batching and merge exactly across processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from densemtl.tasks.base import IGNORE_INDEX, Accumulator, nanmean


class SegMetrics(Accumulator):
    """Semantic segmentation metrics from a confusion matrix accumulated over the whole dataset.

    Rows are ground-truth classes, columns predictions; one extra column counts predictions outside
    ``[0, C)`` (they are wrong for the ground-truth class, and a false positive of no class). Pixels labelled
    ``ignore_index`` are not counted; other ground-truth ids outside ``[0, C)`` are an error.

    ``compute()`` returns ``iou`` per class (NaN for a class absent from both ground truth and prediction),
    ``miou`` (mean over the classes that are not NaN, so classes that never occur do not count as 0 or 1),
    ``pixel_acc``, ``mean_acc`` (mean recall over classes present in the ground truth), ``dice`` (mean F1
    over the same classes as ``miou``), the ``confusion`` matrix, and with ``class_names`` a ``per_class`` dict.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = {"confusion": torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64)}

    @property
    def confusion(self) -> Tensor:
        """(C, C) counts, ``[gt, pred]``, without the out-of-range prediction column."""
        return self._state["confusion"][:, : self.num_classes]

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` class ids (B, H, W) or logits (B, C, H, W); ``target`` ids (B, H, W)."""
        if pred.dim() == target.dim() + 1:
            pred = pred.max(dim=1).indices  # = argmax; ~10x faster than argmax over channels on CPU
        if pred.shape != target.shape:
            raise ValueError(
                f"semseg prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        c = self.num_classes
        pred, target = pred.long().flatten(), target.to(pred.device).long().flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if ((target < 0) | (target >= c)).any():
            bad = sorted(set(target[(target < 0) | (target >= c)].unique().tolist()))
            raise ValueError(
                f"semseg target has ids {bad[:10]} outside [0, {c}) that are not the ignore "
                f"index {self.ignore_index}; check the dataset's label mapping"
            )
        out_of_range = (pred < 0) | (pred >= c)
        pred = torch.where(out_of_range, torch.full_like(pred, c), pred)  # counted in the extra column C
        self._to(pred.device)
        counts = torch.bincount(target * (c + 1) + pred, minlength=c * (c + 1))
        self._state["confusion"] += counts.view(c, c + 1)

    def compute(self) -> dict:
        """Metrics over everything accumulated so far (see the class docstring)."""
        conf = self._state["confusion"].double().cpu()
        c = self.num_classes
        tp = conf.diagonal()  # (C,): the diagonal of a (C, C + 1) matrix
        gt = conf.sum(dim=1)  # includes out-of-range predictions
        predicted = conf[:, :c].sum(dim=0)
        union = gt + predicted - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        recall = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        dice = torch.where(union > 0, 2 * tp / (gt + predicted).clamp_min(1), nan)
        total = gt.sum()
        out = {
            "miou": nanmean(iou),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": nanmean(recall),
            "dice": nanmean(dice),
            "iou": iou.tolist(),
            "recall": recall.tolist(),
            "pixels": int(total),
            "confusion": self.confusion.cpu().tolist(),
        }
        if self.class_names is not None:
            out["per_class"] = {
                n: {"iou": i, "recall": r, "dice": d, "pixels": int(p)}
                for n, i, r, d, p in zip(
                    self.class_names, iou.tolist(), recall.tolist(), dice.tolist(), gt.tolist(), strict=True
                )
            }
        return out
