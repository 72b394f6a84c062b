"""The multi-task learning study: which task weighting and how much sharing help, under one fixed budget.

Trains, on the synthetic benchmark with the same data, epochs and seeds for every variant:
single-task semseg, single-task depth, multi-task with every weighting in ``densemtl.train.weighting.WEIGHTINGS``
(shared decoder), multi-task with split decoders, and multi-task from ImageNet weights (MobileNetV2, local file,
fully fine-tuned with encoder LR x0.1). Every variant uses the MobileNetV2 backbone so that scratch and ImageNet
differ only in initialisation. Reports mIoU, pixel accuracy, AbsRel, RMSE, delta1, Δm% vs the single-task pair
(positive = better), parameters, latency and training images/s, as mean ± std over seeds; writes JSON + Markdown.

Latency depends on the architecture only, so it is measured once per architecture after training: batch 1 at the
preset's ``latency_size``, 2 threads, PyTorch eager and ONNX Runtime (when installed), all models interleaved in
one loop so that they see the same machine load (the ratios are what to read, not the absolute times). Training
images/s likewise: after training, a few optimiser steps of every variant on one batch, interleaved. Finished run
folders are reused, so an interrupted study continues where it stopped.

    python benchmarks/mtl_study.py --preset smoke   # seconds-to-minutes: checks the pipeline end to end
    python benchmarks/mtl_study.py --preset cpu     # the CPU study (see docs/mtl.md for its run time)
    python benchmarks/mtl_study.py --preset gpu     # larger data and budget, for a machine with a GPU

The goal tested honestly: the multi-task model at <= 0.6x the summed latency of the two single-task models,
with Δm >= 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from densemtl.config import load_config
from densemtl.deploy.benchmark import time_interleaved
from densemtl.metrics import delta_m
from densemtl.models import build_model
from densemtl.train.engine import train
from densemtl.train.weighting import WEIGHTINGS

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
KEYS = ("semseg/miou", "semseg/pixel_acc", "depth/abs_rel", "depth/rmse", "depth/delta1")
LATENCY_RUNS = 20
LATENCY_THREADS = 2
THROUGHPUT_STEPS = 6


@dataclass(frozen=True)
class Preset:
    """Data size, resolution and training budget shared by every variant."""

    n_train: int
    n_val: int
    size: tuple[int, int]  # rendered (H, W)
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]
    decoder_channels: int
    device: str
    weightings: tuple[str, ...]  # multi-task weightings to run (shared decoder)
    latency_size: tuple[int, int]  # (H, W) of the latency measurement


PRESETS: dict[str, Preset] = {
    "smoke": Preset(16, 8, (64, 128), 1, 8, (0,), 16, "cpu", ("fixed", "pcgrad"), (64, 128)),
    "cpu": Preset(400, 100, (96, 192), 6, 16, (0, 1), 64, "cpu", tuple(WEIGHTINGS), (256, 512)),
    "gpu": Preset(4000, 500, (256, 512), 30, 16, (0, 1, 2), 128, "auto", tuple(WEIGHTINGS), (480, 640)),
}


def variants(p: Preset) -> dict[str, list[str]]:
    """``{name: --set overrides}`` for every trained model of the study."""
    out = {
        "single: semseg": ["model.tasks=[semseg]"],
        "single: depth": ["model.tasks=[depth]"],
    }
    out.update({f"mtl shared: {w}": [f"loss.weighting={w}"] for w in p.weightings})
    out["mtl split: fixed"] = ["model.sharing=split"]
    if IMAGENET.is_file():
        out["mtl shared: fixed, imagenet"] = [
            f"model.backbone_weights={IMAGENET}",
            "train.encoder_lr_mult=0.1",
        ]
    return out


def base_overrides(p: Preset, root: Path, seed: int, out_dir: Path) -> list[str]:
    h, w = p.size
    return [
        f"data.root={root}",
        f"data.crop=[{h}, {w}]",
        "data.num_workers=0",
        "model.backbone=mobilenet_v2",
        f"model.decoder_channels={p.decoder_channels}",
        f"train.epochs={p.epochs}",
        f"train.batch_size={p.batch_size}",
        "train.lr=2e-3",
        f"train.seed={seed}",
        f"train.device={p.device}",
        f"train.out_dir={out_dir}",
        "train.log_every=1000",
    ]


def ensure_data(p: Preset, root: Path) -> Path:
    """Render the preset's synthetic dataset once (reused by later runs)."""
    if not (root / "dataset.json").is_file():
        from densemtl.synth.render import generate_dataset

        generate_dataset(root, n_train=p.n_train, n_val=p.n_val, size=p.size, seed=0, progress=False)
    return root


def architecture(name: str) -> str:
    """Variants that differ only in weights or training share an architecture (and so a latency)."""
    if name.startswith("single"):
        return name
    return "mtl split" if name.startswith("mtl split") else "mtl shared"


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


def _cuda_runner(model: torch.nn.Module, x: torch.Tensor):
    model, x = model.cuda(), x.cuda()

    def run() -> None:
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize()

    return run


