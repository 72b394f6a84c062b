"""Semantic segmentation: per-pixel class logits, CE/BCE/Dice losses, confusion-matrix metrics, colour maps.

Files: ``<split>/semseg/<id>.png``, a single-channel PNG of class ids ``0..C-1`` with 255 = ignore. The number
and names of the classes come from ``dataset.json``; predictions are ``uint8`` ids plus the softmax maximum as a
per-pixel confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densemtl.data.format import DEPTH_MODES, DatasetFormatError, check_size, open_image
from densemtl.models.heads import make_trunk
from densemtl.tasks.base import IGNORE_INDEX, Accumulator, Info, Task, TaskStats, masked_mean, resize
from densemtl.tasks.semseg_metrics import SegMetrics
from densemtl.viz.colors import colorize_labels, overlay

DICE_SMOOTH = 1.0  # added to numerator and denominator of every class's Dice
SEG_LOSSES = ("ce", "bce", "dice", "ce+dice")
CLASS_AGREEMENT = 0.999  # export parity: fraction of pixels with the same class id
OVERLAY_ALPHA = 0.6


class SegHead(nn.Module):
    """Per-pixel class logits: a trunk (``models.heads.make_trunk``) + 1x1 on the decoder map, bilinear resize."""

    def __init__(self, in_channels: int, num_classes: int, trunk: str = "light", hidden: int = 0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"semseg needs at least 2 classes, got num_classes={num_classes}")
        self.trunk, width = make_trunk(in_channels, trunk, hidden)
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, *size)."""
        return resize(self.out(self.trunk(x)), size)


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


