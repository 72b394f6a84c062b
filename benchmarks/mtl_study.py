"""The multi-task learning study: which task weighting and how much sharing help, under one fixed budget.

Trains, on the synthetic benchmark with the same data, epochs and seeds for every variant: one single-task model
per task of ``--tasks`` (default ``semseg,depth``), multi-task models on all of them with every weighting in
``densemtl.train.weighting.WEIGHTINGS`` (or ``--weightings``; shared decoder), with split decoders, and from
ImageNet weights (MobileNetV2, local file, fully fine-tuned with encoder LR x0.1). When ``--tasks`` holds more
than semseg and depth (``semseg,depth,normals``), the two-task shared model with fixed weights is trained too, so
that one run reports both: each multi-task model's Δm% and latency are taken against the single-task models of
ITS OWN tasks (a ``[semseg+depth+normals]`` suffix names the tasks of a model; none: semseg+depth). Every variant
uses the MobileNetV2 backbone so that scratch and ImageNet differ only in initialisation. Reports each task's
metrics (``TASK_METRICS``), Δm% (positive = better), parameters, latency and training images/s, as mean ± std
over seeds; writes JSON + Markdown.

Latency depends on the architecture only, so it is measured once per architecture after training: batch 1 at the
preset's ``latency_size``, 2 threads, PyTorch eager and ONNX Runtime (when installed), all models interleaved in
one loop so that they see the same machine load (the ratios are what to read, not the absolute times). Training
images/s likewise: after training, a few optimiser steps of every variant on one batch, interleaved. Finished run
folders are reused, so an interrupted study continues where it stopped (and a three-task study reuses the
two-task study's single-task and shared/fixed runs).

    python benchmarks/mtl_study.py --preset smoke   # seconds-to-minutes: checks the pipeline end to end
    python benchmarks/mtl_study.py --preset cpu     # the CPU study (see docs/mtl.md for its run time)
    python benchmarks/mtl_study.py --preset gpu     # larger data and budget, for a machine with a GPU
    python benchmarks/mtl_study.py --preset cpu --tasks semseg,depth,normals --weightings fixed,uncertainty

The goal tested honestly: the multi-task model at <= 0.6x the summed latency of its single-task models,
with Δm >= 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densemtl.config import load_config
from densemtl.metrics import delta_m
from densemtl.models import build_model
from densemtl.tasks import TASKS, check_tasks
from densemtl.train.engine import train
from densemtl.train.weighting import WEIGHTINGS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGENET = REPO.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
DEFAULT_TASKS = ("semseg", "depth")
# The metrics that enter the table and Δm, per task (a task not listed here: its headline metric).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "semseg": ("miou", "pixel_acc"),
    "depth": ("abs_rel", "rmse", "delta1"),
    "normals": ("mean_deg", "median_deg", "within_11_25", "within_22_5"),
}
GOAL_LATENCY = 0.6  # the goal: latency <= this x the summed latency of the model's single-task models

if str(HERE) not in sys.path:  # mtl_timing sits next to this file (also when loaded by path, as the tests do)
    sys.path.insert(0, str(HERE))


def task_keys(tasks: Iterable[str]) -> tuple[str, ...]:
    """The ``"task/metric"`` keys of the table and of Δm for these tasks, in task order."""
    return tuple(f"{t}/{m}" for t in tasks for m in TASK_METRICS.get(t, (TASKS[t].headline,)))


KEYS = task_keys(DEFAULT_TASKS)  # the two-task study's


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


# ------------------------------------------------------------------------------- variants and their tasks
def tasks_label(tasks: Sequence[str]) -> str:
    """The suffix that names a multi-task model's tasks: '' for semseg+depth, else ``" [a+b+c]"``."""
    return "" if tuple(tasks) == DEFAULT_TASKS else f" [{'+'.join(tasks)}]"


def tasks_of(name: str) -> tuple[str, ...]:
    """The tasks a variant is trained on, read from its name (``single: t``, or the ``[a+b]`` suffix)."""
    if name.startswith("single: "):
        return (name[len("single: ") :],)
    if name.endswith("]"):
        return tuple(name[name.rindex("[") + 1 : -1].split("+"))
    return DEFAULT_TASKS


def architecture(name: str) -> str:
    """Variants that differ only in weights or training share an architecture (and so a latency)."""
    if name.startswith("single"):
        return name
    return ("mtl split" if name.startswith("mtl split") else "mtl shared") + tasks_label(tasks_of(name))


