"""Uncertainty at the demo budget: does the predicted uncertainty rank errors, is it calibrated, what does it cost.

Stages (each reads what the previous ones wrote under ``--work``):

* ``train``: the demo (configs/synthetic.yaml, same seed, same budget) three times: ``l1`` (depth L1 in log space,
  no uncertainty: the reference), ``default`` (the library default: L1 depth plus the std head trained on the
  detached residual) and ``laplace_nll`` (depth and std trained together by a Laplace NLL, beta = 1);
* ``evaluate``: the synthetic validation split halved by sample index: ``densemtl calibrate``'s fit
  (temperature, std scale) on the first half, every metric on the second half before and after it (ECE, NLL,
  Brier; sparsification AUSE/AURG for AbsRel, RMSE, delta1; the usual mIoU, AbsRel, delta1), the
  ``--max-rel-std`` default from the relative stds of the fit half, and the pictures of the README;
* ``latency``: ONNX Runtime at 480x640, batch 1, 2 threads: the default model exported with and without its
  uncertainty outputs (``depth_std``, ``semseg_confidence``), timed interleaved;
* ``report``: ``results/uncertainty.json`` and ``results/uncertainty.md`` with the targets of issue #14.

    python benchmarks/uncertainty.py                      # everything (about an hour on 2 CPU cores)
    python benchmarks/uncertainty.py --stages evaluate,report
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
VARIANTS: dict[str, list[str]] = {
    "l1": ["model.uncertainty=false", "loss.depth=l1"],
    "default": ["model.uncertainty=true", "loss.depth=l1"],
    "laplace_nll": ["model.uncertainty=true", "loss.depth=laplace_nll"],
}


def train_variants(work: Path, data: Path, names: list[str]) -> dict[str, float]:
    """Train each variant at the demo budget (finished runs are reused); returns each run's logged training seconds."""
    from demo_runs import train_demo_runs

    return train_demo_runs(work, data, {name: VARIANTS[name] for name in names})


# ------------------------------------------------------------------------------------------------ evaluate
HEADLINE = ("semseg/miou", "depth/abs_rel", "depth/rmse", "depth/delta1", "normals/mean_deg")
UNCERTAINTY = ("semseg/ece", "semseg/nll", "semseg/brier", "depth/ause_abs_rel", "depth/aurg_abs_rel",
               "depth/ause_rmse", "depth/aurg_rmse", "depth/ause_delta1", "depth/aurg_delta1")  # fmt: skip
KEEP_FRACTION = 0.9  # --max-rel-std default: the relative std that keeps this share of the fit half's pixels


def _evaluate(model, dataset, cfg, device, scale: float) -> dict[str, Any]:
    from densemtl.data.loaders import make_loader
    from densemtl.evaluation import run_evaluation
    from densemtl.metrics import summarize

    loader = make_loader(dataset, 4, False, cfg.data.num_workers, 0, device)
    results = run_evaluation(model, loader, cfg, {}, device, None, scale)["results"]
    return {"summary": summarize(results), "results": results}


def random_ause(spars: dict[str, Any], metric: str) -> float:
    """AUSE of the random ordering: the area between the random and the oracle curves (the metric's own area)."""
    import numpy as np

    from densemtl.tasks.uncertainty_metrics import curve_area

    x, curves = np.asarray(spars["fractions"], dtype=float), spars[metric]
    return curve_area(np.asarray(curves["random"], float), x) - curve_area(np.asarray(curves["oracle"], float), x)


@torch.inference_mode()
def relative_stds(model, dataset, cfg, device, scale: float, stride: int = 7):
    """Relative depth std (s) and relative error of every ``stride``-th valid pixel of ``dataset``."""
    import numpy as np

    from densemtl.data.loaders import make_loader
    from densemtl.runtime import forward_at_scale, to_device

    s_all, err_all = [], []
    for batch in make_loader(dataset, 4, False, cfg.data.num_workers, 0, device):
        batch = to_device(batch, device)
        depth = forward_at_scale(model, batch["image"], scale)["depth"].float()
        gt = batch["depth"]
        valid = (gt > cfg.data.eval_depth_min) & (gt <= cfg.data.eval_depth_max)
        s_all.append(depth[:, 1:][valid][::stride].cpu().numpy())
        err_all.append(((depth[:, :1] - gt).abs() / gt.clamp_min(1e-3))[valid][::stride].cpu().numpy())
    return np.concatenate(s_all), np.concatenate(err_all)


