"""Dataset-level metrics: a confusion matrix for segmentation, pooled sums for depth, and the multi-task Δm.

Accumulators only add integer counts or float64 sums, so results over a dataset do not depend on how it was
batched, and ``state()`` / ``merge()`` / ``all_reduce()`` give the same numbers in DDP as in one process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from densemtl.tasks import IGNORE_INDEX, check_tasks

LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "mae", "silog"}
)
HEADLINE: dict[str, str] = {"semseg": "miou", "depth": "delta1"}  # higher-is-better score per task


class _Accumulator:
    """Shared state handling: named tensors that are summed when merged or all-reduced."""

    _state: dict[str, Tensor]

    def state(self) -> dict[str, Tensor]:
        """The accumulated tensors (live references; merging adds to them)."""
        return self._state

    def merge(self, other: _Accumulator) -> None:
        """Add another accumulator's counts (e.g. another worker's) to this one."""
        for k, v in self._state.items():
            v += other.state()[k].to(v.device, v.dtype)

    def all_reduce(self) -> None:
        """Sum the state over all processes when torch.distributed is initialised; no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (a rank may have seen no data)
                self._to(torch.device("cuda", torch.cuda.current_device()))
            for v in self._state.values():
                dist.all_reduce(v, op=dist.ReduceOp.SUM)

    def _to(self, device: torch.device) -> None:
        if next(iter(self._state.values())).device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}


