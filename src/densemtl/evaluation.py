"""Evaluate a checkpoint: dataset-level metrics, trivial baselines, a Markdown table and plots.

The baselines say what "learned" means: a model must beat predicting the majority class everywhere and a
constant depth (the training set's median), both scored with the very same metric code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from densemtl.config import Config, replace
from densemtl.runtime import forward_at_scale, resolve_device, to_device
from densemtl.train.checkpoint import (
    config_from_checkpoint,
    input_scale,
    load_checkpoint,
    model_from_checkpoint,
)


class DepthErrorProfile:
    """Depth error per ground-truth distance bin plus predicted/GT depth histograms (valid pixels only)."""

    def __init__(self, max_depth: float, bins: int = 16) -> None:
        self.edges = np.linspace(0.0, max_depth, bins + 1)
        self.abs_err = np.zeros(bins)
        self.rel_err = np.zeros(bins)
        self.count = np.zeros(bins, dtype=np.int64)
        self.gt_hist = np.zeros(bins, dtype=np.int64)
        self.pred_hist = np.zeros(bins, dtype=np.int64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor, min_depth: float) -> None:
        """``pred``, ``gt``: (B, 1, H, W) metres; pixels with GT outside [min_depth, max] are skipped."""
        g = gt.flatten().double().cpu().numpy()
        p = pred.flatten().double().cpu().numpy()
        keep = (g >= min_depth) & (g <= self.edges[-1])
        g, p = g[keep], np.clip(p[keep], min_depth, self.edges[-1])
        idx = np.clip(np.searchsorted(self.edges, g, side="right") - 1, 0, len(self.count) - 1)
        self.abs_err += np.bincount(idx, np.abs(p - g), len(self.count))
        self.rel_err += np.bincount(idx, np.abs(p - g) / g, len(self.count))
        self.count += np.bincount(idx, minlength=len(self.count))
        self.gt_hist += np.histogram(g, self.edges)[0]
        self.pred_hist += np.histogram(p, self.edges)[0]

    def table(self) -> dict[str, list[float]]:
        n = np.maximum(self.count, 1)
        return {
            "edges": self.edges.tolist(),
            "mae": (self.abs_err / n).tolist(),
            "abs_rel": (self.rel_err / n).tolist(),
            "count": self.count.tolist(),
            "gt_hist": self.gt_hist.tolist(),
            "pred_hist": self.pred_hist.tolist(),
        }


def training_statistics(cfg: Config, max_samples: int = 200) -> dict[str, float]:
    """Majority class and median valid depth over (an even subset of) the training split."""
    from densemtl.data.folder import FolderDataset

    ds = FolderDataset(cfg.data.root, split=cfg.data.train_split, transform=None, tasks=cfg.model.tasks)
    picks = np.unique(np.linspace(0, len(ds) - 1, min(max_samples, len(ds))).astype(int))
    hist = np.zeros(max(cfg.model.num_classes, 1), dtype=np.int64)
    depths = []
    for i in picks:
        s = ds[int(i)]
        if "semseg" in s:
            ids = s["semseg"].flatten().numpy()
            hist += np.bincount(ids[ids < len(hist)], minlength=len(hist))[: len(hist)]
        if "depth" in s:
            d = s["depth"].flatten().numpy()
            depths.append(d[d > 0][::7])  # a stride keeps memory small; the median barely moves
    stats: dict[str, float] = {}
    if "semseg" in cfg.model.tasks:
        stats["majority_class"] = int(hist.argmax())
    if "depth" in cfg.model.tasks and depths:
        stats["median_depth"] = float(np.median(np.concatenate(depths)))
    return stats


def _baseline_outputs(batch: dict, stats: dict[str, float], num_classes: int) -> dict[str, torch.Tensor]:
    """Trivial predictions shaped like the model's: majority class everywhere, constant median depth."""
    b, _, h, w = batch["image"].shape
    out = {}
    if "majority_class" in stats:
        ids = torch.full((b, h, w), int(stats["majority_class"]), dtype=torch.long)
        out["semseg"] = ids
    if "median_depth" in stats:
        out["depth"] = torch.full((b, 1, h, w), stats["median_depth"])
    return out


