"""Objects at the demo budget: detection and distance quality, what the head costs the other tasks, its latency.

Stages (each reads what the previous ones wrote under ``--work``):

* ``train``: the objects demo's budget and seed twice: ``objects`` (configs/synthetic_objects.yaml: what ``make
  demo-objects`` trains) and ``base`` (configs/synthetic.yaml, ``make demo``'s semseg, depth and normals, with the
  objects demo's phases: the same run without the head);
* ``evaluate``: every metric of both on the synthetic validation split, and for ``objects`` the distance of each
  matched detection two ways: the head's own regression and the median of the predicted depth map over the
  box's pixels predicted as the object's class (all of the box's pixels when the class is no semseg class);
  and what its detections get wrong (benchmarks/objects_errors.py: recall by box height, confident errors);
* ``latency``: ONNX Runtime at 480x640, batch 1, 2 threads, both models as ``densemtl export`` writes them,
  timed interleaved;
* ``synth``: ``densemtl data synth`` of the demo's 2400 images at 256x512 as a fresh process (start-up
  included);
* ``weights``: the objects demo at other objects loss weights and class balances (``LOSS_STUDY``, runs
  ``objects_w<weight>_b<balance>``), each evaluated as above: what the head's share of the shared gradient, and
  the people's share of the head's, trade;
* ``seeds``: ``base`` and ``objects`` again at seed 1 (``base_s1``, ``objects_s1``): the dense tasks' moves at a
  second seed, next to how far the base model alone moves between seeds (depth delta1 moved 2 points);
* ``report``: ``results/objects.json`` and ``results/objects.md`` with the targets of issue #15.

    python benchmarks/objects.py                      # everything (about 2 hours on 2 idle CPU cores)
    python benchmarks/objects.py --stages evaluate,report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BASE_TASKS = ("semseg", "depth", "normals")
OBJECTS_CONFIG = ROOT / "configs" / "synthetic_objects.yaml"  # make demo-objects
# The ImageNet MobileNetV2 the objects demo starts from, as a local file (../shared, beside the checkout); without
# it the runs download torchvision's copy (or, offline, stop with a message saying how to get it).
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
VARIANTS = ("base", "objects")
CONFIGS = dict.fromkeys(VARIANTS, OBJECTS_CONFIG)
# The objects loss study (stage "weights"): (loss.weights.objects, loss.objects_class_balance) beside the demo's.
LOSS_STUDY = ((0.1, 0.0), (0.25, 0.0), (0.1, 1.0), (0.075, 1.0))
SEED_KEYS = ("semseg/miou", "depth/delta1", "objects/ap50_car", "objects/ap50_person", "objects/distance_delta1_car")


def variant_sets() -> dict[str, list[str]]:
    """Each variant's ``--set`` overrides of the objects demo's config: ``base`` is that config without the objects
    head (``make demo``'s three dense tasks on the same backbone, weights and phases), so that the two runs differ
    by the head alone. Both load the ImageNet backbone from ``SHARED_WEIGHTS`` where it exists (offline here)."""
    local = [f"model.backbone_weights={SHARED_WEIGHTS}"] if SHARED_WEIGHTS.is_file() else []
    return {
        "base": [f"model.tasks=[{','.join(BASE_TASKS)}]", *local],  # the objects loss weight then weighs nothing
        "objects": local,
    }


def train_variants(work: Path, data: Path) -> dict[str, float]:
    """Train each variant at the objects demo's budget (finished runs are reused); returns each run's logged
    training seconds (validation excluded)."""
    from demo_runs import train_demo_runs

    return train_demo_runs(work, data, variant_sets(), CONFIGS)


def weight_study(work: Path, data: Path) -> dict[str, Any]:
    """The objects demo at each objects loss weight and class balance of ``LOSS_STUDY`` (runs ``objects_w*_b*``):
    every metric of each. What the head's share of the shared gradient and the people's share of the head's
    trade."""
    from demo_runs import logged_epochs, train_demo_runs

    runs = {f"objects_w{w:g}_b{b:g}": [*variant_sets()["objects"], f"loss.weights.objects={w:g}",
                                       f"loss.objects_class_balance={b:g}"] for w, b in LOSS_STUDY}  # fmt: skip
    seconds = train_demo_runs(work, data, runs, dict.fromkeys(runs, OBJECTS_CONFIG))
    return {name: {**evaluate_variant(work, name), "train_seconds": seconds.get(name), "epochs": logged_epochs(work / name)}
            for name in runs}


def seed_study(work: Path, data: Path, evaluated: dict[str, Any]) -> dict[str, Any]:
    """``base`` and ``objects`` at seed 1 as well: each run's headline metrics and, per seed, the dense tasks'
    moves with the head; and how far the base model alone moves from seed 0 to seed 1. ``evaluated``: the
    ``evaluate`` stage's results of this run of the script (the seed-0 runs are evaluated here without them)."""
    from demo_runs import train_demo_runs

    runs = {f"{n}_s1": [*sets, "train.seed=1"] for n, sets in variant_sets().items()}
    seconds = train_demo_runs(work, data, runs, {f"{n}_s1": c for n, c in CONFIGS.items()})
    summary = {
        n: evaluated[n]["summary"] if n in evaluated else evaluate_variant(work, n)["summary"]
        for n in ("base", "objects", *runs)
    }
    out: dict[str, Any] = {n: {k: summary[n].get(k) for k in SEED_KEYS} for n in summary}
    for key in SEED_KEYS[:2]:
        out[f"move {key}"] = [summary[o][key] - summary[b][key] for b, o in (("base", "objects"), ("base_s1", "objects_s1"))]
        out[f"seed move {key}"] = summary["base_s1"][key] - summary["base"][key]
    return {**out, "train_seconds": seconds}


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate_variant(work: Path, name: str) -> dict[str, Any]:
    """``densemtl evaluate``'s numbers for one run's best checkpoint on the validation split."""
    from densemtl.evaluation import evaluate_checkpoint
    from densemtl.metrics import summarize

    out = evaluate_checkpoint(work / name / "best.pt", split="val", out_dir=work / name / "eval_val")
    return {"summary": summarize(out["results"]), "objects": out["results"].get("objects", {})}


def _depth_distance(pred: dict[str, np.ndarray], box: np.ndarray, class_id: int | None) -> float:
    """Median predicted depth over the box's pixels of the object's semseg class (all of them without one)."""
    h, w = pred["depth"].shape
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    depth = pred["depth"][y0:y1, x0:x1]
    if class_id is not None:
        mine = pred["semseg"][y0:y1, x0:x1] == class_id
        if mine.any():
            depth = depth[mine]
    return float(np.median(depth)) if depth.size else math.nan


def distance_sources(work: Path, data: Path, limit: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Relative error and delta1 of matched detections' distances: the head's vs the depth map's median; and,
    from the same predictions, what the detections get wrong (``objects_errors``)."""
    from objects_errors import DetectionErrors, centre_cell_boxes

    from densemtl.data.folder import FolderDataset
    from densemtl.inference import Predictor
    from densemtl.tasks.objects import OBJECTS, SCORE_THRESHOLD
    from densemtl.tasks.objects_codec import COL, STRIDE
    from densemtl.tasks.objects_metrics import ignored, match_boxes

    predictor = Predictor.from_checkpoint(work / "objects" / "best.pt")
    ds = FolderDataset(data, "val", tasks=("objects",), max_samples=limit)
    names = list(predictor.info.get("object_classes", []))
    seg_id = {n: predictor.class_names.index(n) for n in names if n in predictor.class_names}
    rows: list[tuple[str, float, float, float]] = []  # class, true, head, depth map
    errors = DetectionErrors(names)
    for i in range(len(ds)):
        s = ds[i]
        rgb = (s["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out = predictor.raw(rgb)  # one forward pass: the predictions, and the raw map for the centre-cell boxes
        pred = predictor.results(out, rgb.shape[:2], float(s["intrinsics"][0]) if s["has_intrinsics"] else None)
        gt = OBJECTS.pack(s["objects"], s)
        gt = gt[gt[:, COL["class"]] >= 0]
        skip = ignored(gt, rgb.shape[0] // STRIDE * STRIDE)
        keep = pred["objects_scores"] >= SCORE_THRESHOLD
        boxes = torch.from_numpy(pred["objects_boxes"][keep])
        classes = torch.from_numpy(pred["objects_classes"][keep]).long()
        scores = torch.from_numpy(pred["objects_scores"][keep])
        raw = out[OBJECTS.name][0].float()  # on the image's grid: the regression at each object's centre
        box_gt = gt[:, COL["x0"] : COL["y1"] + 1]
        errors.add(boxes, scores, classes, box_gt, gt[:, COL["class"]].long(), skip,
                   centre_cell_boxes(raw, box_gt), STRIDE / predictor.scale)  # fmt: skip
        gt = gt[~skip]
        for j, m in match_boxes(boxes, classes, gt):  # the metric's matching, on the scored objects
            if gt[m, COL["distance"]] > 0:
                name = names[int(gt[m, COL["class"]])]
                via_map = _depth_distance(pred, boxes[j].numpy(), seg_id.get(name))
                rows.append((name, float(gt[m, COL["distance"]]), float(pred["objects_distance"][keep][j]), via_map))
    return {"matched": len(rows), **_compare(rows, names)}, errors.summary()


def _compare(rows: list[tuple[str, float, float, float]], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ["all", *names]:
        sel = [r for r in rows if name in ("all", r[0])]
        true = np.array([r[1] for r in sel])
        for k, src in (("head", 2), ("depth_map", 3)):
            est = np.array([r[src] for r in sel])
            ok = np.isfinite(est) & (est > 0)
            if not ok.any():
                continue
            ratio = np.maximum(est[ok] / true[ok], true[ok] / est[ok])
            out[f"{name}/{k}/relerr"] = float(np.mean(np.abs(est[ok] - true[ok]) / true[ok]))
            out[f"{name}/{k}/delta1"] = float(np.mean(ratio < 1.25))
        out[f"{name}/n"] = len(sel)
    return out


# ------------------------------------------------------------------------------------------------- latency
def measure_latency(work: Path, size: tuple[int, int], threads: int, runs: int) -> dict[str, Any]:
    """ORT latency of both trained models as ``densemtl export`` writes them, timed interleaved."""
    from densemtl.deploy.benchmark import time_interleaved
    from densemtl.deploy.export import export_model
    from densemtl.deploy.ort import create_session
    from densemtl.train.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in VARIANTS:
            model = model_from_checkpoint(load_checkpoint(work / name / "best.pt")).eval()
            session = create_session(export_model(model, Path(tmp) / f"{name}.onnx", size), threads)
            fns[name] = lambda s=session: s.run(None, {"image": x})
        stats = time_interleaved(fns, runs, warmup=3)
    out: dict[str, Any] = {k: {"ort_ms": v["median_ms"], "ort_p90_ms": v["p90_ms"]} for k, v in stats.items()}
    out["overhead"] = out["objects"]["ort_ms"] / out["base"]["ort_ms"] - 1
    return out


def synth_speed(n_train: int = 2000, n_val: int = 400) -> dict[str, Any]:
    """Images/s of ``densemtl data synth`` at 256x512 in a fresh process, start-up included.

    The demo's own dataset (2400 images): the issue's target is for that run, whose ~7 s start-up (torch and
    torchvision imports) a short run would magnify.
    """
    n = n_train + n_val
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "densemtl", "data", "synth", "--out", f"{tmp}/d", "--train", str(n_train),
               "--val", str(n_val), "--size", "256x512", "--seed", "0"]  # fmt: skip
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        seconds = time.perf_counter() - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "load_avg_1min_before": load_before}


# -------------------------------------------------------------------------------------------------- report
def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its figure and whether it is met."""
    t: dict[str, Any] = {}
    ev = result.get("evaluate", {})
    if "objects" in ev:
        o = ev["objects"]["objects"]
        t["car AP50 >= 0.6"] = {"value": o.get("ap50_car"), "met": (o.get("ap50_car") or 0) >= 0.6}
        t["person AP50 >= 0.3"] = {"value": o.get("ap50_person"), "met": (o.get("ap50_person") or 0) >= 0.3}
        d1 = o.get("distance_delta1_car")
        t["matched-car distance delta1 >= 0.9"] = {"value": d1, "met": (d1 or 0) >= 0.9}
    if {"base", "objects"} <= set(ev):
        for key in ("semseg/miou", "depth/delta1"):
            move = ev["objects"]["summary"][key] - ev["base"]["summary"][key]
            t[f"{key} moves by <= 1 point"] = {"value": move, "met": abs(move) <= 0.01}
    if "latency" in result:
        v = result["latency"]["overhead"]
        t["objects head <= 10 % of ORT latency (480x640, 2 threads)"] = {"value": v, "met": v <= 0.10}
    if "synth" in result:
        v = result["synth"]["images_per_s"]
        t["data synth >= 20 images/s (256x512, start-up included)"] = {"value": v, "met": v >= 20}
    return t


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Objects at the demo budget (benchmarks/objects.py)", "", "| target | value | met |", "|---|---|---|"]
    for k, v in result.get("targets", {}).items():
        val = v["value"]
        lines.append(f"| {k} | {'n/a' if val is None else f'{val:.4f}'} | {'yes' if v['met'] else 'NO'} |")
    ev = result.get("evaluate", {})
    keys = ("semseg/miou", "depth/abs_rel", "depth/delta1", "normals/mean_deg", "objects/ap50", "objects/map",
            "objects/ap50_car", "objects/ap50_person", "objects/distance_delta1_car", "objects/bev_ap")  # fmt: skip
    lines += ["", "| run | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, e in ev.items():
        lines.append(f"| {name} | " + " | ".join(f"{e['summary'].get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += seconds_line(result.get("train_seconds", {}))
    src = result.get("distance_sources", {})
    if src:
        lines += ["", "Distance of matched detections (IoU >= 0.5, score >= 0.3):", "",
                  "| class | n | head rel. err | head δ1 | depth-map median rel. err | depth-map median δ1 |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name in [k.split("/")[0] for k in src if k.endswith("/n")]:
            cells = [src.get(f"{name}/{s}/{m}", float("nan")) for s in ("head", "depth_map") for m in ("relerr", "delta1")]
            lines.append(f"| {name} | {src[f'{name}/n']} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    if "detection_errors" in result:
        from objects_errors import markdown as errors_markdown

        lines += errors_markdown(result["detection_errors"])
    study = result.get("weights", {})
    if study:
        study_keys = ("semseg/miou", "depth/delta1", "objects/ap50_car", "objects/ap50_person",
                      "objects/distance_delta1_car")  # fmt: skip
        lines += ["", "Objects loss weight w and class balance b (stage weights, from its last run, which may be older "
                  f"than the tables above and at another budget: see epochs; the demo: {demo_loss()}; "
                  "base of those tables: " + ", ".join(
            f"{k} {ev['base']['summary'][k]:.4f}" for k in study_keys[:2] if "base" in ev) + "):", "",
            "| run | epochs | " + " | ".join(study_keys) + " |", "|---|---:|" + "---:|" * len(study_keys)]  # fmt: skip
        for name, e in study.items():
            cells = " | ".join(f"{e['summary'].get(k, float('nan')):.4f}" for k in study_keys)
            lines.append(f"| {name} | {e.get('epochs', '?')} | {cells} |")
    return "\n".join(lines + seeds_markdown(result.get("seeds", {}))) + "\n"


def seeds_markdown(seeds: dict[str, Any]) -> list[str]:
    """The ``seeds`` stage's table: both runs at both seeds, and the dense tasks' moves."""
    if not seeds:
        return []
    lines = ["", "Seeds (stage seeds): the same runs at seed 1; how far the head moves the dense tasks at each seed, "
             "and how far the base model alone moves between seeds:", "",
             "| run | " + " | ".join(SEED_KEYS) + " |", "|---|" + "---:|" * len(SEED_KEYS)]  # fmt: skip
    for name in ("base", "objects", "base_s1", "objects_s1"):
        cells = [seeds[name].get(k) for k in SEED_KEYS]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
    lines += ["", "| metric | move with the head, seed 0 | seed 1 | base, seed 0 -> 1 |", "|---|---:|---:|---:|"]
    for key in SEED_KEYS[:2]:
        m0, m1 = seeds[f"move {key}"]
        lines.append(f"| {key} | {m0:+.4f} | {m1:+.4f} | {seeds[f'seed move {key}']:+.4f} |")
    return lines + seconds_line(seeds.get("train_seconds", {}))


def demo_loss() -> str:
    """The objects demo's loss weight and class balance, as its config sets them."""
    from densemtl.config import load_config

    loss = load_config(OBJECTS_CONFIG).loss
    return f"w {loss.weights.get('objects', 1.0):g}, b {loss.objects_class_balance:g}"


def seconds_line(seconds: dict[str, float]) -> list[str]:
    """A sentence with each run's training seconds as its log records them (empty without any)."""
    if not seconds:
        return []
    runs = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    return ["", f"Training time on this machine (the runs' metrics.jsonl, each epoch's validation excluded): {runs}."]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="train,evaluate,latency,synth,weights,seeds,report")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic", help="the demo's synthetic data")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "objects_bench")
    p.add_argument("--runs", type=int, default=100, help="latency: timed runs per model (30 scattered by 8 %% here)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stages = args.stages.split(",")
    path = RESULTS / "objects.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if "train" in stages:
        result["train_seconds"] = train_variants(args.work, args.data)
    if "evaluate" in stages:
        result["evaluate"] = {name: evaluate_variant(args.work, name) for name in VARIANTS}
        result["distance_sources"], result["detection_errors"] = distance_sources(args.work, args.data)
    if "latency" in stages:
        result["latency"] = measure_latency(args.work, (480, 640), 2, args.runs)
    if "synth" in stages:
        result["synth"] = synth_speed()
    if "weights" in stages:
        result["weights"] = weight_study(args.work, args.data)
    if "seeds" in stages:
        result["seeds"] = seed_study(args.work, args.data, result["evaluate"] if "evaluate" in stages else {})
    from demo_runs import write_results

    return write_results(result, "objects", "report" in stages, targets, markdown)


if __name__ == "__main__":
    main()