def variants(
    p: Preset, tasks: Sequence[str] = DEFAULT_TASKS, weightings: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """``{name: --set overrides}`` for every trained model of the study, single-task models first."""
    tasks = tuple(tasks)
    out = {f"single: {t}": [f"model.tasks=[{t}]"] for t in tasks}
    if set(DEFAULT_TASKS) < set(tasks):  # the two-task model, against its own two single-task models
        out["mtl shared: fixed"] = [f"model.tasks=[{', '.join(DEFAULT_TASKS)}]", "loss.weighting=fixed"]
    on, label = f"model.tasks=[{', '.join(tasks)}]", tasks_label(tasks)
    for w in p.weightings if weightings is None else weightings:
        out[f"mtl shared: {w}{label}"] = [on, f"loss.weighting={w}"]
    out[f"mtl split: fixed{label}"] = [on, "model.sharing=split"]
    if IMAGENET.is_file():
        out[f"mtl shared: fixed, imagenet{label}"] = [
            on,
            f"model.backbone_weights={IMAGENET}",
            "train.encoder_lr_mult=0.1",
        ]
    return out


def run_folder(name: str, seed: int) -> str:
    """A variant's run folder name; the same config gets the same folder in every study (so it is reused)."""
    return f"{re.sub(r'[^A-Za-z0-9+]+', '_', name).strip('_')}_s{seed}"


def results_stem(preset: str, tasks: Sequence[str], weightings: Sequence[str]) -> str:
    """``mtl_study_<preset>[_<tasks>][_<weightings>]``: the suffixes only where they differ from the defaults,
    so the published two-task ``mtl_study_<preset>.*`` is never overwritten by another study."""
    stem = f"mtl_study_{preset}"
    if tuple(tasks) != DEFAULT_TASKS:
        stem += "_" + "-".join(tasks)
    if tuple(weightings) != PRESETS[preset].weightings:
        stem += "_" + "-".join(weightings)
    return stem


# ---------------------------------------------------------------------------------------- data and runs
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


def ensure_data(p: Preset, root: Path, tasks: Sequence[str] = DEFAULT_TASKS) -> Path:
    """Render the preset's synthetic dataset once (reused by later runs); it must hold every task."""
    if not (root / "dataset.json").is_file():
        from densemtl.synth.generate import generate_dataset

        generate_dataset(root, n_train=p.n_train, n_val=p.n_val, size=p.size, seed=0, progress=False)
    missing = set(tasks) - set(json.loads((root / "dataset.json").read_text()).get("tasks", []))
    if missing:
        raise SystemExit(
            f"{root} lacks {sorted(missing)} (rendered by an older version?): delete it to re-render"
        )
    return root


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
        train(cfg, overwrite=True)  # an unfinished run of this variant is replaced
        records = [json.loads(line) for line in log.read_text().splitlines()]
    keys = task_keys(cfg.model.tasks)
    last = {k[len("val/") :]: v for k, v in records[-1].items() if k.startswith("val/")}
    model = build_model(load_config(out / "config.yaml").model)  # num_classes resolved from the dataset
    return {
        **{k: v for k, v in last.items() if k in keys},
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "weights": {k: v for k, v in records[-1].items() if k.startswith("weight/")},
        "config": str(out / "config.yaml"),
    }


# ------------------------------------------------------------------------------------------------ table
def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def singles_of(runs: dict[str, list[dict[str, Any]]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Per seed, the single-task models' metrics of ``tasks`` merged into one dict (Δm's reference)."""
    per_task = [runs[f"single: {t}"] for t in tasks]
    return [{k: v for r in seed for k, v in r.items()} for seed in zip(*per_task, strict=True)]


def latency_ratios(row: dict[str, Any], latency: dict[str, dict[str, float]], tasks: Sequence[str]) -> None:
    """Add ``<backend>_vs_singles``: the row's latency / the summed latency of its tasks' single-task models."""
    for backend in ("torch_ms", "ort_ms"):
        singles = [latency.get(f"single: {t}", {}).get(backend) for t in tasks]
        if backend in row and None not in singles:
            row[f"{backend[:-3]}_vs_singles"] = row[backend] / sum(singles)


def aggregate(
    runs: dict[str, list[dict[str, Any]]], latency: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Mean ± std per variant over seeds, Δm% vs its own tasks' single-task models (per seed, then averaged),
    and latency.

    ``torch_vs_singles`` / ``ort_vs_singles``: the variant's latency over the summed latency of the single-task
    models of its tasks on that backend; the goal holds when every measured backend gives <= 0.6 and Δm >= 0.
    """
    table: dict[str, dict[str, Any]] = {}
    for name, seed_runs in runs.items():
        tasks = tasks_of(name)
        row: dict[str, Any] = {"tasks": "+".join(tasks)}
        for k in (*task_keys(tasks), "images_per_s", "params_m"):
            mean, std = _mean_std([r.get(k, math.nan) for r in seed_runs])
            if not math.isnan(mean):
                row[k], row[f"{k}_std"] = mean, std
        row.update(latency.get(architecture(name), {}))
        if name.startswith("mtl"):
            keys = task_keys(tasks)
            dms = [delta_m(r, s, keys=keys) for r, s in zip(seed_runs, singles_of(runs, tasks), strict=True)]
            row["delta_m"], row["delta_m_std"] = _mean_std(dms)
            latency_ratios(row, latency, tasks)
            ratios = [row[k] for k in ("torch_vs_singles", "ort_vs_singles") if k in row]
            row["goal_met"] = bool(ratios) and max(ratios) <= GOAL_LATENCY and row["delta_m"] >= 0
        row["weights"] = seed_runs[-1]["weights"]
        table[name] = row
    return table


def markdown(table: dict[str, dict[str, Any]], preset: str, p: Preset, seconds: float) -> str:
    """The study's table: metrics as mean ± std over seeds, latency as measured once per architecture."""
    from mtl_timing import LATENCY_THREADS

    tasks = list(dict.fromkeys(t for name in table for t in tasks_of(name)))
    cols = [*task_keys(tasks), "delta_m", "params_m", "torch_ms", "ort_ms", "torch_vs_singles"]
    cols += ["ort_vs_singles", "images_per_s"]
    h, w = p.latency_size
    lines = [
        f"# MTL study, preset `{preset}`, tasks {', '.join(tasks)} ({len(p.seeds)} seed(s), {seconds / 60:.1f} min)",
        "",
        f"Trained at {p.size[0]}x{p.size[1]} ({p.n_train} train / {p.n_val} val images, {p.epochs} epochs, batch "
        f"{p.batch_size}). A multi-task model's tasks: its `[a+b+c]` suffix, none = semseg+depth; its Δm% and "
        "*_vs_singles are against the single-task models of those tasks only. Δm% > 0: better than them. "
        f"Latency: batch 1 at {h}x{w}, {LATENCY_THREADS} threads, all models interleaved in one loop; "
        "*_vs_singles: the model's latency / the sum of its single-task models'. images_per_s: training steps "
        "(forward, the weighting's backward, optimiser step) on one batch, all variants interleaved after training.",
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


# ------------------------------------------------------------------------------------------------- main
def _names(text: str, known: Iterable[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--{what}: unknown {unknown or 'empty list'}; known: {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated, at least two")
    ap.add_argument("--weightings", default="", help="comma-separated subset of the preset's (default: all)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds (default: the preset's)")
    ap.add_argument("--work", default="runs/mtl_study", help="datasets and run folders go here")
    ap.add_argument("--out", default="benchmarks/results", help="mtl_study_<preset>[...].{json,md} go here")
    args = ap.parse_args(argv)
    args.tasks = check_tasks(_names(args.tasks, TASKS, "tasks"))
    if len(args.tasks) < 2:
        raise SystemExit("--tasks: a multi-task study needs at least two tasks")
    preset = PRESETS[args.preset].weightings
    args.weightings = _names(args.weightings, WEIGHTINGS, "weightings") if args.weightings else preset
    args.seeds = tuple(int(v) for v in args.seeds.split(",")) if args.seeds else PRESETS[args.preset].seeds
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from mtl_timing import measure_latency, measure_training_speed

    args = parse_args(argv)
    p = dataclasses.replace(PRESETS[args.preset], weightings=args.weightings, seeds=args.seeds)
    work, start = Path(args.work) / args.preset, time.perf_counter()
    root = ensure_data(p, work / "data", args.tasks)
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, sets in variants(p, args.tasks).items():
        for seed in p.seeds:
            print(f"== {name} (seed {seed})", flush=True)
            out_dir = work / "runs" / run_folder(name, seed)
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
        "preset": args.preset, "tasks": list(args.tasks), "config": p.__dict__, "seconds": seconds,
        "latency": latency, "table": table, "runs": runs,
    }  # fmt: skip
    out, stem = Path(args.out), results_stem(args.preset, args.tasks, args.weightings)
    if args.seeds != PRESETS[args.preset].seeds:  # a partial run never overwrites the full one
        stem += "_seeds-" + "-".join(map(str, args.seeds))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(table, args.preset, p, seconds)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
