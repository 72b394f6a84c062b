"""Checkpoints: what they hold, how they are written atomically, and how they are loaded safely.

A checkpoint is a plain dict of tensors and builtins, loaded with ``torch.load(weights_only=True)`` so that a file
from elsewhere can never execute code. It carries the resolved config, so it rebuilds its own model, and the
dataset's class names and palette, so predictions can be coloured without the dataset.
"""

from __future__ import annotations

import errno
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densemtl.config import Config, from_dict, to_dict
from densemtl.fileio import atomic_write

log = logging.getLogger("densemtl")

CHECKPOINT_FORMAT = "densemtl-checkpoint"
CHECKPOINT_VERSION = 5  # 2: the model owns its input normalisation; 3: the config names its decoder/head layout;
# 4: heads may predict uncertainty and carry calibration buffers; 5: the objects head's distance is per focal length
# (a task whose head an older checkpoint trained differently says so: ``Task.min_checkpoint_version``)
# What a version <= 2 config left out, because those models could only be built one way: the tapered
# LW-RefineNet widths, CRP stages (0, 2, 2, 4) and light heads. Filled in on load, so a later change of the
# ModelConfig defaults never rebuilds an old checkpoint with a different architecture.
V2_MODEL_LAYOUT = {"decoder_taper": True, "crp_stages": [0, 2, 2, 4], "head": "light", "head_channels": 0}
# What a version-3 config left out: its heads predicted no uncertainty and had no dropout.
V3_MODEL_LAYOUT = {"uncertainty": False, "dropout": 0.0}
CALIBRATION_PREFIX = "calib_"  # head buffers that ``densemtl calibrate`` fits; identity in older checkpoints
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what version-1 models were fed with, normalised outside the model
IMAGENET_STD = (0.229, 0.224, 0.225)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors/builtins (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2] if random.getstate()[2] is not None else float("nan"),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    gauss = state["python_gauss"]
    random.setstate((3, tuple(state["python"]), None if gauss != gauss else gauss))  # NaN = None
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def torch_load_reason(e: BaseException) -> str:
    """A one-line reason for a failed ``torch.load``, without PyTorch's advice to load with weights_only off.

    That advice (re-run with ``weights_only`` set to False) would execute whatever code a file of unknown
    origin holds; the safe unpickler's own finding (e.g. "Unsupported global: GLOBAL os.system") is kept.
    """
    text = str(e).replace("\x1b[1m", "").replace("\x1b[0m", "")
    if "WeightsUnpickler error:" in text:
        found = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n")[0]
        reason = f"pickled objects other than tensors: {found.split('. Please')[0].rstrip('.')}"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = lines[0].split(". ")[0].rstrip(".") if lines else ""
        if isinstance(e, EOFError) and not reason:
            reason = "the file is empty or ends early"
    if "weights_only" in reason:
        reason = "refused by the safe (weights-only) loader"
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


class NonFiniteWeightsError(ValueError):
    """A model with NaN or infinite weights, which is never written to a checkpoint."""


