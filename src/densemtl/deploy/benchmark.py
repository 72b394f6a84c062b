"""``densemtl benchmark``: latency of the model per inference backend (PyTorch eager, ONNX Runtime fp32, INT8)
next to torchvision's seg-only ``lraspp_mobilenet_v3_large`` in the same run, so results read as ratios.

Every backend is timed interleaved (A, B, C, A, B, C, ...) after a warm-up, so load from other processes hits
all alike; we report the median and p90 wall time, FPS (1000 / median), the process CPU time per call, the
parameters and GFLOPs (2 per multiply-add, convolutions and matmuls only), the peak memory that loading the
backend and one inference add (measured in a fresh process per backend) and the file size (ONNX, or the saved
PyTorch module).

The result's JSON keeps the key names it has always had: ``"engines"`` (one entry per timed model and backend)
and each entry's ``"engine"`` (its backend), because published results and their readers use them.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REFERENCE = "lraspp_mobilenet_v3_large"
BACKENDS = ("torch", "onnxruntime", "int8")


_MEMORY_CHILD = """
import sys
import numpy as np
kind, path, h, w, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if kind == "torch":
    import torch
    torch.set_num_threads(threads)
    model = torch.load(path, weights_only=False).eval()  # our own temporary file
else:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = None
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size: imports do not count
base = status("VmRSS:")
x = np.random.randn(1, 3, h, w).astype(np.float32)
if kind == "torch":
    with torch.inference_mode():
        model(torch.from_numpy(x))
else:
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"image": x})
print((status("VmHWM:") - base) / 1024)
"""


def peak_memory_mb(kind: str, path: Path, size: tuple[int, int], threads: int) -> float:
    """Peak resident memory (MiB) above the imports of one inference, in a fresh process.

    ``kind`` is "torch" (``path``: a ``torch.save``d module, loaded before the baseline: activations and
    workspace only) or "onnxruntime" (``path``: an ONNX file, session created after the baseline: weights,
    optimised graph, arenas and activations). A fresh process, because inside the benchmark's own process
    allocator caches and earlier backends hide the peak. Linux only (``/proc/self/clear_refs`` resets the peak);
    NaN when the measurement fails.
    """
    import subprocess

    cmd = [sys.executable, "-c", _MEMORY_CHILD, kind, str(path), str(size[0]), str(size[1]), str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return float("nan")


def model_cost(model: nn.Module, size: tuple[int, int]) -> dict[str, float]:
    """Parameters (millions) and GFLOPs of one (1, 3, H, W) forward."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, *size))
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
    }


class FirstOutput(nn.Module):
    """torchvision segmentation models return ``{"out": logits}``; export the tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def export_plain(model: nn.Module, path: Path, size: tuple[int, int]) -> Path:
    """Fixed-size fp32 export of any tensor -> tensor model (for the reference)."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 3, *size),), str(path), dynamo=False, opset_version=18,
            input_names=["image"], output_names=["out"],
        )  # fmt: skip
    return path


def _ort_runner(path: Path, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    from densemtl.deploy.ort import create_session

    session, feed = create_session(path, threads), {"image": x.numpy()}
    return lambda: session.run(None, feed)


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model = model.eval().to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)

    def run() -> Any:
        with torch.inference_mode():
            return model(xc)

    return run