def load_semseg(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class ids (H, W) int64 from a single-channel PNG; ids must be < ``num_classes`` or 255 (ignore)."""
    img = open_image(path, "semseg label")
    if img.mode not in ("L", "P", *DEPTH_MODES):
        raise DatasetFormatError(
            f"{path}: semseg labels must be a single-channel PNG of class ids, got mode {img.mode}; "
            "convert colour-coded labels to ids (0..num_classes-1, 255 = ignore)"
        )
    arr = np.asarray(img).astype(np.int64)
    check_size(arr, path, size, "semseg label")
    problem = label_id_problem(arr, num_classes)
    if problem:
        raise DatasetFormatError(f"{path}: {problem}")
    return arr


def label_id_problem(ids: np.ndarray, num_classes: int) -> str:
    """Why integer ``ids`` are not labels of ``num_classes`` classes (0..C-1, 255 = ignore); '' when they are."""
    bad = (ids >= num_classes) & (ids != IGNORE_INDEX) | (ids < 0)
    if not bad.any():
        return ""
    found = np.unique(ids[bad])[:10].tolist()
    return (
        f"label ids {found} are outside the {num_classes} classes of dataset.json; map them to "
        f"0..{num_classes - 1}, or to {IGNORE_INDEX} (ignore), or add the classes to dataset.json"
    )


class SemsegStats(TaskStats):
    """Labelled pixels and images per class, and ignored pixels, over one split."""

    def __init__(self, num_classes: int) -> None:
        self.class_pixels = np.zeros(num_classes, np.int64)
        self.class_images = np.zeros(num_classes, np.int64)
        self.ignore_pixels = 0

    def add(self, array: np.ndarray, path: Path, info: Info) -> list[str]:
        n = len(self.class_pixels)
        counts = np.bincount(array[array != IGNORE_INDEX].ravel(), minlength=n)[:n]
        self.class_pixels += counts
        self.class_images += counts > 0
        self.ignore_pixels += int((array == IGNORE_INDEX).sum())
        return []

    def finish(self) -> dict[str, Any]:
        return {
            "class_pixels": self.class_pixels.tolist(),
            "class_images": self.class_images.tolist(),
            "ignore_pixels": self.ignore_pixels,
        }


def _palette(info: Info) -> np.ndarray:
    return np.array(info.get("palette", []), dtype=np.uint8).reshape(-1, 3)


class Semseg(Task):
    """Semantic segmentation with the dataset's classes; see the module docstring."""

    name = "semseg"
    folder = "semseg"
    fill = float(IGNORE_INDEX)
    headline = "miou"
    console = ("miou", "pixel_acc")
    outputs = ("semseg", "confidence")
    uses_classes = True

    # data
    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        return load_semseg(path, size, len(info["classes"]))

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        if array is None:
            return torch.full(size, IGNORE_INDEX, dtype=torch.int64)  # (H, W)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))

    def encode(self, array: np.ndarray) -> np.ndarray:
        arr = np.asarray(array)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]  # (H, W, 1) -> (H, W)
        if arr.ndim != 2 or arr.dtype.kind not in "biuf":
            raise ValueError(
                f"semseg labels must be an (H, W) array of integer class ids, got {arr.dtype} {arr.shape}; "
                "map colour-coded labels to ids first"
            )
        if arr.dtype.kind == "f":  # float ids (e.g. from .npy files) are fine when they are whole numbers
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
            if bad.any():
                raise ValueError(
                    f"semseg labels must be whole class ids, got {arr[bad].flat[0]!r} ({int(bad.sum())} "
                    f"non-integer or non-finite pixels); round or map them to ids, {IGNORE_INDEX} = ignore"
                )
        if arr.size and (arr.min() < 0 or arr.max() > IGNORE_INDEX):
            raise ValueError(
                f"semseg ids must be in 0..254 or {IGNORE_INDEX} (ignore), got {arr.min():g}..{arr.max():g}; "
                f"map them before writing (e.g. -1 or void -> {IGNORE_INDEX})"
            )
        return arr.astype(np.uint8)

    def check_target(self, encoded: np.ndarray, info: Info) -> None:
        problem = label_id_problem(encoded, len(info["classes"]))
        if problem:
            raise ValueError(problem)

    def new_stats(self, info: Info) -> TaskStats:
        return SemsegStats(len(info.get("classes", [])))

    def describe_stats(self, stats: dict[str, Any], classes: list[str]) -> list[str]:
        total = sum(stats["class_pixels"]) or 1
        lines = []
        for i, (px, imgs) in enumerate(zip(stats["class_pixels"], stats["class_images"], strict=True)):
            label = classes[i] if i < len(classes) else str(i)
            lines.append(f"{i:3d} {label:<16} {100 * px / total:6.2f}% of pixels, in {imgs} images")
        if stats["ignore_pixels"]:
            lines.append(f"ignore ({IGNORE_INDEX}): {stats['ignore_pixels']} pixels")
        return lines

    # model
    def check_model_config(self, cfg) -> None:
        if cfg.num_classes < 2:
            raise ValueError(
                f"model.num_classes={cfg.num_classes}: semseg needs at least 2 classes (set it, or leave 0 for "
                "the caller to read it from the dataset's dataset.json)"
            )

    def make_head(self, in_channels: int, cfg) -> nn.Module:
        return SegHead(in_channels, cfg.num_classes, cfg.head, cfg.head_channels)

    # loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        weights = check_class_weights(cfg.loss.class_weights, cfg.model.num_classes)
        return SegLoss(cfg.loss.semseg, cfg.model.num_classes, weights, IGNORE_INDEX)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        names = list(info.get("classes", []))
        n = cfg.model.num_classes
        return SegMetrics(n, IGNORE_INDEX, names if len(names) == n else None)

    def fit_baseline(self, targets: list[Tensor], cfg) -> dict[str, Any]:
        hist = np.zeros(max(cfg.model.num_classes, 1), dtype=np.int64)
        for t in targets:
            ids = t.flatten().numpy()
            hist += np.bincount(ids[ids < len(hist)], minlength=len(hist))[: len(hist)]
        return {"majority_class": int(hist.argmax())}

    def baseline_output(self, stats: dict[str, Any], image: Tensor) -> Tensor:
        b, _, h, w = image.shape
        return torch.full((b, h, w), int(stats["majority_class"]), dtype=torch.long)  # class ids

    def baseline_text(self) -> str:
        return "the training set's majority class everywhere"

    def report(self, result: dict[str, Any], info: Info) -> str:
        lines = ["| class | IoU |", "|---|---:|"]
        for name, iou in zip(info.get("classes", []), result.get("iou", []), strict=False):
            lines.append(f"| {name} | {'n/a' if iou != iou else f'{iou:.4f}'} |")
        return "\n".join(lines) + "\n"

    def plots(self, result: dict[str, Any], info: Info, out: Path) -> dict[str, Path]:
        from densemtl.viz.plots import plot_confusion

        if "confusion" not in result:
            return {}
        names = list(info.get("classes", [])) or [str(i) for i in range(len(result["confusion"]))]
        return {
            "Confusion matrix": plot_confusion(np.array(result["confusion"]), names, out / "confusion.png")
        }

    # prediction
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        prob = output.float().softmax(dim=1)[0]  # (C, H, W)
        conf, ids = prob.max(dim=0)
        return {
            "semseg": ids.to(torch.uint8).cpu().numpy(),
            "confidence": conf.cpu().numpy().astype(np.float32),
        }

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        return {"semseg": target.cpu().numpy().astype(np.uint8)}

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        return overlay(rgb, colorize_labels(pred["semseg"], _palette(info)), alpha=OVERLAY_ALPHA)

    def colorize_target(self, target: Tensor, rgb: np.ndarray, info: Info) -> np.ndarray:
        return colorize_labels(target.cpu().numpy(), _palette(info))

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        colors = colorize_labels(pred["semseg"], _palette(info))
        return {
            "semseg": pred["semseg"],
            "semseg_color": colors,
            "overlay": overlay(rgb, colors, OVERLAY_ALPHA),
        }

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0
    ) -> np.ndarray:
        ids = pred["semseg"].copy()  # (H, W) uint8
        if min_confidence > 0:
            ids[pred["confidence"] < min_confidence] = IGNORE_INDEX  # unsure pixels stay unlabelled
        return ids

    # export
    def onnx_outputs(self, output: Tensor, extras: bool = True) -> dict[str, Tensor]:
        out = {"semseg_logits": output}  # (B, C, H, W)
        if extras:
            out["semseg"] = output.argmax(dim=1)  # (B, H, W) int64 class ids
        return out

    def onnx_axes(self, extras: bool = True) -> dict[str, dict[int, str]]:
        axes = {"semseg_logits": {0: "batch", 2: "height", 3: "width"}}
        if extras:
            axes["semseg"] = {0: "batch", 1: "height", 2: "width"}
        return axes

    def from_onnx(self, raw: dict[str, Tensor]) -> Tensor:
        return raw["semseg_logits"]

    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        same = (ref.argmax(1) == got.argmax(1)).float().mean().item() if ref.numel() else 1.0
        return {"class_agreement": same}, same >= CLASS_AGREEMENT


SEMSEG = Semseg()
