"""``densemtl calibrate``: fit each task's calibration on a held-out split and store it in the checkpoint.

A task that can be calibrated fits a few numbers on the model's uncalibrated outputs over the split
(``Task.calibration_data`` / ``Task.fit_calibration``): segmentation a softmax temperature (Guo et al. 2017),
depth a scale of its predicted std. They live in the heads' ``calib_*`` buffers, so the calibrated checkpoint
is used as it is by ``evaluate``, ``predict``, ``export`` and the Predictor; the record of what was fitted, on
which data, is kept under the checkpoint's ``"calibration"`` key. Fit on data the model was not trained on
(``--split val``), and report on yet other data where you have it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from densemtl.config import replace
from densemtl.runtime import forward_at_scale, resolve_device, to_device
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import (
    config_from_checkpoint,
    input_scale,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from densemtl.train.runlog import Progress


@torch.inference_mode()
def collect_calibration_data(model, loader, device: torch.device, scale: float) -> dict[str, torch.Tensor]:
    """Every calibratable task's :meth:`~densemtl.tasks.base.Task.calibration_data` over ``loader``, joined."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in Progress(loader, "calibrate"):
        batch = to_device(batch, device)
        outputs = forward_at_scale(model, batch["image"], scale)
        for t, out in outputs.items():
            keep = batch.get("valid_tasks", {}).get(t)
            target = batch[t]
            if keep is not None:
                keep = torch.as_tensor(keep, dtype=torch.bool, device=out.device).reshape(-1)
                out, target = out[keep], target[keep]
            data = TASKS[t].calibration_data(out.float(), target) if len(out) else None
            if data is not None:
                parts.setdefault(t, []).append(data.cpu())
    return {t: torch.cat(v) for t, v in parts.items() if sum(len(x) for x in v)}


def calibrate_model(model, loader, cfg, device: torch.device, scale: float = 1.0) -> dict[str, dict[str, float]]:
    """Reset every head's calibration, collect its data over ``loader`` and fit it; returns the fitted figures."""
    for t in model.tasks:
        TASKS[t].reset_calibration(model.heads[t])
    data = collect_calibration_data(model, loader, device, scale)
    if not data:
        raise ValueError("nothing to calibrate: no task of this model has labelled pixels in the split")
    return {t: TASKS[t].fit_calibration(d.to(device), model.heads[t], cfg) for t, d in data.items()}


def calibrate_checkpoint(
    checkpoint: str | Path,
    split: str = "val",
    data_root: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Calibrate ``checkpoint`` on ``split`` and save it to ``out`` (default: the checkpoint itself, replaced
    atomically). Returns ``{"calibration": {task: figures}, "checkpoint": path, ...}``."""
    from densemtl.data.loaders import build_dataset, make_loader

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    if data_root is not None:
        cfg = replace(cfg, data=replace(cfg.data, root=str(data_root)))
    cfg = replace(cfg, data=replace(cfg.data, max_samples=0))
    if split == cfg.data.train_split:
        raise ValueError(
            f"--split {split} is the split the model was trained on: calibrate on held-out data (e.g. --split val)"
        )
    dev = resolve_device(device)
    model = model_from_checkpoint(ckpt, checkpoint).to(dev)
    dataset = build_dataset(cfg, split, train=False)
    names = list(ckpt["dataset"].get("classes", []))
    if any(TASKS[t].uses_classes for t in cfg.model.tasks) and list(dataset.class_names) != names:
        raise ValueError(
            f"{cfg.data.root} has classes {dataset.class_names} but {checkpoint} was trained on {names}; "
            "calibrate on a dataset with the same class list"
        )
    loader = make_loader(dataset, batch_size, False, cfg.data.num_workers, 0, dev)
    figures = calibrate_model(model, loader, cfg, dev, input_scale(ckpt))
    record = {"split": split, "data_root": str(cfg.data.root), "images": len(dataset), "tasks": figures}
    payload = {**ckpt, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "calibration": record}
    payload.pop("uncalibrated", None)
    target = Path(out) if out is not None else Path(checkpoint)
    save_checkpoint(target, payload)
    return {"checkpoint": str(target), "calibration": record}
