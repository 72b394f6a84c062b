"""Matplotlib figures for uncertainty: depth sparsification curves and segmentation reliability diagrams.

Each function takes the plain dicts that :class:`~densemtl.tasks.uncertainty_metrics.Sparsification` and
``Calibration`` return (``"sparsification"``, ``"reliability"``) and writes a PNG atomically; nothing here knows
about models or datasets.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from densemtl.fileio import atomic_write  # noqa: E402
from densemtl.tasks.uncertainty_metrics import curve_area  # noqa: E402

_TITLES = {"abs_rel": "AbsRel", "rmse": "RMSE (m)", "delta1": "δ1 error (1 - δ1)"}


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG through :func:`~densemtl.fileio.atomic_write` and close it."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def plot_sparsification(curves: dict, out: str | Path) -> Path:
    """One panel per metric: the model's, the oracle's and the random sparsification curves, AUSE/AURG on top.

    ``curves`` is ``{"fractions": [...], metric: {"model": [...], "oracle": [...], "random": [...]}, ...}``;
    AUSE = area(model) - area(oracle) and AURG = area(random) - area(model) are recomputed from the curves.
    """
    x = np.asarray(curves["fractions"], dtype=np.float64)
    metrics = [m for m in curves if m != "fractions"]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(4.2 * max(len(metrics), 1), 3.6))
    for ax, m in zip(np.atleast_1d(axes), metrics, strict=False):
        ys = {k: np.asarray(v, dtype=np.float64) for k, v in curves[m].items()}
        ax.plot(x, ys["model"], "-", label="model")
        ax.plot(x, ys["oracle"], "--", label="oracle")
        ax.plot(x, ys["random"], ":", color="grey", label="random")
        ause, aurg = (
            curve_area(ys["model"], x) - curve_area(ys["oracle"], x),
            curve_area(ys["random"], x) - curve_area(ys["model"], x),
        )
        ax.set_title(f"{_TITLES.get(m, m)}: AUSE {ause:.3g}, AURG {aurg:.3g}", fontsize=9)
        ax.set_xlabel("fraction of pixels removed (most uncertain first)")
        ax.set_ylabel(_TITLES.get(m, m))
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_reliability(reliability: dict, out: str | Path, title: str = "") -> Path:
    """Reliability diagram: accuracy per confidence bin as bars, the diagonal, and the share of pixels per bin.

    ``reliability`` is ``{"edges", "confidence", "accuracy", "count"}``; the ECE in the title is recomputed from
    it (``sum_b n_b / N * |acc_b - conf_b|``). Empty bins (NaN, or None after JSON) draw no bar.
    """
    edges = np.asarray(reliability["edges"], dtype=np.float64)
    count = np.asarray(reliability["count"], dtype=np.float64)
    conf, acc = (np.array([np.nan if v is None else v for v in reliability[k]], dtype=np.float64)
                 for k in ("confidence", "accuracy"))  # fmt: skip
    has = count > 0
    total = count.sum()
    ece = float((count[has] * np.abs(acc[has] - conf[has])).sum() / total) if total > 0 else float("nan")
    left, width = edges[:-1], np.diff(edges)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.bar(left, np.where(has, count / max(total, 1), 0), width=width, align="edge", color="lightgrey",
           label="share of pixels")  # fmt: skip
    ax.bar(
        left[has],
        acc[has],
        width=width[has],
        align="edge",
        fill=False,
        edgecolor="tab:blue",
        label="accuracy",
    )
    ax.plot(conf[has], acc[has], "o", color="tab:blue", markersize=3)  # at each bin's mean confidence
    ax.plot([0, 1], [0, 1], "--", color="tab:red", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title + ': ' if title else ''}reliability, ECE {ece:.3f}", fontsize=10)
    return _save(fig, out)
