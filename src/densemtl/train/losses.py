"""Per-task losses on valid pixels, and how per-task terms are weighted into one total.

Every term is ``sum over valid pixels / max(count, 1)``: a batch in which no pixel is labelled for a task gives
exactly 0 with zero gradients (never NaN), and samples that lack a task's label (asymmetric annotations, see
``batch["valid_tasks"]``) contribute nothing to that task. ``build_loss`` is the only function that reads
``LossConfig``; the pieces below receive plain arguments. Task weightings live in ``densemtl.train.weighting``
(re-exported here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densemtl.config import LossConfig
from densemtl.tasks import IGNORE_INDEX, check_tasks
from densemtl.train.weighting import WEIGHTINGS, FixedWeighting, TaskWeighting, build_weighting  # noqa: F401

EPS_DEPTH = 1e-3  # metres; depths are clamped to this before a log so that log never sees 0
DICE_SMOOTH = 1.0  # added to numerator and denominator of every class's Dice
SEG_LOSSES = ("ce", "bce", "dice", "ce+dice")
DEPTH_LOSSES = ("l1", "mse", "berhu", "silog")
DEPTH_SPACES = ("metres", "log", "blog")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is True; exactly 0 (with zero gradients) when nothing is valid.

    ``values`` must be finite everywhere (also where masked out): ``where`` would still route NaN gradients.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _sample_mask(batch: dict, task: str, like: Tensor) -> Tensor:
    """(B,) bool: which samples carry labels for ``task`` (all True when the batch does not say)."""
    valid = batch.get("valid_tasks", {}).get(task)
    if valid is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return torch.as_tensor(valid, dtype=torch.bool, device=like.device).reshape(-1)


def _check_class_weights(class_weights: tuple[float, ...] | list[float], num_classes: int) -> Tensor | None:
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


# --------------------------------------------------------------------------------------------- segmentation
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


# -------------------------------------------------------------------------------------------------- depth
def depth_transform(depth: Tensor, space: str, clip: float = 80.0) -> Tensor:
    """Map metres to the space a depth loss compares in.

    ``metres``: unchanged. ``log``: ln(d). ``blog``: ln(clip(d, max=clip)) / 5, the lecture's bounded log
    target (about [-1.4, 0.9] for d in [1 mm, 80 m]). Depths are clamped to >= 1 mm before any log.
    """
    if space == "metres":
        return depth
    if space == "log":
        return depth.clamp_min(EPS_DEPTH).log()
    if space == "blog":
        return depth.clamp(EPS_DEPTH, clip).log() / 5.0
    raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")


class DepthLoss(nn.Module):
    """Depth regression on pixels with a measurement (target > 0): "l1", "mse", "berhu" or "silog".

    Residuals are taken in ``space`` (see ``depth_transform``), except for "silog", which is defined on log
    depth and always works in natural-log space whatever ``space`` says.

    berHu (reverse Huber, Laina et al. 2016): ``|r|`` if ``|r| <= c`` else ``(r^2 + c^2) / (2c)`` with
    ``c = 0.2 * max |r|`` over the valid pixels of the batch, detached.

    silog (Eigen et al. 2014, weighted as in BTS, Lee et al. 2019):
    ``scale * sqrt(mean(g^2) - lam * mean(g)^2)``, ``g = ln pred - ln gt``, ``lam = 0.85``, ``scale = 10``.
    ``lam = 1`` makes it fully invariant to a global scale of the prediction; 0.85 keeps a little scale
    supervision, which metric depth needs. The x10 brings it to the magnitude of cross-entropy.
    """

    def __init__(
        self,
        kind: str,
        space: str = "log",
        clip: float = 80.0,
        silog_lambda: float = 0.85,
        silog_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if kind not in DEPTH_LOSSES:
            raise ValueError(f"unknown depth loss {kind!r}; choose one of {DEPTH_LOSSES}")
        if space not in DEPTH_SPACES:
            raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")
        self.kind, self.space, self.clip = kind, space, clip
        self.silog_lambda, self.silog_scale = silog_lambda, silog_scale

    def forward(self, pred: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        """Scalar loss from predicted and target metres (B, 1, H, W); ``sample_mask`` (B,) drops samples."""
        if pred.shape != target.shape:
            raise ValueError(
                f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        pred, target = pred.float(), target.float()
        valid = (target > 0) & torch.isfinite(target)  # (B, 1, H, W)
        if sample_mask is not None:
            valid = valid & sample_mask.view(-1, 1, 1, 1)
        target = torch.where(valid, target, torch.ones_like(target))  # keeps log() finite on invalid pixels
        if self.kind == "silog":
            return self._silog(pred, target, valid)
        r = depth_transform(pred, self.space, self.clip) - depth_transform(target, self.space, self.clip)
        if self.kind == "l1":
            return masked_mean(r.abs(), valid)
        if self.kind == "mse":
            return masked_mean(r.square(), valid)
        return masked_mean(berhu(r, valid), valid)

    def _silog(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        g = depth_transform(pred, "log") - depth_transform(target, "log")  # (B, 1, H, W)
        mean_g, mean_g2 = masked_mean(g, valid), masked_mean(g.square(), valid)
        var = (mean_g2 - self.silog_lambda * mean_g.square()).clamp_min(1e-12)  # sqrt'(0) would be inf
        return self.silog_scale * var.sqrt() * valid.any()  # exactly 0 when no pixel is valid


def berhu(r: Tensor, valid: Tensor) -> Tensor:
    """Element-wise reverse Huber of residuals ``r`` with the threshold from the valid pixels (see DepthLoss)."""
    absr = r.abs()
    c = (0.2 * (absr * valid).amax()).detach().clamp_min(1e-12)  # clamp keeps the unused branch finite
    return torch.where(absr <= c, absr, (absr.square() + c.square()) / (2 * c))


# ------------------------------------------------------------------------------------------------ combined
class MultiTaskLoss(nn.Module):
    """Per-task losses plus their weighted total.

    Args:
        losses: ``{task: module}``; each module is called as ``module(pred, target, sample_mask)``.
        weighting: turns the per-task terms into ``"total"``.
    """

    def __init__(self, losses: dict[str, nn.Module], weighting: TaskWeighting) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weighting = weighting

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """``{task: scalar, ..., "total": scalar}`` from model outputs and a collated batch."""
        terms: dict[str, Tensor] = {}
        for task, loss_fn in self.losses.items():
            if task not in outputs or task not in batch:
                raise KeyError(f"task {task!r} needs outputs[{task!r}] and batch[{task!r}]")
            pred = outputs[task]
            terms[task] = loss_fn(pred, batch[task].to(pred.device), _sample_mask(batch, task, pred))
        terms["total"] = self.weighting(terms)
        return terms


def build_loss(
    cfg: LossConfig, tasks: tuple[str, ...], num_classes: int, ignore_index: int = IGNORE_INDEX
) -> MultiTaskLoss:
    """The multi-task loss described by ``cfg`` for ``tasks``."""
    tasks = check_tasks(tasks)
    losses: dict[str, nn.Module] = {}
    if "semseg" in tasks:
        weights = _check_class_weights(cfg.class_weights, num_classes)
        losses["semseg"] = SegLoss(cfg.semseg, num_classes, weights, ignore_index)
    if "depth" in tasks:
        if not (cfg.depth_clip > 0 and math.isfinite(cfg.depth_clip)):
            raise ValueError(f"loss.depth_clip must be a positive number of metres, got {cfg.depth_clip}")
        losses["depth"] = DepthLoss(
            cfg.depth, cfg.depth_space, cfg.depth_clip, cfg.silog_lambda, cfg.silog_scale
        )
    return MultiTaskLoss(losses, build_weighting(cfg.weighting, tasks, cfg.weights, cfg.weighting_args))
