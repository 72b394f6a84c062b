"""CPU latency of the default real-time seg+depth model against torchvision's seg-only LR-ASPP.

One run, 2 threads, batch 1, 480x640, eager PyTorch, ``torch.inference_mode``, channels_last. The models are
timed interleaved (A, B, A, B, ...) so that load from other processes hits both alike; we report median and
p90 of wall time, the ratio of medians, and the process CPU time per call (less sensitive to a busy machine).
Results go to ``benchmarks/results/latency.json``.

    .venv/bin/python benchmarks/latency.py [--runs 30] [--size 480x640] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.segmentation import lraspp_mobilenet_v3_large

from densemtl.config import ModelConfig
from densemtl.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"


def _candidates(num_classes: int) -> dict[str, Callable[[], nn.Module]]:
    """Name -> constructor of each model timed (random weights: latency does not depend on them)."""
    return {
        "densemtl mnv3-large lwrefinenet shared (seg+depth)": lambda: build_model(
            ModelConfig(tasks=("semseg", "depth"), num_classes=num_classes)
        ),
        "torchvision lraspp_mobilenet_v3_large (seg only)": lambda: lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes
        ),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(
    models: dict[str, nn.Module], x: torch.Tensor, runs: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Interleaved timing of every model on ``x``; milliseconds per call."""
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for name, m in models.items():
                t0, c0 = time.perf_counter(), time.process_time()
                m(x)
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return {
        k: {
            "median_ms": statistics.median(wall[k]),
            "p90_ms": _percentile(wall[k], 0.9),
            "min_ms": min(wall[k]),
            "cpu_median_ms": statistics.median(cpu[k]),
        }
        for k in models
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table and write the JSON file."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", default="480x640", help="HEIGHTxWIDTH")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last
    models = {k: f().eval().to(memory_format=fmt) for k, f in _candidates(args.classes).items()}
    x = torch.randn(1, 3, h, w).contiguous(memory_format=fmt)
    stats = measure(models, x, args.runs, args.warmup)
    ours, ref = list(stats)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": args.threads,
        "batch": 1,
        "size": [h, w],
        "runs": args.runs,
        "interleaved": True,
        "memory_format": "channels_last",
        "mode": "eager, torch.inference_mode",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cpu": platform.processor() or platform.machine(),
        "models": stats,
        "ratio_median_ours_over_reference": stats[ours]["median_ms"] / stats[ref]["median_ms"],
        "ratio_cpu_ours_over_reference": stats[ours]["cpu_median_ms"] / stats[ref]["cpu_median_ms"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in stats)
    print(
        f"{'model'.ljust(width)}  median ms  p90 ms  min ms  cpu ms  ({args.threads} threads, {h}x{w}, batch 1)"
    )
    for k, s in stats.items():
        print(
            f"{k.ljust(width)}  {s['median_ms']:9.1f}  {s['p90_ms']:6.1f}  {s['min_ms']:6.1f}  {s['cpu_median_ms']:6.1f}"
        )
    print(
        f"ratio ours / reference (median wall): {result['ratio_median_ours_over_reference']:.2f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
