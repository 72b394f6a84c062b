"""Uncertainty metrics: depth sparsification (AUSE, AURG), segmentation calibration (ECE, NLL, Brier), and the
post-hoc fits that calibrate them (a softmax temperature, a depth-std scale).

Both accumulators keep only fixed-size int64 counts and float64 sums (histograms, no per-pixel storage), so they
are dataset-level, independent of batching and mergeable across processes like every other
:class:`~densemtl.tasks.base.Accumulator`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from densemtl.tasks.base import IGNORE_INDEX, Accumulator

# Log-spaced histogram grid shared by every ranked quantity (relative std, std in metres, AbsRel, |error| in
# metres): 10^-8 .. 10^5 covers them all (values outside fall into the end bins; <= 0 into the first).
_LOG10_RANGE = (-8.0, 5.0)
_DELTA1 = 1.25  # a pixel is a delta1 outlier when max(pred/gt, gt/pred) >= 1.25
_METRICS = ("abs_rel", "rmse", "delta1")


def _log_bin(x: Tensor, bins: int) -> Tensor:
    """Histogram bin of each value on the log grid; NaN goes to the top bin (an undefined value is least trusted)."""
    lo, hi = _LOG10_RANGE
    pos = (x.clamp_min(1e-300).log10() - lo) * (bins / (hi - lo))
    return torch.nan_to_num(pos, nan=bins, posinf=bins, neginf=0.0).clamp(0, bins - 1).long()


def _remaining_means(count: np.ndarray, sums: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Mean of what remains after removing each fraction (< 1) of pixels from the top bin down.

    A partly removed bin gives up the same share of its count and of its sum (its pixels count as tied), which
    is linear interpolation of the cumulative sum over the cumulative count, kept from the lowest bin up.
    """
    keep = count > 0
    cum_n = np.concatenate([[0.0], np.cumsum(count[keep], dtype=np.float64)])
    cum_s = np.concatenate([[0.0], np.cumsum(sums[keep], dtype=np.float64)])
    kept = (1.0 - fractions) * cum_n[-1]
    return np.interp(kept, cum_n, cum_s) / kept