def check_finite_weights(payload: dict[str, Any], path: Path) -> None:
    """Raise :class:`NonFiniteWeightsError` if a floating tensor of ``payload["model"]`` is not finite."""
    bad = [
        k for k, v in payload.get("model", {}).items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]  # fmt: skip
    if not bad:
        return
    epoch, step = payload.get("epoch"), payload.get("scheduler", {}).get("last_epoch")
    when = f" after epoch {epoch + 1}" if isinstance(epoch, int) else ""
    when += f" (step {step})" if isinstance(step, int) else ""
    raise NonFiniteWeightsError(
        f"the model's weights are not finite{when} ({len(bad)} tensor(s), e.g. {bad[0]}), so {path} was not "
        "written (the previous one is kept): training diverged; lower train.lr and/or enable gradient "
        "clipping (train.grad_clip, e.g. 1.0), then resume from the last good checkpoint or start again"
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A crash (even ``kill -9``) during the write leaves the previous file intact; so does a model whose weights
    are not finite, which is refused (:class:`NonFiniteWeightsError`) instead of written.
    """
    check_finite_weights(payload, Path(path))
    return atomic_write(path, lambda f: torch.save(payload, f))


class DiskFullError(OSError, ValueError):
    """No space left to write a checkpoint; the message names the last good one."""


class RunCheckpoints:
    """Writes a run's ``last.pt``/``best.pt`` and remembers the last good one, which every error names."""

    def __init__(self, out: Path, resumed: Path | None = None, epoch: int | None = None) -> None:
        self.out = out
        self.last_good = (
            f"{resumed} (epoch {epoch + 1})" if resumed is not None and epoch is not None else None
        )

    def save(self, name: str, payload: dict[str, Any]) -> None:
        """Save ``payload`` as ``name``; a full disk or non-finite weights stop the run naming the last good."""
        path, good = self.out / name, self.last_good or "none yet (no epoch was saved)"
        try:
            save_checkpoint(path, payload)
        except NonFiniteWeightsError as e:
            raise NonFiniteWeightsError(f"{e}; the last good checkpoint is {good}") from None
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            full = DiskFullError(
                f"No space left on device while saving {path} after epoch {payload['epoch'] + 1}; the last good "
                f"checkpoint is {good}: free disk space, then continue with --resume"
            )
            full.errno = errno.ENOSPC
            raise full from e
        if name == "last.pt":
            note = "" if payload.get("validated", True) else ", saved before validating it"
            self.last_good = f"{path} (epoch {payload['epoch'] + 1}{note})"


def make_payload(
    cfg: Config, model: torch.nn.Module, dataset_info: dict[str, Any], **state: Any
) -> dict[str, Any]:
    """The checkpoint dict: format tag, config, dataset facts, model weights and any training ``state``."""
    model = getattr(model, "module", model)  # unwrap DDP
    info = {
        k: dataset_info[k]
        for k in ("name", "classes", "palette", "ignore_index", "depth", "object_classes")
        if k in dataset_info
    }
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": to_dict(cfg),
        "dataset": info,
        "model": model.state_dict(),
        **state,
    }


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and validate a densemtl checkpoint without executing any code from the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `densemtl train` first")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickled code, truncated or empty file, not a torch file
        raise CheckpointError(
            f"{path} is not a loadable densemtl checkpoint ({torch_load_reason(e)}); it may be empty or "
            "truncated (an interrupted copy?), or hold pickled code (objects other than tensors), which is "
            "refused for safety: use another checkpoint, e.g. the run's best.pt or last.pt"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a densemtl checkpoint (no '{CHECKPOINT_FORMAT}' tag); to start from a plain "
            "backbone state dict use model.backbone_weights=PATH"
        )
    missing = [k for k in ("config", "model", "dataset") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} lacks {missing}: it is incomplete or was written by an older densemtl; "
            "retrain, or load its weights with model.backbone_weights=PATH"
        )
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer densemtl (checkpoint version {ckpt['version']}); upgrade densemtl"
        )
    check_heads_current(int(ckpt.get("version", 1)), ckpt["config"].get("model", {}).get("tasks", ()), path)
    return _upgrade(ckpt, path)


def check_heads_current(version: int, tasks: Any, path: str | Path) -> None:
    """Refuse a model of checkpoint ``version`` whose head of one of ``tasks`` this densemtl would misread
    (``Task.min_checkpoint_version``: its outputs mean something else now, and no conversion is exact)."""
    from densemtl.tasks import TASKS

    for t in tasks:
        need = getattr(TASKS.get(t), "min_checkpoint_version", 1)
        if version < need:
            raise CheckpointError(
                f"{path}: its {t!r} head was trained by an older densemtl (checkpoint version {version}), whose "
                f"{t} outputs meant something else (this one reads version {need} and later; docs/{t}.md); "
                "retrain the model (the file is left as it is)"
            )