# -------------------------------------------------------------------------------------------- segmentation
class SegMetrics(_Accumulator):
    """Semantic segmentation metrics from a confusion matrix accumulated over the whole dataset.

    Rows are ground-truth classes, columns predictions; one extra column counts predictions outside
    ``[0, C)`` (they are wrong for the ground-truth class, and a false positive of no class). Pixels labelled
    ``ignore_index`` are not counted; other ground-truth ids outside ``[0, C)`` are an error.

    ``compute()`` returns ``iou`` per class (NaN for a class absent from both ground truth and prediction),
    ``miou`` (mean over the classes that are not NaN, so classes that never occur do not count as 0 or 1),
    ``pixel_acc``, ``mean_acc`` (mean recall over classes present in the ground truth), ``dice`` (mean F1
    over the same classes as ``miou``), and with ``class_names`` a ``per_class`` dict by name.
    """

    def __init__(
        self, num_classes: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"got {len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = {"confusion": torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64)}

    @property
    def confusion(self) -> Tensor:
        """(C, C) counts, ``[gt, pred]``, without the out-of-range prediction column."""
        return self._state["confusion"][:, : self.num_classes]

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` class ids (B, H, W) or logits (B, C, H, W); ``target`` ids (B, H, W)."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(
                f"semseg prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        c = self.num_classes
        pred, target = pred.long().flatten(), target.to(pred.device).long().flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if ((target < 0) | (target >= c)).any():
            bad = sorted(set(target[(target < 0) | (target >= c)].unique().tolist()))
            raise ValueError(
                f"semseg target has ids {bad[:10]} outside [0, {c}) that are not the ignore "
                f"index {self.ignore_index}; check the dataset's label mapping"
            )
        out_of_range = (pred < 0) | (pred >= c)
        pred = torch.where(out_of_range, torch.full_like(pred, c), pred)  # counted in the extra column C
        self._to(pred.device)
        counts = torch.bincount(target * (c + 1) + pred, minlength=c * (c + 1))
        self._state["confusion"] += counts.view(c, c + 1)

    def compute(self) -> dict:
        """Metrics over everything accumulated so far (see the class docstring)."""
        conf = self._state["confusion"].double().cpu()
        c = self.num_classes
        tp = conf.diagonal()  # (C,): the diagonal of a (C, C + 1) matrix
        gt = conf.sum(dim=1)  # includes out-of-range predictions
        predicted = conf[:, :c].sum(dim=0)
        union = gt + predicted - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
        recall = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
        dice = torch.where(union > 0, 2 * tp / (gt + predicted).clamp_min(1), nan)
        total = gt.sum()
        out = {
            "miou": _nanmean(iou),
            "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan,
            "mean_acc": _nanmean(recall),
            "dice": _nanmean(dice),
            "iou": iou.tolist(),
            "recall": recall.tolist(),
            "pixels": int(total),
        }
        if self.class_names is not None:
            out["per_class"] = {
                n: {"iou": i, "recall": r, "dice": d, "pixels": int(p)}
                for n, i, r, d, p in zip(
                    self.class_names, iou.tolist(), recall.tolist(), dice.tolist(), gt.tolist(), strict=True
                )
            }
        return out


def _nanmean(x: Tensor) -> float:
    """Mean of the non-NaN entries; NaN when there are none."""
    finite = x[~torch.isnan(x)]
    return float(finite.mean()) if finite.numel() else math.nan


# -------------------------------------------------------------------------------------------------- depth
_SUMS = ("count", "abs_rel", "sq_rel", "sq_err", "sq_log", "log10", "abs_err", "log_diff", "d1", "d2", "d3")
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


class DepthMetrics(_Accumulator):
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

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and ground-truth metres, both (B, 1, H, W) (or (B, H, W))."""
        if pred.shape != target.shape:
            raise ValueError(
                f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        sums = self._image_sums(pred.double(), target.to(pred.device).double())  # {key: (B,)}
        self._to(pred.device)
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

    def compute(self) -> dict[str, float]:
        """Metrics over everything accumulated so far (NaN when nothing valid was seen)."""
        s = {k: v.detach().cpu() for k, v in self._state.items()}
        n = s["images"] if self.per_image else s["count"]
        values = {k: s[k] / n for k in _DEPTH_METRICS} if self.per_image else _depth_from_sums(s)
        out = {k: float(values[k]) if n > 0 else math.nan for k in _DEPTH_METRICS}
        out["pixels"] = int(s["count"])
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


# --------------------------------------------------------------------------------------------- multi-task
class MultiTaskMetrics:
    """One accumulator per task, fed straight from model outputs and collated batches.

    Samples that ``batch["valid_tasks"][task]`` marks as unlabelled are skipped for that task.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        min_depth: float = 1e-3,
        max_depth: float = 80.0,
        per_image: bool = False,
    ) -> None:
        self.tasks = check_tasks(tuple(tasks))
        self.metrics: dict[str, SegMetrics | DepthMetrics] = {}
        if "semseg" in self.tasks:
            self.metrics["semseg"] = SegMetrics(num_classes, ignore_index, class_names)
        if "depth" in self.tasks:
            self.metrics["depth"] = DepthMetrics(min_depth, max_depth, per_image)

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


def summarize(results: dict[str, dict]) -> dict[str, float]:
    """Flatten ``{task: {name: value}}`` to ``{"task/name": float}`` plus ``"score"``.

    Only scalar quality metrics are kept (no per-class lists, no pixel counts).

    ``score`` is the mean over tasks of one higher-is-better headline (semseg ``miou``, depth ``delta1``),
    used to pick the best checkpoint; NaN headlines count as 0 so that an empty evaluation never wins.
    """
    flat: dict[str, float] = {}
    headlines = []
    for task, values in results.items():
        for name, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and name != "pixels":
                flat[f"{task}/{name}"] = float(v)
        if task in HEADLINE:
            h = float(values.get(HEADLINE[task], math.nan))
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
    lower_is_better: Iterable[str] = LOWER_IS_BETTER,
    keys: Iterable[str] | None = None,
) -> float:
    """Multi-task performance change Δm in percent (Maninis et al. 2019; Vandenhende et al. 2021).

    ``Δm = 100/N * sum_i (-1)^{l_i} (M_mtl,i - M_st,i) / M_st,i`` with ``l_i = 1`` when lower is better,
    so a POSITIVE Δm means the multi-task model is better than the single-task baselines.

    Args:
        mtl: flat metrics of the multi-task model, e.g. ``{"semseg/miou": 0.61, "depth/abs_rel": 0.12}``.
        single: the same keys for the single-task baselines (merge the per-task runs' dicts).
        lower_is_better: metric names (``"rmse"``) or full keys (``"depth/rmse"``) where lower is better.
        keys: which metrics to average over; default every key of ``single`` except ``"score"`` and
            ``"*/pixels"`` (counts, not quality).
    """
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