def evaluate_variant(work: Path, name: str, pictures: bool) -> dict[str, Any]:
    """Full-val metrics, then calibration fitted on the first half of val and scored on the second half."""
    import numpy as np
    from torch.utils.data import Subset

    from densemtl.calibration import calibrate_model
    from densemtl.data.loaders import build_dataset, make_loader
    from densemtl.evaluation import write_outputs
    from densemtl.runtime import resolve_device
    from densemtl.train.checkpoint import (
        config_from_checkpoint,
        input_scale,
        load_checkpoint,
        model_from_checkpoint,
    )

    ckpt = load_checkpoint(work / name / "best.pt")
    cfg, scale, dev = config_from_checkpoint(ckpt), input_scale(ckpt), resolve_device("cpu")
    model = model_from_checkpoint(ckpt).to(dev).eval()
    val = build_dataset(cfg, "val", train=False)
    half = len(val) // 2
    fit, test = Subset(val, range(half)), Subset(val, range(half, len(val)))
    out: dict[str, Any] = {"epoch": ckpt.get("epoch"), "val": _evaluate(model, val, cfg, dev, scale)["summary"]}
    if not cfg.model.uncertainty:
        return out
    out["test_before"] = _evaluate(model, test, cfg, dev, scale)["summary"]
    fit_loader = make_loader(fit, 4, False, cfg.data.num_workers, 0, dev)
    out["calibration"] = calibrate_model(model, fit_loader, cfg, dev, scale)
    after = _evaluate(model, test, cfg, dev, scale)
    out["test_after"] = after["summary"]
    d = after["results"]["depth"]["sparsification"]
    out["random_ause"] = {m: random_ause(d, m) for m in ("abs_rel", "rmse", "delta1")}
    s, err = relative_stds(model, fit, cfg, dev, scale)
    t = float(np.quantile(s, KEEP_FRACTION))
    s_test, err_test = relative_stds(model, test, cfg, dev, scale)
    kept = s_test <= round(t, 2)
    out["max_rel_std"] = {
        "quantile": KEEP_FRACTION, "value": t, "rounded": round(t, 2),
        "test_kept_fraction": float(kept.mean()), "test_abs_rel_all": float(err_test.mean()),
        "test_abs_rel_kept": float(err_test[kept].mean()), "test_abs_rel_dropped": float(err_test[~kept].mean()),
    }  # fmt: skip
    if pictures:
        plots = write_outputs(after, {**val.info}, work / name / "eval_test_half")
        out["plots"] = {k: str(v) for k, v in plots.items()}
        out["examples"] = str(example_pictures(model, test, cfg, scale, work / name / "examples.png"))
    return out


def example_pictures(model, dataset, cfg, scale: float, out: Path, picks: tuple[int, ...] = (3, 57)) -> Path:
    """Rows of image | depth | depth std | depth error: the std and the error share one relative colour scale."""
    import numpy as np

    from densemtl.inference import Predictor
    from densemtl.tasks.depth import DEPTH, REL_STD_PICTURE_MAX
    from densemtl.viz.colors import colorize_depth, make_grid, save_png

    predictor = Predictor(model, dataset.dataset.info, "cpu", scale=scale)
    rows = []
    for i in picks:
        sample = dataset[min(i, len(dataset) - 1)]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        pred = predictor.predict(rgb)
        gt = sample["depth"][0].as_subclass(torch.Tensor).numpy()
        rel_err = np.where(gt > 0, np.abs(pred["depth"] - gt) / np.maximum(gt, 1e-3), 0.0)
        err = colorize_depth(np.where(gt > 0, np.maximum(rel_err, 1e-6), 0.0), 0.0, REL_STD_PICTURE_MAX, "inferno")
        rows.append([rgb, DEPTH.colorize(pred, rgb, predictor.info),
                     DEPTH.uncertainty_picture(pred, rgb, predictor.info), err])  # fmt: skip
    titles = ["image", "depth", "depth std / depth (0..0.5)", "|error| / depth (0..0.5)"]
    return save_png(out, make_grid(rows, titles))