def curve_area(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal area under ``y(x)`` (what mono-uncertainty's ``np.trapz`` computes)."""
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


class Sparsification(Accumulator):
    """Sparsification curves of depth uncertainty, AUSE and AURG for AbsRel, RMSE and the delta1 error.

    Convention of Poggi et al. (CVPR 2020, github.com/mattpoggi/mono-uncertainty, ``evaluate.py``:
    ``compute_aucs`` / ``compute_eigen_errors_v2``), which follows Ilg et al. (ECCV 2018):

    - ``intervals`` = 50: the metric of the remaining pixels after removing fractions 0, 0.02, ..., 0.98 of
      them, most uncertain first, and 0 at fraction 1 (nothing left). Curves are raw metric values, not
      normalised by their first point. RMSE is the root of the mean squared error of what remains; the delta1
      error is the fraction of remaining pixels with ``max(p/g, g/p) >= 1.25`` (mono-uncertainty's ``1 - a1``).
    - Oracle: pixels removed in order of their true error (AbsRel; squared error for RMSE; the ratio
      ``max(p/g, g/p)`` for delta1). Random: the full-set metric at every fraction < 1 (the expectation of
      random removal). AUSE = area(model) - area(oracle), AURG = area(random) - area(model), trapezoidal.

    Where we differ, and why: (1) one curve pooled over the whole dataset (mono-uncertainty averages per-image
    AUSE/AURG), so the state is mergeable; (2) the random curve is also 0 at fraction 1, like the other two
    (mono-uncertainty integrates it as a constant up to 1, adding ``metric / (2 * intervals)`` to every AURG), so
    a constant uncertainty scores AURG = 0; (3) each metric is ranked by the uncertainty in its own units:
    AbsRel and delta1 by ``s`` (the relative std), RMSE by the std in metres ``depth * s`` (mono-uncertainty
    ranks all three by one map).

    Pixels: as :class:`~densemtl.tasks.depth_metrics.DepthMetrics` (finite ground truth in
    ``[min_depth, max_depth]``, predictions clamped to it; ``depth * s`` uses the clamped depth). An ``s <= 0``
    ranks as the most certain, a NaN ``s`` as the least.

    Approximation: log-spaced histograms (``bins`` over 10^-8..10^5) of each ranking quantity hold per-bin
    counts and error sums; the oracle uses histograms of the true AbsRel and |error| (the delta1 oracle is exact
    from the outlier count). Pixels sharing a bin count as tied, so a partly removed bin gives up a linear share
    of its errors; with the default 4096 bins (0.7% wide), AUSE and AURG on random data match an exact sort to 0.1%.
    """

    def __init__(
        self, min_depth: float = 1e-3, max_depth: float = 80.0, bins: int = 4096, intervals: int = 50
    ) -> None:
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        if bins < 1 or intervals < 1:
            raise ValueError(f"Sparsification needs bins >= 1 and intervals >= 1, got {bins}, {intervals}")
        self.min_depth, self.max_depth, self.bins, self.intervals = min_depth, max_depth, bins, intervals
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        ints = ("rel_count", "rel_outliers", "abs_count", "oracle_rel_count", "oracle_abs_count")
        floats = ("rel_abs_rel", "abs_sq_err", "oracle_rel_abs_rel", "oracle_abs_sq_err")
        self._state = {k: torch.zeros(self.bins, dtype=torch.int64) for k in ints}
        self._state.update({k: torch.zeros(self.bins, dtype=torch.float64) for k in floats})

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` (B, 2, H, W) depth in metres and ``s`` (std of ln depth), ``target`` (B, 1, H, W).

        A 1-channel ``pred`` (a model without uncertainty) is ignored.
        """
        if pred.dim() != 4 or pred.shape[1] not in (1, 2):
            raise ValueError(f"depth prediction must be (B, 1 or 2, H, W) (depth, log-depth std), got "
                             f"{tuple(pred.shape)}")  # fmt: skip
        if target.dim() == 3:
            target = target.unsqueeze(1)
        if target.shape != (pred.shape[0], 1, *pred.shape[2:]):
            raise ValueError(
                f"depth target {tuple(target.shape)} does not match prediction {tuple(pred.shape)}"
            )
        if pred.shape[1] == 1:
            return
        pred, gt = pred.double(), target.to(pred.device).double()[:, 0]
        valid = torch.isfinite(gt) & (gt > 0) & (gt >= self.min_depth) & (gt <= self.max_depth)
        p = pred[:, 0][valid].clamp(self.min_depth, self.max_depth)  # (N,) like DepthMetrics
        s, g = pred[:, 1][valid], gt[valid]  # (N,)
        err = (p - g).abs()
        rel = err / g
        outlier = torch.maximum(p / g, g / p) >= _DELTA1
        self._to(pred.device)
        b = self.bins
        rel_bin, abs_bin = _log_bin(s, b), _log_bin(p * s, b)  # the two rankings: relative std, std in metres
        adds = {
            "rel_count": torch.bincount(rel_bin, minlength=b),
            "rel_outliers": torch.bincount(rel_bin[outlier], minlength=b),
            "rel_abs_rel": torch.bincount(rel_bin, rel, minlength=b),
            "abs_count": torch.bincount(abs_bin, minlength=b),
            "abs_sq_err": torch.bincount(abs_bin, err.square(), minlength=b),
            "oracle_rel_count": torch.bincount(_log_bin(rel, b), minlength=b),
            "oracle_rel_abs_rel": torch.bincount(_log_bin(rel, b), rel, minlength=b),
            "oracle_abs_count": torch.bincount(_log_bin(err, b), minlength=b),
            "oracle_abs_sq_err": torch.bincount(_log_bin(err, b), err.square(), minlength=b),
        }
        for k, v in adds.items():
            self._state[k] += v.to(self._state[k].dtype)

    def compute(self) -> dict[str, Any]:
        """AUSE/AURG per metric and the curves (see the class docstring); ``{}`` when nothing was accumulated."""
        s = {k: v.detach().cpu().numpy() for k, v in self._state.items()}
        n = int(s["rel_count"].sum())
        if n == 0:
            return {}
        x = np.linspace(0.0, 1.0, self.intervals + 1)
        f = x[:-1]  # fractions with something left; the curves end with 0 at fraction 1
        outliers = float(s["rel_outliers"].sum())
        kept = (1.0 - f) * n
        curves = {
            "abs_rel": (_remaining_means(s["rel_count"], s["rel_abs_rel"], f),
                        _remaining_means(s["oracle_rel_count"], s["oracle_rel_abs_rel"], f),
                        s["rel_abs_rel"].sum() / n),
            "rmse": (np.sqrt(_remaining_means(s["abs_count"], s["abs_sq_err"], f)),
                     np.sqrt(_remaining_means(s["oracle_abs_count"], s["oracle_abs_sq_err"], f)),
                     math.sqrt(s["abs_sq_err"].sum() / n)),
            "delta1": (_remaining_means(s["rel_count"], s["rel_outliers"], f),
                       np.maximum(outliers - f * n, 0.0) / kept,  # exact: the oracle drops outliers first
                       outliers / n),
        }  # fmt: skip
        out: dict[str, Any] = {}
        nested: dict[str, Any] = {"fractions": x.tolist()}
        for m, (model, oracle, full) in curves.items():
            model, oracle = np.append(model, 0.0), np.append(oracle, 0.0)
            random = np.append(np.full(len(f), full), 0.0)
            out[f"ause_{m}"] = curve_area(model, x) - curve_area(oracle, x)
            out[f"aurg_{m}"] = curve_area(random, x) - curve_area(model, x)
            nested[m] = {"model": model.tolist(), "oracle": oracle.tolist(), "random": random.tolist()}
        out["sparsification"] = nested
        return out


class Calibration(Accumulator):
    """Pixel-wise calibration of segmentation probabilities over the whole dataset.

    ``compute()`` returns ``ece`` (``bins`` equal-width confidence bins over [0, 1], a confidence ``c`` in bin
    ``b`` when ``b/B < c <= (b+1)/B``; ``sum_b n_b / N * |acc_b - conf_b|`` with confidence = max softmax and
    accuracy = argmax correct), ``nll`` (mean cross-entropy, nats), ``brier`` (mean over pixels of the multi-class
    Brier score ``sum_c (p_c - y_c)^2``, in [0, 2]; not divided by the number of classes), ``pixels`` and
    ``reliability`` (``edges``, and per bin the mean ``confidence``, ``accuracy`` (None for an empty bin) and
    ``count``). Pixels labelled ``ignore_index`` or outside ``[0, C)`` are skipped. Nothing seen: NaN scalars.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, bins: int = 15) -> None:
        if num_classes < 1 or bins < 1:
            raise ValueError(f"Calibration needs num_classes >= 1 and bins >= 1, got {num_classes}, {bins}")
        self.num_classes, self.ignore_index, self.bins = num_classes, ignore_index, bins
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = {
            "count": torch.zeros(self.bins, dtype=torch.int64),
            "correct": torch.zeros(self.bins, dtype=torch.int64),
            "confidence": torch.zeros(self.bins, dtype=torch.float64),
            "nll": torch.zeros((), dtype=torch.float64),
            "brier": torch.zeros((), dtype=torch.float64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` logits (B, C, H, W) (already divided by a temperature, if any), ``target`` (B, H, W)."""
        c = self.num_classes
        if pred.dim() != 4 or pred.shape[1] != c or target.shape != (pred.shape[0], *pred.shape[2:]):
            raise ValueError(f"Calibration expects logits (B, {c}, H, W) and class ids (B, H, W), got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")  # fmt: skip
        target = target.to(pred.device).long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < c)  # (B, H, W)
        logits = pred.movedim(1, -1)[keep]  # (N, C)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        y = target[keep]  # (N,)
        logp = logits.log_softmax(dim=1)
        prob = logp.exp()
        conf, top = prob.max(dim=1)
        p_y = prob.gather(1, y[:, None])[:, 0]
        brier = prob.square().sum(dim=1) - 2 * p_y + 1  # sum_c (p_c - y_c)^2 without a one-hot tensor
        idx = (conf.double() * self.bins).ceil().long().clamp(1, self.bins) - 1  # bins are (lo, hi]
        self._to(pred.device)
        b = self.bins
        self._state["count"] += torch.bincount(idx, minlength=b)
        self._state["correct"] += torch.bincount(idx[top == y], minlength=b)
        self._state["confidence"] += torch.bincount(idx, conf.double(), minlength=b)
        self._state["nll"] -= logp.gather(1, y[:, None]).double().sum()
        self._state["brier"] += brier.double().sum()

    def compute(self) -> dict[str, Any]:
        """ECE, NLL, Brier and the reliability diagram (see the class docstring)."""
        s = {k: v.detach().cpu().double() for k, v in self._state.items()}
        n = float(s["count"].sum())
        nonempty = s["count"] > 0
        safe = s["count"].clamp_min(1)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        conf = torch.where(nonempty, s["confidence"] / safe, nan)
        acc = torch.where(nonempty, s["correct"] / safe, nan)
        ece = float((s["correct"] - s["confidence"]).abs().sum() / n) if n > 0 else math.nan
        return {
            "ece": ece,
            "nll": float(s["nll"] / n) if n > 0 else math.nan,
            "brier": float(s["brier"] / n) if n > 0 else math.nan,
            "pixels": int(n),
            "reliability": {
                "edges": torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64).tolist(),
                "confidence": [None if math.isnan(v) else v for v in conf.tolist()],  # None: empty bin (JSON null)
                "accuracy": [None if math.isnan(v) else v for v in acc.tolist()],
                "count": [int(v) for v in s["count"]],
            },
        }


# ----------------------------------------------------------------------------------------------- post-hoc fits
T_RANGE = (0.05, 20.0)  # the temperatures fit_temperature may return
_CHUNK = 4096  # rows per step of a pass in fit_temperature: stays in cache and bounds memory whatever N is
_WARM_ROWS = 1 << 17  # fit_temperature first solves on about this many rows (every k-th), then refines on all


def _nll_slope(z: Tensor, zmax: Tensor, zy: Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative over ``beta = 1/T`` of the mean NLL of ``softmax(beta * z)``.

    ``zmax`` (N,) is each row's max logit and ``zy`` (N,) its label's logit minus ``zmax``. d/dbeta =
    mean(E_p[z] - z_y) and d2/dbeta2 = mean(Var_p[z]) >= 0: the NLL is convex in beta.
    """
    g = h = 0.0
    for zc, mc, yc in zip(z.split(_CHUNK), zmax.split(_CHUNK), zy.split(_CHUNK), strict=True):
        d = zc - mc[:, None]  # (n, C) <= 0: shifting by the max keeps exp() in range for every beta > 0
        e = d.mul(beta).exp_()
        s0 = e.sum(dim=1)
        ed = e.mul_(d)
        mean = ed.sum(dim=1) / s0  # E_p[z] - zmax
        var = ed.mul_(d).sum(dim=1) / s0 - mean.square()
        g += float((mean - yc).double().sum())
        h += float(var.clamp_min(0).double().sum())
    return g / len(zy), h / len(zy)


def _newton_beta(z: Tensor, zmax: Tensor, zy: Tensor, beta: float, tol: float) -> float:
    """The NLL-minimising ``beta`` in ``1 / T_RANGE``: safeguarded Newton from ``beta`` (bisection in log space
    when a step leaves the bracket; a bound is tried itself before bisecting towards it). Stops after a step
    smaller than ``tol * beta``: convergence is quadratic, so the result is then within ~``tol**2``."""
    b_min, b_max = 1 / T_RANGE[1], 1 / T_RANGE[0]
    lo, hi = b_min, b_max
    for _ in range(100):
        g, h = _nll_slope(z, zmax, zy, beta)
        if g > 0:
            hi = beta  # past the minimum
        else:
            lo = beta
        if g == 0 or hi - lo <= 1e-12 * hi:  # an exact stationary point, or the minimum is at a bound
            return beta
        step = beta - g / h if h > 0 else math.nan
        if step >= hi and hi == b_max or step <= lo and lo == b_min:
            step = hi if step >= hi else lo
        elif not lo < step < hi:
            step = math.sqrt(lo * hi)
        if abs(step - beta) <= tol * beta:
            return step
        beta = step
    return beta


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The temperature ``T`` in [0.05, 20] minimising the mean NLL of ``softmax(logits / T)``.

    Args:
        logits: (N, C) logits of valid pixels (float32, or float64 computed as such).
        labels: (N,) class ids in [0, C).

    The NLL is convex in ``1/T``: safeguarded Newton iterations on ``1/T``, first on a regular subsample of
    rows (when N is large), then on all rows from there (usually one pass); ``T`` is exact to ~2e-5 relative.
    Deterministic, CPU or GPU; memory beyond the input is a few MB.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"fit_temperature expects logits (N, C) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")  # fmt: skip
    if logits.shape[0] == 0:
        raise ValueError(
            "fit_temperature got no pixels: pass the logits and labels of valid (not ignored) pixels"
        )
    labels = labels.to(logits.device).long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(
            f"fit_temperature labels must be in [0, {logits.shape[1]}): filter out ignored pixels"
        )
    z = logits if logits.dtype == torch.float64 else logits.float()
    zmax = z.amax(dim=1)  # (N,)
    if not torch.isfinite(zmax).all() or not torch.isfinite(z.min()):
        raise ValueError("fit_temperature got non-finite logits")
    zy = z.gather(1, labels[:, None])[:, 0] - zmax  # (N,)
    k = max(1, len(zy) // _WARM_ROWS)
    beta = _newton_beta(z[::k], zmax[::k], zy[::k], 1.0, tol=1e-5) if k > 1 else 1.0
    return 1.0 / _newton_beta(z, zmax, zy, beta, tol=1e-5 if k == 1 else 5e-3)  # ~1 pass from a close start


def fit_std_scale(residual: Tensor, std: Tensor, dist: str) -> float:
    """The factor ``k`` minimising the NLL of log-depth residuals under the scaled predicted std ``k * std``.

    Args:
        residual: (N,) ``ln(pred) - ln(gt)`` on valid pixels.
        std: (N,) predicted std of ln depth (> 0).
        dist: ``"gaussian"`` (NLL ``ln(k std) + r^2 / (2 k^2 std^2)``, so ``k^2 = mean(r^2 / std^2)``) or
            ``"laplace"`` with scale ``b = k std / sqrt(2)`` (NLL ``ln(2 b) + |r| / b``, so ``k = mean(|r| / b1)``
            with ``b1 = std / sqrt(2)``).
    """
    if dist not in ("gaussian", "laplace"):
        raise ValueError(f"fit_std_scale dist must be 'gaussian' or 'laplace', got {dist!r}")
    if residual.dim() != 1 or std.shape != residual.shape:
        raise ValueError(f"fit_std_scale expects residual (N,) and std (N,), got {tuple(residual.shape)} "
                         f"and {tuple(std.shape)}")  # fmt: skip
    if residual.numel() == 0:
        raise ValueError("fit_std_scale got no pixels: pass the residuals and stds of valid depth pixels")
    r, s = residual.double(), std.to(residual.device).double()
    if not (torch.isfinite(r).all() and torch.isfinite(s).all() and (s > 0).all()):
        raise ValueError(
            "fit_std_scale needs finite residuals and finite std > 0 (mask invalid pixels first)"
        )
    k = (
        float((r / s).square().mean().sqrt())
        if dist == "gaussian"
        else float((r.abs() / (s / math.sqrt(2))).mean())
    )
    if k == 0:
        raise ValueError("fit_std_scale: every residual is 0, so no std scale fits (k would be 0)")
    return k