def build_runners(
    model: nn.Module,
    backends: tuple[str, ...],
    size: tuple[int, int],
    threads: int,
    tmp: Path,
    calib_root: str | Path | None = None,
    reference: bool = True,
) -> dict[str, dict[str, Any]]:
    """Name -> {"run": zero-argument callable, "model", "backend", "file"} per backend (and the reference)."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from densemtl.deploy.export import export_model
    from densemtl.deploy.quantize import quantize_onnx

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {BACKENDS}")
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    runners: dict[str, dict[str, Any]] = {}
    onnx_path = tmp / "densemtl.onnx"
    if "onnxruntime" in backends or "int8" in backends:
        export_model(model, onnx_path, size, class_ids=False)
    for backend in backends:
        file = None
        if backend == "torch":
            run, file = _torch_runner(model, x), tmp / "densemtl.pt"
            torch.save(model, file)  # for the memory measurement in a fresh process
        else:
            file = (
                onnx_path
                if backend == "onnxruntime"
                else quantize_onnx(onnx_path, tmp / "int8.onnx", calib_root, progress=False)
            )
            run = _ort_runner(file, x, threads)
        runners[f"densemtl {backend}"] = {"run": run, "model": "densemtl", "backend": backend, "file": file}
    if reference:
        ref = FirstOutput(
            lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=8)
        ).eval()
        torch.save(ref, tmp / "lraspp.pt")
        runners[f"{REFERENCE} torch"] = {
            "run": _torch_runner(ref, x), "model": REFERENCE, "backend": "torch", "file": tmp / "lraspp.pt",
        }  # fmt: skip
        file = export_plain(ref, tmp / "lraspp.onnx", size)
        runners[f"{REFERENCE} onnxruntime"] = {
            "run": _ort_runner(file, x, threads), "model": REFERENCE, "backend": "onnxruntime", "file": file,
        }  # fmt: skip
        runners["_ref_module"] = {"module": ref}
    return runners


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_interleaved(
    fns: dict[str, Callable[[], Any]], runs: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Interleaved timing; milliseconds per call (wall median/p90/min, process CPU median) and FPS."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(runs):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    stats = {}
    for k in fns:
        median = statistics.median(wall[k])
        stats[k] = {
            "median_ms": median,
            "p90_ms": _percentile(wall[k], 0.9),
            "min_ms": min(wall[k]),
            "cpu_median_ms": statistics.median(cpu[k]),
            "fps": 1000.0 / median,
        }
    return stats


def _measure(
    model: nn.Module,
    backends: tuple[str, ...],
    size: tuple[int, int],
    threads: int,
    runs: int,
    warmup: int,
    reference: bool,
    calib_root: str | Path | None,
    memory: bool,
) -> dict[str, dict[str, Any]]:
    """Timing, cost, memory and file size per runner of :func:`build_runners` (``run_benchmark``'s table)."""
    with tempfile.TemporaryDirectory() as tmp:
        runners = build_runners(model, backends, size, threads, Path(tmp), calib_root, reference)
        ref_module = runners.pop("_ref_module", {}).get("module")
        stats = time_interleaved({k: r["run"] for k, r in runners.items()}, runs, warmup)
        costs = {"densemtl": model_cost(model, size)}
        if ref_module is not None:
            costs[REFERENCE] = model_cost(ref_module, size)
        for name, r in runners.items():
            # the JSON key stays "engine" (see the module docstring)
            stats[name].update(model=r["model"], engine=r["backend"], **costs[r["model"]])
            kind = "torch" if r["backend"] == "torch" else "onnxruntime"
            stats[name]["peak_memory_mb"] = peak_memory_mb(kind, r["file"], size, threads) if memory else None
            stats[name]["file_mb"] = r["file"].stat().st_size / 2**20
    return stats


def run_benchmark(
    model: nn.Module,
    size: tuple[int, int] = (480, 640),
    backends: tuple[str, ...] = BACKENDS,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 5,
    reference: bool = True,
    calib_root: str | Path | None = None,
    label: str = "densemtl",
    memory: bool = True,
    *,
    engines: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Benchmark ``model`` on every backend (and the reference) at batch 1; returns the JSON-ready result.

    ``memory=False`` skips the peak-memory measurement (one fresh process per backend, seconds each).
    ``engines`` is the deprecated name of ``backends``.
    """
    import onnxruntime as ort

    from densemtl.deploy.export import check_size

    if engines is not None:
        import warnings

        warnings.warn("engines= is deprecated, use backends=", DeprecationWarning, stacklevel=2)
        backends = engines
    check_size(size)
    for name, value, low in (("threads", threads, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} (--{name}) must be an integer >= {low}, got {value!r}")
    torch.set_num_threads(threads)
    stats = _measure(
        model.eval(), tuple(backends), size, threads, runs, warmup, reference, calib_root, memory
    )
    ref_key = next((k for k in (f"{REFERENCE} onnxruntime", f"{REFERENCE} torch") if k in stats), None)
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": label,
        "size": list(size),
        "batch": 1,
        "threads": threads,
        "runs": runs,
        "warmup": warmup,
        "interleaved": True,
        "load_average": list(os.getloadavg()),
        "cpu": platform.processor() or platform.machine(),
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "reference": ref_key,
        "engines": stats,
        "ratio_to_reference": {k: v["median_ms"] / stats[ref_key]["median_ms"] for k, v in stats.items()}
        if ref_key
        else {},
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
    h, w = result["size"]
    lines = [
        f"{result['threads']} threads, batch 1, {h}x{w}, {result['runs']} interleaved runs, "
        f"load average {result['load_average'][0]:.2f}",
        "",
        "| model | backend | median ms | p90 ms | FPS | CPU ms | x reference | params M | GFLOPs | peak MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["engines"].items():
        ratio = result["ratio_to_reference"].get(name, float("nan"))
        lines.append(
            f"| {s['model']} | {s['engine']} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['fps']:.1f} | "
            f"{s['cpu_median_ms']:.1f} | {ratio:.2f} | {s['params_m']:.2f} | {s['gflops']:.2f} | "
            f"{s['peak_memory_mb'] or float('nan'):.0f} |"
        )
    return "\n".join(lines)


def load_benchmark_model(
    checkpoint: str | Path | None = None, config: str | Path | None = None, overrides: list[str] | tuple = ()
) -> tuple[nn.Module, str, str | None]:
    """The model to time, a label, and a calibration root: a checkpoint's, or a config's with random weights
    (latency does not depend on the weights; ``num_classes`` 0 becomes 8, the synthetic dataset's)."""
    from densemtl.config import load_config, replace
    from densemtl.models import build_model
    from densemtl.train.checkpoint import config_from_checkpoint, load_checkpoint, model_from_checkpoint

    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        root = config_from_checkpoint(ckpt).data.root
        calib = root if (Path(root) / "train" / "images").is_dir() else None
        return model_from_checkpoint(ckpt, checkpoint), str(checkpoint), calib
    cfg = load_config(config, list(overrides)).model
    cfg = replace(cfg, pretrained="none", backbone_weights="", num_classes=cfg.num_classes or 8)
    return build_model(cfg), f"{cfg.backbone} {cfg.decoder} {cfg.sharing} (random weights)", None
