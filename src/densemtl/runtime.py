"""Where and how the computation runs: device choice, seeding, mixed precision, moving batches.

Kept apart from the training loop so that evaluation, prediction and benchmarks make the same choices.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from densemtl.tasks import TASKS


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive NumPy/Python seeds from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for this device (bf16 where supported, else fp16), or None when AMP is off.

    AMP only runs on CUDA: CPU autocast gives little speed for convolutions and changes numerics.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast context for ``dtype`` (a no-op context when dtype is None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move every tensor in a (nested) batch to ``device``; 4-D float images optionally channels_last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point() and batch.shape[1] == 3:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def forward_at_scale(model: torch.nn.Module, image: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``image`` (B, 3, H, W) resized by ``scale``; outputs come back at (H, W).

    A model trained at a progressive-resolution phase of scale s sees the world at that focal length (in pixels)
    and object size, so it is evaluated at the same scale and its outputs (logits, metres) upsampled bilinearly
    to the ground truth's resolution, each the way its task says (``Task.upsample``: bilinear, normals
    renormalised). The resized size rounds like the data transforms do.
    """
    if abs(scale - 1.0) < 1e-9:
        return model(image)
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    out = model(
        small.contiguous(memory_format=torch.channels_last)
        if image.is_contiguous(memory_format=torch.channels_last)
        else small
    )
    return {k: TASKS[k].upsample(v, (h, w)) for k, v in out.items()}
