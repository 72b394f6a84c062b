"""Multi-task metrics: one dataset-level accumulator per task (each owned by its task module), ``score`` and Δm.

Accumulators only add integer counts or float64 sums, so results over a dataset do not depend on how it was
batched, and ``state()`` / ``merge()`` / ``all_reduce()`` give the same numbers in DDP as in one process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from densemtl.config import ConfigError
from densemtl.tasks import TASKS, check_tasks
from densemtl.tasks.base import Accumulator


def lower_is_better_names() -> frozenset[str]:
    """Metric names where lower is better, over every known task (for Δm)."""
    return frozenset().union(*(t.lower_is_better for t in TASKS.values()))


LOWER_IS_BETTER: frozenset[str] = lower_is_better_names()  # the built-in tasks' (plug-ins: call the function)


# --------------------------------------------------------------------------------------------- multi-task
class MultiTaskMetrics:
    """One accumulator per task, fed straight from model outputs and collated batches.

    Args:
        metrics: ``{task: accumulator}`` (``Task.make_metrics``); see :func:`build_metrics`.

    Samples that ``batch["valid_tasks"][task]`` marks as unlabelled are skipped for that task.
    """

    def __init__(self, metrics: dict[str, Accumulator]) -> None:
        self.tasks = check_tasks(tuple(metrics))
        self.metrics = dict(metrics)

    def update(self, outputs: dict[str, Tensor], batch: dict) -> None:
        """Add a batch: ``outputs[task]`` as returned by the model, ``batch[task]`` the targets."""
        valid_tasks = batch.get("valid_tasks", {})
        for task, metric in self.metrics.items():
            pred, target = outputs[task].detach(), batch[task].to(outputs[task].device)
            keep = valid_tasks.get(task)
            if keep is not None:
                keep = torch.as_tensor(keep, dtype=torch.bool, device=pred.device).reshape(-1)
                pred, target = pred[keep], target[keep]
            metric.update(pred, target)

    def compute(self) -> dict[str, dict]:
        """``{task: metrics dict}``."""
        return {task: m.compute() for task, m in self.metrics.items()}

    def all_reduce(self) -> None:
        """Sum every task's state over processes (no-op without torch.distributed)."""
        for m in self.metrics.values():
            m.all_reduce()

    def merge(self, other: MultiTaskMetrics) -> None:
        """Add another instance's counts, task by task."""
        for task, m in self.metrics.items():
            m.merge(other.metrics[task])

    def reset(self) -> None:
        """Forget everything accumulated."""
        for m in self.metrics.values():
            m.reset()

    @staticmethod
    def summarize(results: dict[str, dict]) -> dict[str, float]:
        """See ``summarize``."""
        return summarize(results)


def build_metrics(cfg: Any, info: dict[str, Any], tasks: Iterable[str] | None = None) -> MultiTaskMetrics:
    """Metrics for ``tasks`` (default ``cfg.model.tasks``) on a dataset described by ``info`` (its dataset.json)."""
    names = check_tasks(tuple(tasks) if tasks is not None else cfg.model.tasks)
    return MultiTaskMetrics({t: TASKS[t].make_metrics(cfg, info) for t in names})


def check_best_metric(cfg: Any, info: dict[str, Any]) -> None:
    """Refuse a ``train.best_metric`` that evaluation never reports, or a ``best_mode`` that keeps the worst.

    The keys are those :func:`summarize` makes of fresh (empty) accumulators for ``cfg.model.tasks``, so a
    plug-in task's own metrics count; called by the training loop's setup, before the first step.
    """
    name, mode = cfg.train.best_metric, cfg.train.best_mode
    keys = sorted(summarize(build_metrics(cfg, info).compute()))
    if name not in keys:
        raise ConfigError(f"train.best_metric={name!r} is not an evaluation key; choose one of {keys}")
    task, _, metric = name.partition("/")
    want = "min" if task in TASKS and metric in TASKS[task].lower_is_better else "max"
    if mode != want:
        raise ConfigError(
            f"train.best_metric={name!r} is {'lower' if want == 'min' else 'higher'}-is-better but "
            f"train.best_mode={mode!r} would keep the worst checkpoint; set train.best_mode={want}"
        )