@torch.inference_mode()
def run_evaluation(
    model,
    loader,
    cfg: Config,
    class_names: list[str],
    device: torch.device,
    baseline_stats: dict[str, float] | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Model metrics, baseline metrics and the depth error profile in one pass over ``loader``."""
    from densemtl.metrics import MultiTaskMetrics

    def new_metrics():
        return MultiTaskMetrics(
            cfg.model.tasks,
            cfg.model.num_classes,
            class_names=class_names,
            min_depth=cfg.data.eval_depth_min,
            max_depth=cfg.data.eval_depth_max,
            per_image=cfg.data.eval_per_image,
        )

    metrics, base = new_metrics(), new_metrics()
    profile = DepthErrorProfile(cfg.data.eval_depth_max)
    model.eval()
    n_images = 0
    for batch in tqdm(loader, desc="evaluate", disable=None, mininterval=1.0):
        cpu_batch = batch
        batch = to_device(batch, device)
        outputs = {k: v.float() for k, v in forward_at_scale(model, batch["image"], scale).items()}
        metrics.update(outputs, batch)
        if baseline_stats:
            base.update(_baseline_outputs(cpu_batch, baseline_stats, cfg.model.num_classes), cpu_batch)
        if "depth" in outputs:
            profile.update(outputs["depth"], batch["depth"], cfg.data.eval_depth_min)
        n_images += batch["image"].shape[0]
    result = {"results": metrics.compute(), "num_images": n_images, "depth_profile": profile.table()}
    if "semseg" in metrics.metrics:
        result["confusion"] = metrics.metrics["semseg"].confusion.cpu().tolist()
    if baseline_stats:
        result["baseline_results"] = base.compute()
        result["baseline_stats"] = baseline_stats
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` and write metrics.json, metrics.md and plots into ``out_dir``."""
    from densemtl.data.loaders import build_dataset, make_loader
    from densemtl.metrics import summarize

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    if data_root is not None:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data_root)))
    cfg = replace(cfg, data=replace(cfg.data, max_samples=0))
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, checkpoint).to(dev)
    dataset = build_dataset(cfg, split, train=False)
    names = list(ckpt["dataset"].get("classes", []))
    if "semseg" in cfg.model.tasks and list(dataset.class_names) != names:
        raise ValueError(
            f"{cfg.data.root} has classes {dataset.class_names} but {checkpoint} was trained on "
            f"{names}; evaluate on a dataset with the same class list"
        )
    loader = make_loader(dataset, batch_size, False, cfg.data.num_workers, 0, dev)
    stats = training_statistics(cfg) if split != cfg.data.train_split else {}
    scale = input_scale(ckpt)
    result = run_evaluation(model, loader, cfg, names, dev, stats, scale)
    result["summary"] = summarize(result["results"])
    if "baseline_results" in result:
        result["baseline_summary"] = summarize(result["baseline_results"])
    result.update(
        checkpoint=str(checkpoint),
        input_scale=scale,
        split=split,
        data_root=cfg.data.root,
        epoch=ckpt.get("epoch"),
    )
    out = Path(out_dir) if out_dir is not None else Path(checkpoint).parent / f"eval_{split}"
    write_outputs(result, names, out)
    return result


def markdown_table(result: dict[str, Any], class_names: list[str]) -> str:
    """Headline metrics (model vs baselines) and per-class IoU as Markdown."""
    summary, base = result["summary"], result.get("baseline_summary", {})
    lines = ["| metric | model | trivial baseline |", "|---|---:|---:|"]
    for key, value in summary.items():
        b = base.get(key)
        lines.append(f"| {key} | {value:.4f} | {'' if b is None else f'{b:.4f}'} |")
    seg = result["results"].get("semseg")
    if seg and "iou" in seg:
        lines += ["", "| class | IoU |", "|---|---:|"]
        for name, iou in zip(class_names, seg["iou"], strict=False):
            lines.append(f"| {name} | {'n/a' if iou != iou else f'{iou:.4f}'} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], class_names: list[str], out: Path) -> None:
    """metrics.json, metrics.md and the three plots."""
    from densemtl.viz.plots import plot_confusion, plot_depth_error_vs_distance, plot_depth_histograms

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "metrics.md").write_text(markdown_table(result, class_names))
    if "confusion" in result:
        plot_confusion(np.array(result["confusion"]), class_names, out / "confusion.png")
    prof = result["depth_profile"]
    if sum(prof["count"]) > 0:
        edges = np.array(prof["edges"])
        plot_depth_error_vs_distance(
            edges,
            np.array(prof["mae"]),
            np.array(prof["abs_rel"]),
            np.array(prof["count"]),
            out / "depth_error_vs_distance.png",
        )
        plot_depth_histograms(
            edges, np.array(prof["gt_hist"]), np.array(prof["pred_hist"]), out / "depth_histogram.png"
        )
