"""Matplotlib figures for evaluation: confusion matrix, depth error vs distance, depth histograms, curves.

Each function takes plain NumPy arrays and writes a PNG; nothing here knows about models or datasets.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are only ever written to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows = ground truth, columns = prediction), with recall per cell."""
    conf = np.asarray(confusion, dtype=np.float64)
    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    for i in range(n):
        for j in range(n):
            if norm[i, j] >= 0.01:
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("confusion (row-normalised)")
    return _save(fig, path)


def plot_depth_error_vs_distance(
    edges: np.ndarray, mae: np.ndarray, abs_rel: np.ndarray, count: np.ndarray, path: str | Path
) -> Path:
    """MAE (m) and AbsRel per ground-truth distance bin."""
    centres = (edges[:-1] + edges[1:]) / 2
    keep = count > 0
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(centres[keep], mae[keep], "o-", label="MAE (m)")
    ax.set_xlabel("ground-truth depth (m)")
    ax.set_ylabel("MAE (m)")
    ax2 = ax.twinx()
    ax2.plot(centres[keep], abs_rel[keep], "s--", color="tab:red", label="AbsRel")
    ax2.set_ylabel("AbsRel", color="tab:red")
    ax.grid(alpha=0.3)
    ax.set_title("depth error vs distance")
    return _save(fig, path)


def plot_depth_histograms(
    edges: np.ndarray, gt_hist: np.ndarray, pred_hist: np.ndarray, path: str | Path
) -> Path:
    """Distribution of predicted vs ground-truth depth over valid pixels."""
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(centres, gt_hist / max(gt_hist.sum(), 1), width=width, alpha=0.5, label="ground truth")
    ax.bar(centres, pred_hist / max(pred_hist.sum(), 1), width=width, alpha=0.5, label="prediction")
    ax.set_xlabel("depth (m)")
    ax.set_ylabel("fraction of valid pixels")
    ax.legend()
    ax.set_title("predicted vs ground-truth depth")
    return _save(fig, path)


def plot_angular_error_cdf(cdf: list[float], path: str | Path) -> Path:
    """Fraction of valid pixels whose normal is within each angle (1..180 degrees), with the usual thresholds."""
    degrees = np.arange(1, len(cdf) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(degrees, np.asarray(cdf) * 100, "-")
    for t in (11.25, 22.5, 30.0):
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 90)
    ax.set_ylim(0, 100)
    ax.set_xlabel("angular error (degrees)")
    ax.set_ylabel("% of valid pixels within")
    ax.grid(alpha=0.3)
    ax.set_title("normals: cumulative angular error")
    return _save(fig, path)


def plot_training_curves(records: list[dict], keys: list[str], path: str | Path) -> Path:
    """One subplot per key of the per-epoch JSONL records (missing keys skipped)."""
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 3))
    axes = np.atleast_1d(axes)
    for ax, key in zip(axes, keys, strict=False):
        xs = [r["epoch"] for r in records if key in r]
        ax.plot(xs, [r[key] for r in records if key in r], "o-")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _save(fig, path)