def summarize(results: dict[str, dict]) -> dict[str, float]:
    """Flatten ``{task: {name: value}}`` to ``{"task/name": float}`` plus ``"score"``.

    Only scalar quality metrics are kept (no per-class lists, no pixel counts: keys ending in "pixels").

    ``score`` is the mean over tasks of each task's higher-is-better ``headline`` (e.g. mIoU, δ1), used to pick
    the best checkpoint; NaN headlines count as 0 so that an empty evaluation never wins.
    """
    flat: dict[str, float] = {}
    headlines = []
    for task, values in results.items():
        for name, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and not name.endswith("pixels"):
                flat[f"{task}/{name}"] = float(v)
        if task in TASKS and TASKS[task].headline:
            h = float(values.get(TASKS[task].headline, math.nan))
            headlines.append(0.0 if math.isnan(h) else h)
    flat["score"] = sum(headlines) / len(headlines) if headlines else math.nan
    return flat


# ------------------------------------------------------------------------------------------------------ Δm
def _lower_is_better(key: str, names: Iterable[str]) -> bool:
    names = set(names)
    return key in names or key.rsplit("/", 1)[-1] in names


def delta_m(
    mtl: dict[str, float],
    single: dict[str, float],
    lower_is_better: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
) -> float:
    """Multi-task performance change Δm in percent (Maninis et al. 2019; Vandenhende et al. 2021).

    ``Δm = 100/N * sum_i (-1)^{l_i} (M_mtl,i - M_st,i) / M_st,i`` with ``l_i = 1`` when lower is better,
    so a POSITIVE Δm means the multi-task model is better than the single-task baselines.

    Args:
        mtl: flat metrics of the multi-task model, e.g. ``{"semseg/miou": 0.61, "depth/abs_rel": 0.12}``.
        single: the same keys for the single-task baselines (merge the per-task runs' dicts).
        lower_is_better: metric names (``"rmse"``) or full keys (``"depth/rmse"``) where lower is better;
            default: every known task's ``lower_is_better``.
        keys: which metrics to average over; default every key of ``single`` except ``"score"`` and
            ``"*/pixels"`` (counts, not quality).
    """
    if lower_is_better is None:
        lower_is_better = lower_is_better_names()
    if keys is None:
        keys = [k for k in single if k != "score" and not k.endswith("pixels")]
    keys = list(keys)
    if not keys:
        raise ValueError("delta_m needs at least one metric shared by both dicts")
    missing = [k for k in keys if k not in mtl or k not in single]
    if missing:
        raise ValueError(f"delta_m: metric(s) {missing} missing from the multi-task or single-task results")
    total = 0.0
    for k in keys:
        m, s = float(mtl[k]), float(single[k])
        if not (math.isfinite(m) and math.isfinite(s)) or s == 0:
            raise ValueError(f"delta_m: {k} must be finite with a non-zero single-task value, got {m} vs {s}")
        sign = -1.0 if _lower_is_better(k, lower_is_better) else 1.0
        total += sign * (m - s) / abs(s)
    return 100.0 * total / len(keys)


def load_metrics_json(path: str | Path) -> dict[str, float]:
    """Read a flat ``{"task/metric": number}`` JSON written by evaluation (``null`` reads as NaN).

    A file whose top level holds a ``"summary"`` mapping is read from that mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist; run `densemtl evaluate` to write it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("summary"), dict):
        data = data["summary"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metric -> number, got {type(data).__name__}")
    out: dict[str, float] = {}
    for k, v in data.items():
        if v is None:
            out[k] = math.nan
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[k] = float(v)
        else:
            raise ValueError(f"{path}: metric {k!r} should be a number, got {v!r}; expected a flat dict")
    return out