def _upgrade(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """Convert an older checkpoint in memory (the file is left as it is).

    Version 1 models took ImageNet-normalised input; version 2 models take RGB in [0, 1] and normalise it
    themselves. Adding ImageNet's statistics as the model's ``pixel_mean``/``pixel_std`` buffers gives exactly
    the old network for the new input convention. Version 2 configs do not name the decoder/head layout
    (:data:`V2_MODEL_LAYOUT` is the only one they could describe), so it is filled in.
    """
    if ckpt.get("version", 1) < 2:
        model = dict(ckpt["model"])
        model.setdefault("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        model.setdefault("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        ckpt = {**ckpt, "model": model, "version": 2}
        log.info("%s: version-1 checkpoint converted on load (normalisation moved into the model)", path)
    if ckpt.get("version", 1) < 3:
        config = dict(ckpt["config"])
        config["model"] = {**V2_MODEL_LAYOUT, **config.get("model", {})}
        ckpt = {**ckpt, "config": config, "version": 3}
    if ckpt.get("version", 1) < 4:
        config = dict(ckpt["config"])
        config["model"] = {**V3_MODEL_LAYOUT, **config.get("model", {})}
        ckpt = {**ckpt, "config": config, "version": 4, "uncalibrated": True}
    if ckpt.get("version", 1) < 5:  # only the objects head changed, and check_heads_current refused those
        ckpt = {**ckpt, "version": CHECKPOINT_VERSION}
    return ckpt


def config_from_checkpoint(ckpt: dict[str, Any]) -> Config:
    """Rebuild the typed config stored in a checkpoint."""
    return from_dict(Config, ckpt["config"])


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> torch.nn.Module:
    """Build the checkpoint's own model and load its weights (strict: a mismatch is an error)."""
    from densemtl.models import build_model

    cfg = config_from_checkpoint(ckpt)
    # Weights come from the checkpoint: never fetch or read pretrained files again.
    model = build_model(_no_pretrained(cfg.model))
    weights = ckpt["model"]
    if ckpt.get("uncalibrated"):  # older files have no calibration buffers: the fresh model's are the identity
        fresh = model.state_dict()
        missing = {k: v for k, v in fresh.items() if k.rsplit(".", 1)[-1].startswith(CALIBRATION_PREFIX)}
        weights = {**missing, **weights}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the model its config describes ({str(e).splitlines()[0]}); "
            "the file was edited or comes from another version"
        ) from e
    return model


def _no_pretrained(model_cfg: Any) -> Any:
    from densemtl.config import replace

    return replace(model_cfg, pretrained="none", backbone_weights="")


def input_scale(ckpt: dict[str, Any]) -> float:
    """The input scale a checkpoint's model was evaluated at (``data.eval_scale`` or its training phase)."""
    from densemtl.train.schedule import eval_scale

    cfg = config_from_checkpoint(ckpt)
    if cfg.data.eval_scale > 0:
        return cfg.data.eval_scale
    return float(ckpt.get("input_scale", eval_scale(cfg)))


def restore_training_state(
    path: Path, cfg: Config, model, optimizer, scheduler, scaler, loss_fn
) -> dict[str, Any]:
    """Load training state from ``path`` into the given objects; returns the checkpoint (for its epoch, best
    value, training stats and whether that epoch was validated).

    Refuses a checkpoint whose model config differs (its weights would not fit); warns on other changes."""
    ckpt = load_checkpoint(path)
    saved = to_dict(config_from_checkpoint(ckpt))  # defaults filled in: a field added since is not a change
    if {**saved["model"], "init_from": ""} != {**to_dict(cfg)["model"], "init_from": ""}:
        raise ValueError(
            f"{path} was trained with a different model config; resume with the same "
            "model settings, or start a new run (optionally from model.backbone_weights)"
        )
    same_folder = {**saved, "train": {**saved["train"], "out_dir": cfg.train.out_dir}}
    same_folder["model"]["init_from"] = cfg.model.init_from  # read only when a run starts
    if same_folder != to_dict(cfg):  # a run continued in another folder (a copy) is still the same run
        log.warning("resuming %s with changed settings; the run will not match an uninterrupted one", path)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    loss_fn.load_state_dict(ckpt["loss"])
    set_rng_state(ckpt["rng"])
    print(f"resumed from {path} after epoch {ckpt['epoch'] + 1}")
    return ckpt
