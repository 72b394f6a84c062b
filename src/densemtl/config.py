"""Typed, frozen experiment configuration loaded from YAML with ``--set a.b=c`` overrides.

One ``Config`` holds four sections (data, model, loss, train). It is saved inside every checkpoint so that a
checkpoint rebuilds its own model. Unknown keys, wrong types and out-of-range numbers (:data:`BOUNDS`: NaN and
infinity nowhere, ``lr > 0``, ``epochs >= 1``, ...) are errors that name the key when the config loads, because a
typo in an experiment file should never silently fall back to a default or train by gradient ascent.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from densemtl.yamlio import YAMLFileError, parse_yaml, read_yaml


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives and how training samples are augmented."""

    root: str = "data/synthetic"
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[int, int] = (256, 512)  # training crop (H, W) at full resolution
    scale_range: tuple[float, float] = (0.75, 1.25)  # random zoom about the camera
    hflip: bool = True
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 disables
    eval_depth_min: float = 1e-3  # metres; depth metrics only count GT inside [min, max]
    eval_depth_max: float = 80.0
    eval_scale: float = (
        0.0  # network input scale for evaluation/prediction; 0 = the last training phase's scale
    )
    eval_per_image: bool = False  # depth metrics averaged per image (KITTI style) instead of per pixel
    num_workers: int = 2
    max_samples: int = 0  # 0 = all; >0 keeps the first N of each split (quick runs, tests)


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build; only ``densemtl.models.build_model`` reads this."""

    tasks: tuple[str, ...] = ("semseg", "depth")
    num_classes: int = 0  # 0 = take it from the dataset's dataset.json
    object_classes: tuple[str, ...] = ()  # objects task: () = take them from dataset.json object_classes
    objects_trunks: int = 1  # objects head: 1 = heatmaps and boxes share a trunk, 2 = one each (docs/objects.md)
    backbone: str = "mobilenet_v3_large"
    pretrained: str = "none"  # none | imagenet (torchvision weights, downloads when online)
    backbone_weights: str = ""  # local state-dict file; loaded with weights_only=True
    # A densemtl pretrained folder or Hub id (docs/sharing.md): every tensor whose name and shape match is copied
    # into the new model before training. Read by the training setup only, never when a model is rebuilt.
    init_from: str = ""
    freeze: str = "none"  # none | all | bn | first_n_stages
    freeze_stages: int = 0  # used by freeze=first_n_stages
    decoder: str = "lwrefinenet"  # lwrefinenet | unet
    decoder_channels: int = 128  # LW-RefineNet: coarsest width (tapers finer); U-Net: coarsest width, output //4
    decoder_taper: bool = True  # LW-RefineNet: widths halve towards stride 4 (False = the same everywhere)
    crp_stages: tuple[int, ...] = (0, 2, 2, 4)  # LW-RefineNet: CRP stages per level, fine to coarse
    # Default heads widen the shared 32-channel stride-4 map per task: chosen on accuracy (real NYUv2 frames) and
    # latency together, benchmarks/pareto.py; see the README's "Accuracy per millisecond".
    head: str = "separable"  # light (depthwise 3x3 + ReLU) | separable (+ 1x1 conv-BN-ReLU) | conv (3x3 conv-BN-ReLU)
    head_channels: int = 128  # width of a separable/conv head's hidden layer (0 = the decoder's output width)
    bn_momentum: float = 0.1  # BatchNorm running-stat momentum for every layer (torchvision's MobileNets use 0.01)
    upsample: str = "bilinear"  # bilinear | transposed (U-Net)
    aspp: bool = False
    sharing: str = "shared"  # shared (one decoder, light heads) | split (one decoder per task)
    depth_param: str = "log"  # direct | log | inverse; the head always returns metres
    min_depth: float = 0.1  # metres, bounds of the depth head's output
    max_depth: float = 100.0
    # Tasks with an aleatoric output predict it (depth: the std of ln depth; normals: an angular spread);
    # docs/uncertainty.md. Segmentation's softmax is its own uncertainty.
    uncertainty: bool = True
    dropout: float = 0.0  # heads: Dropout2d before the output conv; > 0 allows MC dropout (--mc-samples)


@dataclass(frozen=True)
class LossConfig:
    """Per-task losses and how they are combined."""

    semseg: str = "ce"  # ce | bce | dice | ce+dice
    depth: str = "l1"  # l1 | mse | berhu | silog | laplace_nll | gaussian_nll (need model.uncertainty)
    nll_beta: float = 1.0  # beta-NLL (Seitzer et al. 2022): 1 gives the mean L1 (Laplace) / L2 (Gaussian) gradients
    normals: str = "cosine"  # cosine (1 - cos) | angular (angle in radians, L1)
    depth_space: str = "log"  # metres | log | blog (clip to depth_clip, then ln(d)/5)
    depth_clip: float = 80.0  # metres
    silog_lambda: float = 0.85  # SILog variance weight (1.0 = fully scale-invariant)
    silog_scale: float = 10.0  # SILog multiplier (BTS convention)
    weighting: str = "fixed"  # fixed | uncertainty | dwa | gradnorm | pcgrad | cagrad
    weighting_args: dict[str, float] = field(default_factory=dict)  # e.g. {alpha: 0.5} (GradNorm), {c: 0.4}
    weights: dict[str, float] = field(default_factory=dict)  # {task: weight}; a task not named weighs 1.0
    class_weights: tuple[float, ...] = ()  # empty = uniform
    # The objects loss's terms {heat, box, distance, box3d} (densemtl.tasks.objects_head); a term not named keeps
    # its default (heat 1, box 5, distance 1, box3d 0.5).
    objects_terms: dict[str, float] = field(default_factory=dict)
    # How far the objects loss evens out its classes in each batch: each class's centres and boxes weigh
    # (objects / (classes x its objects)) ** this; 0 = every object alike (CenterNet), 1 = every class alike.
    objects_class_balance: float = 0.0


@dataclass(frozen=True)
class PhaseConfig:
    """One progressive-resolution phase: a fraction of the crop size with its own epochs, batch and LR."""

    scale: float = 1.0
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation schedule and run bookkeeping."""

    epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_mult: float = 1.0  # encoder LR = lr * this (e.g. 0.1 when fine-tuning ImageNet weights)
    phases: tuple[PhaseConfig, ...] = ()  # empty = one phase at full crop with the values above
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True
    grad_clip: float = 5.0  # 0 disables
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/default"
    best_metric: str = "score"  # metric key in the evaluation result; 'score' = mean of task scores
    best_mode: str = "max"
    max_nonfinite: int = 10  # stop after this many consecutive non-finite batches
    log_every: int = 10
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    sync_bn: bool = False  # SyncBatchNorm across processes under torchrun (DDP)


