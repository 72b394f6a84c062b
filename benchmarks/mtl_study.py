"""The multi-task learning study: which task weighting and how much sharing help, under one fixed budget.

Trains, on the synthetic benchmark with the same data, epochs and seeds for every variant:
single-task semseg, single-task depth, multi-task with every weighting in ``densemtl.weighting.WEIGHTINGS``
(shared decoder), multi-task with split decoders, and multi-task from ImageNet weights (MobileNetV2, local file,
fully fine-tuned with encoder LR x0.1). Every variant uses the MobileNetV2 backbone so that scratch and ImageNet
differ only in initialisation. Reports mIoU, pixel accuracy, AbsRel, RMSE, delta1, Δm% vs the single-task pair
(positive = better), parameters, torch latency (batch 1, eval size) and training images/s, as mean ± std over
seeds; writes JSON + Markdown.

    python benchmarks/mtl_study.py --preset smoke   # seconds-to-minutes: checks the pipeline end to end
    python benchmarks/mtl_study.py --preset cpu     # the CPU study (see docs/mtl.md for its run time)
    python benchmarks/mtl_study.py --preset gpu     # larger data and budget, for a machine with a GPU

The goal tested honestly: the multi-task model at <= 0.6x the summed latency of the two single-task models,
with Δm >= 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from densemtl.config import load_config
from densemtl.engine import train
from densemtl.metrics import delta_m
from densemtl.models import build_model
from densemtl.weighting import WEIGHTINGS

REPO = Path(__file__).resolve().parents[1]
IMAGENET = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
KEYS = ("semseg/miou", "semseg/pixel_acc", "depth/abs_rel", "depth/rmse", "depth/delta1")
LATENCY_RUNS = 20


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


PRESETS: dict[str, Preset] = {
    "smoke": Preset(16, 8, (64, 128), 1, 8, (0,), 16, "cpu", ("fixed", "pcgrad")),
    "cpu": Preset(400, 100, (96, 192), 6, 16, (0, 1), 64, "cpu", tuple(WEIGHTINGS)),
    "gpu": Preset(4000, 500, (256, 512), 30, 16, (0, 1, 2), 128, "auto", tuple(WEIGHTINGS)),
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
        from densemtl.data.synthetic import generate_dataset

        generate_dataset(root, n_train=p.n_train, n_val=p.n_val, size=p.size, seed=0, progress=False)
    return root


@torch.inference_mode()
def latency_ms(model: torch.nn.Module, size: tuple[int, int], device: torch.device) -> float:
    """Median forward time, batch 1 at ``size``, after two warm-up runs."""
    model = model.eval().to(device)
    x = torch.randn(1, 3, *size, device=device)
    times = []
    for i in range(LATENCY_RUNS + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(sets: list[str]) -> dict[str, Any]:
    """Train one variant; returns its final evaluation, training speed, params and latency."""
    cfg = load_config(None, sets)
    result = train(cfg)
    out = Path(result["out_dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg_run = load_config(out / "config.yaml")  # num_classes resolved from the dataset
    model = build_model(cfg_run.model)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    return {
        **{k: v for k, v in result["last"].items() if k in KEYS},
        "images_per_s": statistics.mean(r["images_per_s"] for r in records),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "latency_ms": latency_ms(model, tuple(cfg.data.crop), device),
        "weights": {k: v for k, v in records[-1].items() if k.startswith("weight/")},
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± std per variant over seeds, plus Δm% vs the single-task pair (per seed, then averaged)."""
    singles = [{**s, **d} for s, d in zip(runs["single: semseg"], runs["single: depth"], strict=True)]
    table: dict[str, dict[str, Any]] = {}
    for name, seed_runs in runs.items():
        row: dict[str, Any] = {}
        for k in (*KEYS, "images_per_s", "params_m", "latency_ms"):
            mean, std = _mean_std([r.get(k, math.nan) for r in seed_runs])
            if not math.isnan(mean):
                row[k], row[f"{k}_std"] = mean, std
        if name.startswith("mtl"):
            dms = [delta_m(r, s, keys=KEYS) for r, s in zip(seed_runs, singles, strict=True)]
            row["delta_m"], row["delta_m_std"] = _mean_std(dms)
            single_latency = table["single: semseg"]["latency_ms"] + table["single: depth"]["latency_ms"]
            row["latency_vs_singles"] = row["latency_ms"] / single_latency
            row["goal_met"] = row["latency_vs_singles"] <= 0.6 and row["delta_m"] >= 0
        row["weights"] = seed_runs[-1]["weights"]
        table[name] = row
    return table


def markdown(table: dict[str, dict[str, Any]], preset: str, seconds: float, seeds: int) -> str:
    cols = [*KEYS, "delta_m", "params_m", "latency_ms", "latency_vs_singles", "images_per_s"]
    lines = [
        f"# MTL study, preset `{preset}` ({seeds} seed(s), {seconds / 60:.1f} min)",
        "",
        "Δm% > 0: better than the single-task pair. latency_vs_singles: MTL latency / (seg + depth latency).",
        "",
        "| variant | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in table.items():
        cells = []
        for c in cols:
            if c not in row:
                cells.append("")
            elif f"{c}_std" in row and seeds > 1:
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
    seconds = time.perf_counter() - start
    table = aggregate(runs)
    result = {"preset": args.preset, "config": p.__dict__, "seconds": seconds, "table": table, "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mtl_study_{args.preset}.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(table, args.preset, seconds, len(p.seeds))
    (out / f"mtl_study_{args.preset}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
