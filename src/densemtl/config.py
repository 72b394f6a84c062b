"""Typed, frozen experiment configuration loaded from YAML with ``--set a.b=c`` overrides.

One ``Config`` holds four sections (data, model, loss, train). It is saved inside every checkpoint so that a
checkpoint rebuilds its own model. Unknown keys and wrong types are errors that name the key, because a typo in
an experiment file should never silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
    backbone: str = "mobilenet_v3_large"
    pretrained: str = "none"  # none | imagenet (torchvision weights, downloads when online)
    backbone_weights: str = ""  # local state-dict file; loaded with weights_only=True
    freeze: str = "none"  # none | all | bn | first_n_stages
    freeze_stages: int = 0  # used by freeze=first_n_stages
    decoder: str = "lwrefinenet"  # lwrefinenet | unet
    decoder_channels: int = 128  # LW-RefineNet: coarsest width (tapers finer); U-Net: coarsest width, output //4
    bn_momentum: float = 0.1  # BatchNorm running-stat momentum for every layer (torchvision's MobileNets use 0.01)
    upsample: str = "bilinear"  # bilinear | transposed (U-Net)
    aspp: bool = False
    sharing: str = "shared"  # shared (one decoder, light heads) | split (one decoder per task)
    depth_param: str = "log"  # direct | log | inverse; the head always returns metres
    min_depth: float = 0.1  # metres, bounds of the depth head's output
    max_depth: float = 100.0


@dataclass(frozen=True)
class LossConfig:
    """Per-task losses and how they are combined."""

    semseg: str = "ce"  # ce | bce | dice | ce+dice
    depth: str = "l1"  # l1 | mse | berhu | silog
    normals: str = "cosine"  # cosine (1 - cos) | angular (angle in radians, L1)
    depth_space: str = "log"  # metres | log | blog (clip to depth_clip, then ln(d)/5)
    depth_clip: float = 80.0  # metres
    silog_lambda: float = 0.85  # SILog variance weight (1.0 = fully scale-invariant)
    silog_scale: float = 10.0  # SILog multiplier (BTS convention)
    weighting: str = "fixed"  # fixed | uncertainty | dwa | gradnorm | pcgrad | cagrad
    weighting_args: dict[str, float] = field(default_factory=dict)  # e.g. {alpha: 0.5} (GradNorm), {c: 0.4}
    weights: dict[str, float] = field(default_factory=dict)  # {task: weight}; a task not named weighs 1.0
    class_weights: tuple[float, ...] = ()  # empty = uniform


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


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_t, val_t = typing.get_args(hint)
        return {_coerce(k, key_t, where): _coerce(v, val_t, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
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
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


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
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; see configs/ for examples")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with data/model/loss/train sections")
    data = apply_overrides(data, overrides or [])
    return from_dict(Config, data)


def replace(cfg: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)