@dataclass(frozen=True)
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# ------------------------------------------------------------------------------------------ value checks
@dataclass(frozen=True)
class Bound:
    """The finite numbers a field accepts: ``lo <= x <= hi`` (``<`` where ``*_open``); tuples and dict values
    are checked element by element."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def accepts(self, x: float) -> bool:
        """Whether ``x`` is finite and inside the bounds."""
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return _finite(x) and above and below

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1, UNIT = Bound(0, lo_open=True), Bound(0), Bound(1), Bound(0, 1)

# Every numeric field has a rule; a field without one (e.g. one added later) need only be finite.
BOUNDS: dict[type, dict[str, Bound]] = {
    DataConfig: {
        "crop": Bound(1, 16384), "scale_range": Bound(0, 16, lo_open=True), "color_jitter": NON_NEGATIVE,
        "eval_depth_min": POSITIVE, "eval_depth_max": POSITIVE, "eval_scale": Bound(0, 4),
        "num_workers": NON_NEGATIVE, "max_samples": NON_NEGATIVE,
    },
    ModelConfig: {
        "num_classes": NON_NEGATIVE, "freeze_stages": NON_NEGATIVE, "decoder_channels": AT_LEAST_1,
        "objects_trunks": Bound(1, 2), "crp_stages": NON_NEGATIVE, "head_channels": NON_NEGATIVE, "bn_momentum": UNIT,
        "min_depth": POSITIVE, "max_depth": POSITIVE, "dropout": Bound(0, 1, hi_open=True),
    },
    LossConfig: {
        "depth_clip": POSITIVE, "silog_lambda": UNIT, "silog_scale": POSITIVE, "nll_beta": UNIT, "weighting_args": NON_NEGATIVE,
        "weights": NON_NEGATIVE, "class_weights": NON_NEGATIVE, "objects_terms": NON_NEGATIVE,
        "objects_class_balance": UNIT,
    },
    PhaseConfig: {
        "scale": Bound(0, 4, lo_open=True), "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE,
    },
    TrainConfig: {
        "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
        "encoder_lr_mult": NON_NEGATIVE, "grad_clip": NON_NEGATIVE, "seed": Bound(0, 2**32 - 1),
        "max_nonfinite": AT_LEAST_1, "log_every": AT_LEAST_1, "threads": NON_NEGATIVE,
    },
}  # fmt: skip

# Keys people look for that densemtl deliberately does not have, with the fix.
NOT_CONFIG_KEYS = {
    "ignore_index": "densemtl always uses 255 for unlabelled pixels; map your void id to 255 when converting "
    "the labels (see docs/folder_format.md)",
}

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxdict, _short.maxstring, _short.maxother = 3, 8, 8, 60, 60


def _show(value: Any) -> str:
    """A bounded repr for messages (a YAML alias bomb must not become a gigabyte error message)."""
    return _short.repr(value)


def _numbers(value: Any, where: str) -> list[tuple[str, float]]:
    """``(key, number)`` for a field value: a number itself, or each one in a tuple or dict (bools excluded)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(where, value)]
    if isinstance(value, tuple | list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{where}[{i}]")]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{where}.{k}")]
    return []


def _finite(x: float) -> bool:
    return isinstance(x, int) or math.isfinite(x)  # an int of 400 digits is finite, and too big for isfinite


def _default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]  # type: ignore[attr-defined]
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return None
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return list(value) if isinstance(value, tuple) else value