def run_one(sets: list[str]) -> dict[str, Any]:
    """Train one variant (or reuse its finished run folder); returns its final evaluation, params and config.

    A run folder whose ``metrics.jsonl`` already holds every epoch is reused, so an interrupted study continues
    where it stopped (training is deterministic on CPU: the numbers are the ones a rerun would give).
    """
    cfg = load_config(None, sets)
    out = Path(cfg.train.out_dir)
    log = out / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if len(records) != cfg.train.epochs or not (out / "config.yaml").is_file():
        train(cfg)
        records = [json.loads(line) for line in log.read_text().splitlines()]
    last = {k[len("val/") :]: v for k, v in records[-1].items() if k.startswith("val/")}
    model = build_model(load_config(out / "config.yaml").model)  # num_classes resolved from the dataset
    return {
        **{k: v for k, v in last.items() if k in KEYS},
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "weights": {k: v for k, v in records[-1].items() if k.startswith("weight/")},
        "config": str(out / "config.yaml"),
    }


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


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def aggregate(
    runs: dict[str, list[dict[str, Any]]], latency: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Mean ± std per variant over seeds, Δm% vs the single-task pair (per seed, then averaged), and latency.

    ``torch_vs_singles`` / ``ort_vs_singles``: the variant's latency over the summed latency of the two
    single-task models on that backend; the goal holds when every measured backend gives <= 0.6 and Δm >= 0.
    """
    singles = [{**s, **d} for s, d in zip(runs["single: semseg"], runs["single: depth"], strict=True)]
    table: dict[str, dict[str, Any]] = {}
    for name, seed_runs in runs.items():
        row: dict[str, Any] = {}
        for k in (*KEYS, "images_per_s", "params_m"):
            mean, std = _mean_std([r.get(k, math.nan) for r in seed_runs])
            if not math.isnan(mean):
                row[k], row[f"{k}_std"] = mean, std
        row.update(latency.get(architecture(name), {}))
        if name.startswith("mtl"):
            dms = [delta_m(r, s, keys=KEYS) for r, s in zip(seed_runs, singles, strict=True)]
            row["delta_m"], row["delta_m_std"] = _mean_std(dms)
            ratios = []
            for backend in ("torch_ms", "ort_ms"):
                pair = [latency.get(f"single: {t}", {}).get(backend) for t in ("semseg", "depth")]
                if backend in row and None not in pair:
                    row[f"{backend[:-3]}_vs_singles"] = row[backend] / sum(pair)
                    ratios.append(row[f"{backend[:-3]}_vs_singles"])
            row["goal_met"] = bool(ratios) and max(ratios) <= 0.6 and row["delta_m"] >= 0
        row["weights"] = seed_runs[-1]["weights"]
        table[name] = row
    return table


def markdown(table: dict[str, dict[str, Any]], preset: str, p: Preset, seconds: float) -> str:
    """The study's table: metrics as mean ± std over seeds, latency as measured once per architecture."""
    cols = [*KEYS, "delta_m", "params_m", "torch_ms", "ort_ms", "torch_vs_singles", "ort_vs_singles"]
    cols.append("images_per_s")
    h, w = p.latency_size
    lines = [
        f"# MTL study, preset `{preset}` ({len(p.seeds)} seed(s), {seconds / 60:.1f} min)",
        "",
        f"Trained at {p.size[0]}x{p.size[1]} ({p.n_train} train / {p.n_val} val images, {p.epochs} epochs, batch "
        f"{p.batch_size}). Δm% > 0: better than the single-task pair. Latency: batch 1 at {h}x{w}, "
        f"{LATENCY_THREADS} threads, all models interleaved in one loop; *_vs_singles: the model's latency / "
        "(single semseg + single depth). images_per_s: training steps (forward, the weighting's backward, "
        "optimiser step) on one batch, all variants interleaved after training.",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in table.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append("")
            elif f"{c}_std" in row and len(p.seeds) > 1 and c not in ("params_m", "images_per_s"):
                cells.append(f"{row[c]:.3f} ± {row[f'{c}_std']:.3f}")
            else:
                cells.append(f"{row[c]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    met = [n for n, r in table.items() if r.get("goal_met")]
    lines += ["", f"Goal (≤ 0.6x latency and Δm ≥ 0) met by: {', '.join(met) if met else 'none'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--work", default="runs/mtl_study", help="datasets and run folders go here")
    ap.add_argument("--out", default="benchmarks/results", help="mtl_study_<preset>.{json,md} go here")
    args = ap.parse_args(argv)
    p, work, start = PRESETS[args.preset], Path(args.work) / args.preset, time.perf_counter()
    root = ensure_data(p, work / "data")
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, sets in variants(p).items():
        for seed in p.seeds:
            slug = name.replace(": ", "_").replace(", ", "_").replace(" ", "_")
            print(f"== {name} (seed {seed})", flush=True)
            out_dir = work / "runs" / f"{slug}_s{seed}"
            runs.setdefault(name, []).append(run_one(base_overrides(p, root, seed, out_dir) + sets))
    configs = {architecture(n): r[0]["config"] for n, r in runs.items()}
    print(f"== latency at {p.latency_size[0]}x{p.latency_size[1]}: {sorted(configs)}", flush=True)
    latency = measure_latency(configs, p.latency_size, p.device)
    print("== training images/s, all variants interleaved", flush=True)
    speed = measure_training_speed({n: r[0]["config"] for n, r in runs.items()})
    for name, value in speed.items():
        for r in runs[name]:
            r["images_per_s"] = value
    seconds = time.perf_counter() - start
    table = aggregate(runs, latency)
    result = {
        "preset": args.preset, "config": p.__dict__, "seconds": seconds, "latency": latency, "table": table,
        "runs": runs,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mtl_study_{args.preset}.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(table, args.preset, p, seconds)
    (out / f"mtl_study_{args.preset}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
