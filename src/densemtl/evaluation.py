"""The one evaluation loop (validation during training and ``densemtl evaluate``), trivial baselines, reports.

Training-time validation and ``densemtl evaluate`` call the same :func:`evaluate` with the same precision
(autocast on CUDA when ``train.amp``), so a checkpoint gets the same numbers from both. The baselines say what
"learned" means: every task's trivial predictor (``Task.fit_baseline``: the majority class, the median depth,
the mean normal) is scored with the very same metric code in the same pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densemtl.config import Config, replace
from densemtl.fileio import atomic_write_text
from densemtl.runtime import amp_dtype, autocast, forward_at_scale, resolve_device, to_device
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import (
    config_from_checkpoint,
    input_scale,
    load_checkpoint,
    model_from_checkpoint,
)
from densemtl.train.runlog import Progress


@dataclass
class Baseline:
    """Trivial predictions scored alongside the model: ``stats`` per task (``Task.fit_baseline``) and the
    metrics they are accumulated into."""

    stats: dict[str, dict[str, Any]]
    metrics: Any  # MultiTaskMetrics

    def update(self, batch: dict) -> None:
        """Score the trivial predictions for one (CPU) batch."""
        outputs = {t: TASKS[t].baseline_output(s, batch["image"]) for t, s in self.stats.items()}
        self.metrics.update(outputs, batch)


@torch.inference_mode()
def evaluate(
    model,
    loader,
    metrics,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    scale: float = 1.0,
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` at input ``scale`` and return ``metrics.compute()``.

    Metrics are dataset-level, against ground truth at its native resolution, and reduced across ranks. With
    ``amp`` the forward pass runs under autocast on CUDA (as in training); metrics are computed in fp32.
    ``baseline`` is scored on the same batches.
    """
    model.eval()
    metrics.reset()
    dtype = amp_dtype(device, amp)
    for batch in Progress(loader, "evaluate"):  # a bar on a terminal, plain lines in a log file
        if baseline is not None:
            baseline.update(batch)
        batch = to_device(batch, device, channels_last)
        with autocast(device, dtype):
            outputs = forward_at_scale(model, batch["image"], scale)
        metrics.update({k: v.float() for k, v in outputs.items()}, batch)
    metrics.all_reduce()
    return metrics.compute()


def training_statistics(cfg: Config, max_samples: int = 200) -> dict[str, dict[str, Any]]:
    """Each task's trivial-baseline statistics over (an even subset of) the training split."""
    from densemtl.data.folder import FolderDataset

    tasks = tuple(t for t in cfg.model.tasks if TASKS[t].has_baseline)  # only their files are read
    if not tasks:
        return {}
    ds = FolderDataset(cfg.data.root, split=cfg.data.train_split, transform=None, tasks=tasks)
    picks = np.unique(np.linspace(0, len(ds) - 1, min(max_samples, len(ds))).astype(int))
    targets: dict[str, list[torch.Tensor]] = {t: [] for t in tasks}
    for i in picks:
        s = ds[int(i)]
        for t in tasks:
            if s["valid_tasks"][t]:
                targets[t].append(TASKS[t].pack(s[t], s))
    stats = {t: TASKS[t].fit_baseline(v, cfg) for t, v in targets.items() if v}
    return {t: s for t, s in stats.items() if s is not None}  # None: the task has no trivial predictor


def run_evaluation(
    model,
    loader,
    cfg: Config,
    info: dict[str, Any],
    device: torch.device,
    baseline_stats: dict[str, dict[str, Any]] | None = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Model metrics (and baseline metrics) in one pass of :func:`evaluate`, at the training precision."""
    from densemtl.metrics import build_metrics

    # Tasks without a trivial predictor (objects) have no baseline statistics and no baseline metrics.
    baseline = Baseline(baseline_stats, build_metrics(cfg, info, baseline_stats)) if baseline_stats else None
    results = evaluate(
        model,
        loader,
        build_metrics(cfg, info),
        device,
        cfg.train.amp,
        cfg.train.channels_last,
        scale,
        baseline,
    )
    result: dict[str, Any] = {"results": results, "num_images": len(loader.dataset)}
    if baseline is not None:
        result["baseline_results"] = baseline.metrics.compute()
        result["baseline_stats"] = baseline_stats
    return result


@dataclass
class CheckpointOnSplit:
    """A checkpoint's model, ready on ``device``, and a loader over one split of a dataset with its classes."""

    ckpt: dict[str, Any]
    cfg: Config
    model: Any
    dataset: Any
    loader: Any
    device: torch.device


def checkpoint_on_split(
    checkpoint: str | Path,
    data_root: str | Path | None,
    split: str,
    device: str = "auto",
    batch_size: int = 4,
    verb: str = "evaluate",
) -> CheckpointOnSplit:
    """Load ``checkpoint`` and a (whole, untransformed) ``split`` of its dataset, or of ``data_root``.

    A dataset whose class list differs from the checkpoint's is refused when a task depends on it; ``verb``
    names the command in that message.
    """
    from densemtl.data.loaders import build_dataset, make_loader

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    if data_root is not None:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data_root)))
    cfg = replace(cfg, data=replace(cfg.data, max_samples=0))
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, checkpoint).to(dev)
    dataset = build_dataset(cfg, split, train=False)
    names = list(ckpt["dataset"].get("classes", []))
    if any(TASKS[t].uses_classes for t in cfg.model.tasks) and list(dataset.class_names) != names:
        raise ValueError(
            f"{cfg.data.root} has classes {dataset.class_names} but {checkpoint} was trained on "
            f"{names}; {verb} on a dataset with the same class list"
        )
    loader = make_loader(dataset, batch_size, False, cfg.data.num_workers, 0, dev)
    return CheckpointOnSplit(ckpt, cfg, model, dataset, loader, dev)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    split: str = "val",
    out_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``split`` and write metrics.json, metrics.md and plots into ``out_dir``."""
    from densemtl.metrics import summarize

    run = checkpoint_on_split(checkpoint, data_root, split, device, batch_size)
    ckpt, cfg, model, loader, dev = run.ckpt, run.cfg, run.model, run.loader, run.device
    info = {**run.dataset.info, **ckpt["dataset"]}  # the checkpoint's classes and palette are the model's
    stats = training_statistics(cfg) if split != cfg.data.train_split else {}
    scale = input_scale(ckpt)
    result = run_evaluation(model, loader, cfg, info, dev, stats, scale)
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
    write_outputs(result, info, out)
    return result


def markdown_table(result: dict[str, Any], info: dict[str, Any]) -> str:
    """Headline metrics (model vs baselines), then each task's own tables (e.g. per-class IoU), as Markdown."""
    summary, base = result["summary"], result.get("baseline_summary", {})
    lines = ["| metric | model | trivial baseline |", "|---|---:|---:|"]
    for key, value in summary.items():
        b = base.get(key)
        lines.append(f"| {key} | {value:.4f} | {'' if b is None else f'{b:.4f}'} |")
    for task, values in result["results"].items():
        extra = TASKS[task].report(values, info) if task in TASKS else ""
        if extra:
            lines += ["", extra.rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict[str, Any], info: dict[str, Any], out: Path) -> dict[str, Path]:
    """Each task's plots, then metrics.json (with ``plots``: ``{title: file name}``) and metrics.md."""
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    for task, values in result["results"].items():
        if task in TASKS:
            plots.update(TASKS[task].plots(values, info, out))
    result["plots"] = {title: path.name for title, path in plots.items()}
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=float) + "\n")
    atomic_write_text(out / "metrics.md", markdown_table(result, info))
    return plots