# ------------------------------------------------------------------------------------------------- latency
def measure_latency(size: tuple[int, int], threads: int, runs: int) -> dict[str, Any]:
    """ONNX Runtime latency of the default model with and without its uncertainty outputs, timed interleaved.

    ``extras`` graphs are what ``densemtl export`` writes (class ids, and with uncertainty the calibrated
    confidence); ``plain`` graphs are what the Predictor's ONNX Runtime backend runs (logits, depth[, depth_std]).
    """
    import tempfile

    from densemtl.config import ModelConfig
    from densemtl.deploy.benchmark import time_interleaved
    from densemtl.deploy.export import export_model
    from densemtl.deploy.ort import create_session
    from densemtl.models import build_model

    torch.set_num_threads(threads)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for unc in (False, True):
            torch.manual_seed(0)
            model = build_model(ModelConfig(tasks=("semseg", "depth", "normals"), num_classes=9, uncertainty=unc))
            for extras in (True, False):
                key = f"{'with' if unc else 'without'} uncertainty, {'extras' if extras else 'plain'}"
                path = export_model(model.eval(), Path(tmp) / f"{len(fns)}.onnx", size, class_ids=extras)
                session = create_session(path, threads)
                fns[key] = lambda s=session: s.run(None, {"image": x})
        stats = time_interleaved(fns, runs, warmup=3)
    out = {k: {"ort_ms": v["median_ms"], "ort_p90_ms": v["p90_ms"]} for k, v in stats.items()}
    for kind in ("extras", "plain"):
        base = out[f"without uncertainty, {kind}"]["ort_ms"]
        out[f"overhead_{kind}"] = out[f"with uncertainty, {kind}"]["ort_ms"] / base - 1
    return out


# -------------------------------------------------------------------------------------------------- report
def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its figure and whether it is met."""
    ev, t = result.get("evaluate", {}), {}
    for name in ("default", "laplace_nll"):
        e = ev.get(name)
        if not e or "test_after" not in e:
            continue
        after, before = e["test_after"], e["test_before"]
        t[f"{name}: AURG > 0 (abs_rel, rmse, delta1)"] = {
            "value": [after[f"depth/aurg_{m}"] for m in ("abs_rel", "rmse", "delta1")],
            "met": all(after[f"depth/aurg_{m}"] > 0 for m in ("abs_rel", "rmse", "delta1")),
        }
        ratio = after["depth/ause_rmse"] / e["random_ause"]["rmse"]
        t[f"{name}: AUSE(RMSE) <= 0.5 x random's"] = {"value": ratio, "met": ratio <= 0.5}
        t[f"{name}: ECE after temperature <= 0.02"] = {
            "value": after["semseg/ece"], "before": before["semseg/ece"], "met": after["semseg/ece"] <= 0.02,
        }  # fmt: skip
        if "l1" in ev:
            rel = e["val"]["depth/abs_rel"] / ev["l1"]["val"]["depth/abs_rel"] - 1
            t[f"{name}: AbsRel vs L1 without uncertainty <= +2 %"] = {"value": rel, "met": rel <= 0.02}
    lat = result.get("latency")
    if lat:
        for kind in ("extras", "plain"):
            v = lat[f"overhead_{kind}"]
            t[f"latency overhead ({kind} graphs) <= 5 %"] = {"value": v, "met": v <= 0.05}
    return t


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Uncertainty at the demo budget (benchmarks/uncertainty.py)", ""]
    ev = result.get("evaluate", {})
    keys = [k for k in HEADLINE if any(k in e["val"] for e in ev.values())]
    lines += ["| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, e in ev.items():
        lines.append(f"| {name} | " + " | ".join(f"{e['val'].get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", "Second half of val, calibration fitted on the first half:", ""]
    lines += ["| variant | " + " | ".join(UNCERTAINTY) + " |", "|---|" + "---:|" * len(UNCERTAINTY)]
    for name, e in ev.items():
        for when in ("test_before", "test_after"):
            if when in e:
                row = " | ".join(f"{e[when].get(k, float('nan')):.4f}" for k in UNCERTAINTY)
                lines.append(f"| {name} ({when.split('_')[1]}) | {row} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for k, v in result.get("targets", {}).items():
        val = v["value"]
        shown = ", ".join(f"{x:.4f}" for x in val) if isinstance(val, list) else f"{val:.4f}"
        lines.append(f"| {k} | {shown} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="train,evaluate,latency,report")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic", help="the demo's synthetic data")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "uncertainty")
    p.add_argument("--runs", type=int, default=30, help="latency: timed runs per model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    stages, names = args.stages.split(","), args.variants.split(",")
    result: dict[str, Any] = {}
    path = RESULTS / "uncertainty.json"
    if path.is_file():
        result = json.loads(path.read_text())
    if "train" in stages:
        result["train_seconds"] = {**result.get("train_seconds", {}), **train_variants(args.work, args.data, names)}
    if "evaluate" in stages:
        result.setdefault("evaluate", {})
        for name in names:
            result["evaluate"][name] = evaluate_variant(args.work, name, pictures=name == "default")
            print(f"evaluated {name}", flush=True)
    if "latency" in stages:
        result["latency"] = measure_latency((480, 640), 2, args.runs)
    from demo_runs import write_results

    return write_results(result, "uncertainty", "report" in stages, targets, markdown)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
