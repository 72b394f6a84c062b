"""Timing helpers of the MTL study (benchmarks/mtl_study.py): latency per architecture, training images/s.

Both time every model interleaved in one loop (A, B, C, A, B, C, ...) so that load from other processes hits
all of them alike: the ratios are what to read, not the absolute times.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from densemtl.config import load_config
from densemtl.deploy.benchmark import time_interleaved
from densemtl.models import build_model

LATENCY_RUNS = 20
LATENCY_THREADS = 2
THROUGHPUT_STEPS = 6


def measure_latency(
    configs: dict[str, str], size: tuple[int, int], device: str, runs: int = LATENCY_RUNS
) -> dict[str, dict[str, float]]:
    """``{architecture: {"torch_ms", "ort_ms"}}``, all models timed interleaved in one loop (same load)."""
    from densemtl.deploy.benchmark import _ort_runner, _torch_runner
    from densemtl.deploy.export import export_model

    torch.set_num_threads(LATENCY_THREADS)
    x = torch.randn(1, 3, *size)
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, config in configs.items():
            model = build_model(load_config(config).model).eval()
            if device != "cpu" and torch.cuda.is_available():  # GPU preset: torch on the GPU only
                fns[f"{arch}|torch_ms"] = _cuda_runner(model, x)
                continue
            fns[f"{arch}|torch_ms"] = _torch_runner(model, x)
            if importlib.util.find_spec("onnxruntime") is not None:
                path = export_model(model, Path(tmp) / f"{len(fns)}.onnx", size, class_ids=False)
                fns[f"{arch}|ort_ms"] = _ort_runner(path, x, LATENCY_THREADS)
        stats = time_interleaved(fns, runs, warmup=2)
    out: dict[str, dict[str, float]] = {}
    for key, st in stats.items():
        arch, backend = key.split("|")
        out.setdefault(arch, {})[backend] = st["median_ms"]
    return out


def _cuda_runner(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model, x = model.cuda(), x.cuda()

    def run() -> None:
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()

    return run


def measure_training_speed(configs: dict[str, str], steps: int = THROUGHPUT_STEPS) -> dict[str, float]:
    """Training images/s per variant: optimiser steps (forward, weighting's backward, step) on one fixed batch
    of the training crop, all variants interleaved step by step so that they share the machine's load."""
    from densemtl.runtime import to_device
    from densemtl.train.engine import make_loader, setup
    from densemtl.train.weighting import backward_step

    torch.set_num_threads(LATENCY_THREADS)
    state = {}
    for name, config in configs.items():
        run = setup(load_config(config))
        dataset = next(iter(run.train_sets.values()))
        batch = next(iter(make_loader(dataset, run.cfg.train.batch_size, False, 0, 0, run.device)))
        batch = to_device(batch, run.device, run.cfg.train.channels_last)  # as train_one_epoch feeds it
        state[name] = (run.model.train(), run.loss_fn, run.optimizer, batch)

    def step(name: str) -> None:
        model, loss_fn, optimizer, batch = state[name]
        losses = loss_fn(model(batch["image"]), batch)
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss_fn, losses, model, torch.amp.GradScaler("cpu", enabled=False))
        optimizer.step()

    fns = {name: (lambda n=name: step(n)) for name in state}
    stats = time_interleaved(fns, steps, warmup=1)
    return {name: len(state[name][3]["image"]) / (st["median_ms"] / 1e3) for name, st in stats.items()}
