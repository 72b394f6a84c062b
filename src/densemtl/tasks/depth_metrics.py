"""Depth metrics with the standard Eigen/KITTI protocol, plus the error-by-distance profile of ``evaluate``.

All state is float64 sums or int64 counts over valid pixels, so results are dataset-level, independent of
batching, and mergeable across processes like every other :class:`~densemtl.tasks.base.Accumulator`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from densemtl.tasks.base import Accumulator

PROFILE_BINS = 16  # ground-truth distance bins over [0, max_depth] for the error profile and histograms

_SUMS = ("count", "abs_rel", "sq_rel", "sq_err", "sq_log", "log10", "abs_err", "log_diff", "d1", "d2", "d3")
_PROFILE = ("bin_abs_err", "bin_rel_err", "bin_count", "pred_hist")
_DEPTH_METRICS = (
    "abs_rel",
    "sq_rel",
    "rmse",
    "rmse_log",
    "log10",
    "mae",
    "silog",
    "delta1",
    "delta2",
    "delta3",
)


class DepthMetrics(Accumulator):
    """Depth metrics with the standard Eigen/KITTI protocol.

    A pixel counts when its ground truth is finite and ``min_depth <= gt <= max_depth`` (gt > 0 always);
    predictions are clamped to ``[min_depth, max_depth]`` first. Reported: ``abs_rel``, ``sq_rel``, ``rmse``,
    ``rmse_log``, ``log10``, ``mae`` (metres), ``silog = 100 * sqrt(mean(d^2) - mean(d)^2)`` with
    ``d = ln pred - ln gt``, and ``delta1..3`` (fraction with ``max(pred/gt, gt/pred) < 1.25^k``).

    Pooling: by default every valid pixel of the dataset weighs the same (rmse and silog are taken over the
    pooled sums). ``per_image=True`` computes every metric per image and averages over images, skipping images
    without valid pixels; that is the KITTI benchmark's convention for silog. The two differ when images have
    different numbers of valid pixels or different errors.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, per_image: bool = False) -> None:
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.min_depth, self.max_depth, self.per_image = min_depth, max_depth, per_image
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        # pooled: sums over pixels; per image: sums over images of per-image metrics, plus counts
        keys = ("count", "images", *_DEPTH_METRICS) if self.per_image else _SUMS
        self._state = {k: torch.zeros((), dtype=torch.float64) for k in keys}
        for k in _PROFILE:  # per ground-truth distance bin over [0, max_depth]
            self._state[k] = torch.zeros(PROFILE_BINS, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and ground-truth metres, both (B, 1, H, W) (or (B, H, W)).

        A prediction with a second channel (the depth head's std of ln depth) is scored on its metres.
        """
        if pred.dim() == 4 and pred.shape[1] == 2 and target.shape[1:2] == (1,):
            pred = pred[:, :1]
        if pred.shape != target.shape:
            raise ValueError(
                f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        pred, target = pred.double(), target.to(pred.device).double()
        sums = self._image_sums(pred, target)  # {key: (B,)}
        self._to(pred.device)
        self._add_profile(pred, target)
        if not self.per_image:
            for k in _SUMS:
                self._state[k] += sums[k].sum()
            return
        has = sums["count"] > 0  # images without valid pixels are skipped
        for k, v in _depth_from_sums({k: v[has] for k, v in sums.items()}).items():  # {metric: (B',)}
            self._state[k] += v.sum()
        self._state["count"] += sums["count"].sum()
        self._state["images"] += has.sum()

    def _image_sums(self, pred: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """Per-image sums over valid pixels, each (B,)."""
        valid = torch.isfinite(gt) & (gt > 0) & (gt >= self.min_depth) & (gt <= self.max_depth)
        gt = torch.where(valid, gt, torch.ones_like(gt))  # keep the arithmetic finite on skipped pixels
        pred = pred.clamp(self.min_depth, self.max_depth)
        err = pred - gt
        d = pred.log() - gt.log()
        ratio = torch.maximum(pred / gt, gt / pred)
        terms = {
            "count": torch.ones_like(gt),
            "abs_rel": err.abs() / gt,
            "sq_rel": err.square() / gt,
            "sq_err": err.square(),
            "sq_log": d.square(),
            "log10": (pred.log10() - gt.log10()).abs(),
            "abs_err": err.abs(),
            "log_diff": d,
            "d1": (ratio < 1.25).double(),
            "d2": (ratio < 1.25**2).double(),
            "d3": (ratio < 1.25**3).double(),
        }
        dims = tuple(range(1, gt.dim()))
        return {k: torch.where(valid, v, torch.zeros_like(v)).sum(dim=dims) for k, v in terms.items()}

    def _add_profile(self, pred: Tensor, gt: Tensor) -> None:
        """Absolute and relative error per ground-truth distance bin, and both depth histograms."""
        valid = torch.isfinite(gt) & (gt >= self.min_depth) & (gt <= self.max_depth) & (gt > 0)
        g, p = gt[valid], pred[valid].clamp(self.min_depth, self.max_depth)
        width = self.max_depth / PROFILE_BINS
        gi = (g / width).long().clamp(0, PROFILE_BINS - 1)
        pi = (p / width).long().clamp(0, PROFILE_BINS - 1)
        err = (p - g).abs()
        for key, idx, w in (("bin_abs_err", gi, err), ("bin_rel_err", gi, err / g), ("bin_count", gi, None),
                            ("pred_hist", pi, None)):  # fmt: skip
            self._state[key] += torch.bincount(idx, w, minlength=PROFILE_BINS).to(torch.float64)

    def profile(self) -> dict[str, list[float]]:
        """Error per ground-truth distance bin (``edges`` in metres, ``mae``, ``abs_rel``, ``count``) and the
        ground-truth (``gt_hist``) and predicted (``pred_hist``) depth histograms over the same bins."""
        s = {k: self._state[k].detach().cpu() for k in _PROFILE}
        n = s["bin_count"].clamp_min(1)
        edges = torch.linspace(0.0, self.max_depth, PROFILE_BINS + 1, dtype=torch.float64)
        return {
            "edges": edges.tolist(),
            "mae": (s["bin_abs_err"] / n).tolist(),
            "abs_rel": (s["bin_rel_err"] / n).tolist(),
            "count": [int(c) for c in s["bin_count"]],
            "gt_hist": [int(c) for c in s["bin_count"]],
            "pred_hist": [int(c) for c in s["pred_hist"]],
        }

    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated so far (NaN when nothing valid was seen)."""
        s = {k: v.detach().cpu() for k, v in self._state.items()}
        n = s["images"] if self.per_image else s["count"]
        values = {k: s[k] / n for k in _DEPTH_METRICS} if self.per_image else _depth_from_sums(s)
        out = {k: float(values[k]) if n > 0 else math.nan for k in _DEPTH_METRICS}
        out["pixels"] = int(s["count"])
        out["profile"] = self.profile()
        return out


def _depth_from_sums(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """Metrics from sums over valid pixels (scalars, or (B,) vectors for per-image values)."""
    n = s["count"].clamp_min(1)
    mean_d, mean_d2 = s["log_diff"] / n, s["sq_log"] / n
    return {
        "abs_rel": s["abs_rel"] / n,
        "sq_rel": s["sq_rel"] / n,
        "rmse": (s["sq_err"] / n).sqrt(),
        "rmse_log": mean_d2.sqrt(),
        "log10": s["log10"] / n,
        "mae": s["abs_err"] / n,
        "silog": 100 * (mean_d2 - mean_d.square()).clamp_min(0).sqrt(),
        "delta1": s["d1"] / n,
        "delta2": s["d2"] / n,
        "delta3": s["d3"] / n,
    }
