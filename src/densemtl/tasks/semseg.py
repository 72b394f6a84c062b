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
from densemtl.models.heads import head_dropout, make_trunk
from densemtl.tasks.base import IGNORE_INDEX, Accumulator, Info, Joined, Task, TaskStats, resize
from densemtl.tasks.semseg_losses import (  # noqa: F401 (public here too)
    DICE_SMOOTH,
    SEG_LOSSES,
    SegLoss,
    check_class_weights,
)
from densemtl.tasks.semseg_metrics import SegMetrics
from densemtl.tasks.uncertainty_metrics import Calibration, fit_temperature
from densemtl.viz.colors import colorize_labels, overlay

CLASS_AGREEMENT = 0.999  # export parity: fraction of pixels with the same class id
CONFIDENCE_TOLERANCE = 1e-3  # export parity: max abs difference of the softmax maximum
OVERLAY_ALPHA = 0.6
CALIBRATION_PIXELS = 20_000  # per batch: labelled pixels kept for fitting the temperature


class SegHead(nn.Module):
    """Per-pixel class logits: a trunk (``models.heads.make_trunk``) + 1x1 on the decoder map, bilinear resize.

    The logits are divided by the buffer ``calib_temperature`` (temperature scaling, Guo et al. 2017), which
    ``densemtl calibrate`` fits on held-out data; it is 1 until then and never changes the argmax.
    """

    def __init__(
        self, in_channels: int, num_classes: int, trunk: str = "light", hidden: int = 0, dropout: float = 0.0
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"semseg needs at least 2 classes, got num_classes={num_classes}")
        self.trunk, width = make_trunk(in_channels, trunk, hidden)
        self.drop = head_dropout(dropout)
        self.out = nn.Conv2d(width, num_classes, 1)
        self.register_buffer("calib_temperature", torch.ones(()))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, *size)."""
        return resize(self.out(self.drop(self.trunk(x))) / self.calib_temperature, size)


class _ProbabilityCalibration(Calibration):
    """:class:`Calibration` of the model's logits; the trivial baseline's class ids have no probabilities."""

    def update(self, pred: Tensor, target: Tensor) -> None:
        if pred.dim() == 4 and pred.is_floating_point():
            super().update(pred, target)

    def compute(self) -> dict[str, Any]:
        if not int(self._state["count"].sum()):  # no probabilities seen (a baseline, or no labelled pixel)
            return {}
        result = super().compute()
        result["calibrated_pixels"] = result.pop("pixels")  # "pixels" is SegMetrics' count
        return result


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
    lower_is_better = frozenset({"ece", "nll", "brier"})
    hub_pipeline_tag = "image-segmentation"
    outputs = ("semseg", "confidence", "entropy")
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
        return SegHead(in_channels, cfg.num_classes, cfg.head, cfg.head_channels, cfg.dropout)

    # loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        weights = check_class_weights(cfg.loss.class_weights, cfg.model.num_classes)
        return SegLoss(cfg.loss.semseg, cfg.model.num_classes, weights, IGNORE_INDEX)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        names = list(info.get("classes", []))
        n = cfg.model.num_classes
        return Joined(
            SegMetrics(n, IGNORE_INDEX, names if len(names) == n else None),
            _ProbabilityCalibration(n, IGNORE_INDEX),
        )

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
        from densemtl.viz.uncertainty_plots import plot_reliability

        if "confusion" not in result:
            return {}
        names = list(info.get("classes", [])) or [str(i) for i in range(len(result["confusion"]))]
        plots = {"Confusion matrix": plot_confusion(np.array(result["confusion"]), names, out / "confusion.png")}
        if "reliability" in result:
            title = f"semseg, ECE {result['ece']:.4f}"
            plots["Segmentation reliability"] = plot_reliability(result["reliability"], out / "reliability.png", title)
        return plots

    # prediction
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        prob = output.float().softmax(dim=1)[0]  # (C, H, W)
        conf, ids = prob.max(dim=0)
        entropy = -(prob * prob.clamp_min(1e-12).log()).sum(dim=0)  # nats, 0 .. ln C
        return {
            "semseg": ids.to(torch.uint8).cpu().numpy(),
            "confidence": conf.cpu().numpy().astype(np.float32),
            "entropy": entropy.cpu().numpy().astype(np.float32),
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
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0, max_rel_std: float = 0.0
    ) -> np.ndarray:
        ids = pred["semseg"].copy()  # (H, W) uint8
        if min_confidence > 0:
            ids[pred["confidence"] < min_confidence] = IGNORE_INDEX  # unsure pixels stay unlabelled
        return ids

    # uncertainty
    def merge_samples(self, outputs: list[Tensor]) -> Tensor:
        """The log of the passes' mean probabilities: its softmax is the predictive distribution."""
        return torch.stack([o.float().softmax(dim=1) for o in outputs]).mean(0).clamp_min(1e-12).log()

    def calibration_data(self, output: Tensor, target: Tensor) -> Tensor | None:
        c = output.shape[1]
        valid = (target >= 0) & (target < c)  # (B, H, W); 255 is ignored
        logits = output.permute(0, 2, 3, 1)[valid]  # (N, C)
        rows = torch.cat([logits.float(), target[valid].float()[:, None]], dim=1)  # (N, C + 1): logits, label
        return rows[:: max(1, len(rows) // CALIBRATION_PIXELS)]

    def fit_calibration(self, data: Tensor, head: nn.Module, cfg) -> dict[str, float]:
        """The temperature that minimises the held-out NLL, stored in the head (``calib_temperature``)."""
        logits, labels = data[:, :-1], data[:, -1].long()
        t = fit_temperature(logits, labels)
        before = float(F.cross_entropy(logits, labels))
        after = float(F.cross_entropy(logits / t, labels))
        head.calib_temperature.fill_(t)
        return {"temperature": t, "nll_before": before, "nll_after": after, "pixels": float(len(data))}

    def reset_calibration(self, head: nn.Module) -> None:
        head.calib_temperature.fill_(1.0)

    # export
    def onnx_outputs(self, output: Tensor, extras: bool = True) -> dict[str, Tensor]:
        out = {"semseg_logits": output}  # (B, C, H, W), calibrated (divided by the temperature)
        if extras:
            out["semseg"] = output.argmax(dim=1)  # (B, H, W) int64 class ids
            out["semseg_confidence"] = output.softmax(dim=1).amax(dim=1)  # (B, H, W) calibrated max probability
        return out

    def onnx_axes(self, output: Tensor, extras: bool = True) -> dict[str, dict[int, str]]:
        axes = {"semseg_logits": {0: "batch", 2: "height", 3: "width"}}
        if extras:
            axes["semseg"] = {0: "batch", 1: "height", 2: "width"}
            axes["semseg_confidence"] = {0: "batch", 1: "height", 2: "width"}
        return axes

    def from_onnx(self, raw: dict[str, Tensor]) -> Tensor:
        return raw["semseg_logits"]

    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        if not ref.numel():
            return {"class_agreement": 1.0}, True
        same = (ref.argmax(1) == got.argmax(1)).float().mean().item()
        conf = float((ref.softmax(1).amax(1) - got.softmax(1).amax(1)).abs().max())
        figures = {"class_agreement": same, "confidence_max_abs_err": conf}
        return figures, same >= CLASS_AGREEMENT and conf <= CONFIDENCE_TOLERANCE


SEMSEG = Semseg()
