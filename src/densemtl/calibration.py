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

from densemtl.runtime import forward_at_scale, to_device
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import (
    input_scale,
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
    from densemtl.evaluation import checkpoint_on_split

    run = checkpoint_on_split(checkpoint, data_root, split, device, batch_size, verb="calibrate")
    ckpt, cfg, model, dataset = run.ckpt, run.cfg, run.model, run.dataset
    if split == cfg.data.train_split:
        raise ValueError(
            f"--split {split} is the split the model was trained on: calibrate on held-out data (e.g. --split val)"
        )
    figures = calibrate_model(model, run.loader, cfg, run.device, input_scale(ckpt))
    record = {"split": split, "data_root": str(cfg.data.root), "images": len(dataset), "tasks": figures}
    payload = {**ckpt, "model": {k: v.cpu() for k, v in model.state_dict().items()}, "calibration": record}
    payload.pop("uncalibrated", None)
    target = Path(out) if out is not None else Path(checkpoint)
    save_checkpoint(target, payload)
    return {"checkpoint": str(target), "calibration": record}