def _check_fields(obj: Any, where: str) -> None:
    """Range-check ``obj``'s own numeric fields (not nested dataclasses), then its cross-field rules."""
    cls = type(obj)
    for f in dataclasses.fields(obj):
        bound = BOUNDS.get(cls, {}).get(f.name)
        for key, x in _numbers(getattr(obj, f.name), f"{where}.{f.name}"):
            if not (bound.accepts(x) if bound else _finite(x)):
                what = "is out of range" if _finite(x) else "is not a finite number"
                rule = f"a finite number {bound}" if bound else "a finite number"
                default = _default(cls, f.name)
                raise ConfigError(f"{key}={x!r} {what}: it must be {rule}; the default is {default!r}")
    check = CROSS_CHECKS.get(cls)
    if check is not None:
        check(obj, where)


def _ordered(obj: Any, where: str, low: str, high: str) -> None:
    """``low < high`` for two fields of ``obj`` (skipped when one of them no longer exists)."""
    lo, hi = getattr(obj, low, None), getattr(obj, high, None)
    if lo is not None and hi is not None and lo >= hi:
        raise ConfigError(f"{where}: {low}={lo!r} must be < {high}={hi!r}; swap or widen them")


def _check_data(d: DataConfig, where: str) -> None:
    lo, hi = d.scale_range
    if lo > hi:
        raise ConfigError(f"{where}.scale_range={[lo, hi]}: the first (smallest) zoom must come first")
    _ordered(d, where, "eval_depth_min", "eval_depth_max")


def _check_train(t: TrainConfig, where: str) -> None:
    if t.best_mode not in ("max", "min"):
        raise ConfigError(f"{where}.best_mode={t.best_mode!r}: choose max (higher is better) or min")


def _check_best_metric(cfg: Config, where: str) -> None:
    """``train.best_metric`` is ``score`` or ``<task>/<metric>`` for a task in ``model.tasks``.

    Only the form and the task are checked here (config.py knows no task); the metric name is checked against
    the task's own metrics by ``densemtl.metrics.check_best_metric`` before training starts.
    """
    name, tasks = cfg.train.best_metric, cfg.model.tasks
    task, _, metric = name.partition("/")
    if name != "score" and (task not in tasks or not metric):
        raise ConfigError(
            f"{where}.train.best_metric={name!r}: use 'score' (the mean of the tasks' headline metrics) or "
            f"'<task>/<metric>' for a task in model.tasks {list(tasks)}"
        )


CROSS_CHECKS: dict[type, typing.Callable[[Any, str], None]] = {
    DataConfig: _check_data,
    ModelConfig: lambda model, where: _ordered(model, where, "min_depth", "max_depth"),
    TrainConfig: _check_train,
    Config: _check_best_metric,
}


def check_config(cfg: Any, where: str = "config") -> None:
    """Range-check every field of a config built in Python (``from_dict`` and ``load_config`` already do)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(items):
            if dataclasses.is_dataclass(v):
                check_config(v, f"{where}.{f.name}" + (f"[{i}]" if isinstance(value, tuple) else ""))
    _check_fields(cfg, where)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, {} if value is None else value, where)  # `train:` with nothing under it
    if origin is tuple:
        args = typing.get_args(hint)
        if value is None:  # `phases:` left empty means none, not one phase of defaults
            value = []
        if not isinstance(value, list | tuple):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {_show(list(value))}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        key_t, val_t = typing.get_args(hint)
        return {_coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is str and value is None:
        return ""
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {_show(value)}")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults.

    Keys, types and value ranges (:data:`BOUNDS`, :data:`CROSS_CHECKS`) are checked; errors name the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted((k for k in data if k not in names), key=str)
    if unknown:
        raise ConfigError(_unknown_keys(unknown, names, where))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    _check_fields(obj, where)
    return obj


def _unknown_keys(unknown: list[Any], names: list[str], where: str) -> str:
    """The message for keys ``cls`` lacks: each with its likely spelling or the known fix, then the allowed ones."""
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), names, n=1)
        if str(k) in NOT_CONFIG_KEYS:
            hints.append(f"{k}: {NOT_CONFIG_KEYS[str(k)]}")
        elif close:
            hints.append(f"did you mean {close[0]!r} for {k!r}?")
    fixes = "".join(h + "; " for h in hints)
    return f"{where}: unknown key(s) {_show(unknown)}; {fixes}allowed: {names}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that YAML and ``torch.save(weights_only)`` both accept."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings to a nested dict; values are parsed as YAML (``8``, ``true``, ``[1, 2]``)."""
    out = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key such as train.epochs")
        node = out
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty `train:` in the file
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = parse_yaml(raw, f"--set {item!r}")
        except YAMLFileError as e:
            raise ConfigError(str(e)) from None
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or the defaults when ``path`` is None) and apply overrides."""
    data: Any = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        try:  # safe_load only: tags that build objects are refused, and so are alias bombs
            data = read_yaml(path)
        except YAMLFileError as e:
            raise ConfigError(str(e)) from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: the top level must be a mapping with data/model/loss/train sections, "
                f"got a {type(data).__name__}; see configs/synthetic.yaml"
            )
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)
