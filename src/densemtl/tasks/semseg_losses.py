"""Segmentation losses on labelled pixels: cross-entropy, one-vs-all BCE, soft Dice, and CE + Dice."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densemtl.tasks.base import IGNORE_INDEX, masked_mean

DICE_SMOOTH = 1.0  # added to numerator and denominator of every class's Dice
SEG_LOSSES = ("ce", "bce", "dice", "ce+dice")


def check_class_weights(class_weights: Sequence[float], num_classes: int) -> Tensor | None:
    """Validated per-class weights as a (C,) tensor, or None for uniform weighting."""
    if not class_weights:
        return None
    if len(class_weights) != num_classes:
        raise ValueError(
            f"loss.class_weights has {len(class_weights)} values but the dataset has {num_classes} classes; "
            "give one weight per class or leave it empty for uniform weights"
        )
    w = torch.tensor([float(v) for v in class_weights], dtype=torch.float32)
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"loss.class_weights must be finite, >= 0 and not all 0, got {list(class_weights)}")
    return w


class SegLoss(nn.Module):
    """Segmentation loss on labelled pixels: "ce", "bce" (sigmoid one-vs-all), "dice" or "ce+dice".

    Args:
        kind: one of ``SEG_LOSSES``.
        num_classes: C, the number of logit channels.
        class_weights: (C,) non-negative weights or None for uniform. CE uses PyTorch's convention
            ``sum(w_y * nll) / sum(w_y)``; BCE weights each class channel; Dice takes a weighted class mean.
        ignore_index: label id that carries no label. Ids outside ``[0, C)`` are treated the same way.
    """

    def __init__(
        self,
        kind: str,
        num_classes: int,
        class_weights: Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if kind not in SEG_LOSSES:
            raise ValueError(f"unknown segmentation loss {kind!r}; choose one of {SEG_LOSSES}")
        self.kind = kind
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        """Scalar loss from logits (B, C, H, W) and labels (B, H, W); ``sample_mask`` (B,) drops samples."""
        if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[-2:]:
            raise ValueError(f"semseg logits {tuple(logits.shape)} do not match labels {tuple(target.shape)}")
        logits = logits.float()  # losses in fp32 even under autocast
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)  # (B, H, W)
        if sample_mask is not None:
            valid = valid & sample_mask.view(-1, 1, 1)
        safe = torch.where(valid, target, torch.zeros_like(target)).long()  # any class id; masked out anyway
        loss = logits.new_zeros(())
        if self.kind in ("ce", "ce+dice"):
            loss = loss + self._ce(logits, safe, valid)
        if self.kind == "bce":
            loss = loss + self._bce(logits, safe, valid)
        if self.kind in ("dice", "ce+dice"):
            loss = loss + self._dice(logits, safe, valid)
        return loss

    def _ce(self, logits: Tensor, safe: Tensor, valid: Tensor) -> Tensor:
        nll = F.cross_entropy(logits, safe, reduction="none")  # (B, H, W)
        if self.class_weights is None:
            return masked_mean(nll, valid)
        w = self.class_weights[safe] * valid  # (B, H, W)
        return (w * nll).sum() / w.sum().clamp_min(1e-12)  # 0 / tiny = 0 when nothing is valid

    def _bce(self, logits: Tensor, safe: Tensor, valid: Tensor) -> Tensor:
        onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).to(logits.dtype)  # (B, C, H, W)
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")  # (B, C, H, W)
        if self.class_weights is None:
            per_pixel = bce.mean(dim=1)
        else:
            w = self.class_weights.view(1, -1, 1, 1)
            per_pixel = (bce * w).sum(dim=1) / w.sum()
        return masked_mean(per_pixel, valid)  # (B, H, W) -> ()

    def _dice(self, logits: Tensor, safe: Tensor, valid: Tensor) -> Tensor:
        """1 - mean over classes of soft Dice, pooled over all valid pixels of the batch (batch Dice)."""
        probs = logits.softmax(dim=1) * valid.unsqueeze(1)  # (B, C, H, W), zero on unlabelled pixels
        onehot = F.one_hot(safe, self.num_classes).permute(0, 3, 1, 2).to(probs.dtype) * valid.unsqueeze(1)
        inter = (probs * onehot).sum(dim=(0, 2, 3))  # (C,)
        denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))  # (C,)
        dice = (2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)  # absent classes score 1 when not predicted
        if self.class_weights is None:
            return 1.0 - dice.mean()
        return 1.0 - (dice * self.class_weights).sum() / self.class_weights.sum()
