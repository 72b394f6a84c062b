"""Accuracy per millisecond: every encoder x decoder/head variant, measured in one study.

Per (encoder, variant) of ``benchmarks/variants.py`` (semseg + depth, 13 classes):

* ``latency``: parameters, GFLOPs and ONNX Runtime latency at 480x640, batch 1, 2 threads, every model and
  torchvision's seg-only LR-ASPP (the reference) timed interleaved in one loop (read the ratios);
* ``fit``: the real-image capacity test of ``benchmarks/real_fit.py`` (MobileNetV2 encoder only: the one with
  ImageNet weights here), read from ``results/real_fit.json`` (run that script first, or pass ``--fit``);
* ``synthetic``: synthetic validation metrics at a fixed budget (the MTL study's ``cpu`` data and budget:
  400 train / 100 val images at 96x192, 6 epochs, batch 16), MobileNetV2 encoder from the same ImageNet weights,
  trained by the library's engine; finished run folders are reused;
* ``report``: the table, Spearman rank correlation of the synthetic and real-fit rankings, the accuracy vs
  latency plot (``results/pareto.png``) and the Pareto front.

    python benchmarks/pareto.py --stages latency,synthetic,report   # after benchmarks/real_fit.py --variants all
    python benchmarks/pareto.py --stages latency --encoders mobilenet_v3_small --variants default --runs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from variants import VARIANTS, variant_config  # noqa: E402

RESULTS = HERE / "results"
ENCODERS = ("mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2")
REFERENCE = "lraspp_mobilenet_v3_large"
IMAGENET = HERE.parent.parent / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"


# ------------------------------------------------------------------------------------------------ latency
def _export_reference(path: Path, size: tuple[int, int]) -> nn.Module:
    """torchvision's LR-ASPP (13 classes, random weights: latency does not depend on them) as ONNX at ``path``."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    from densemtl.deploy.benchmark import FirstOutput, export_plain

    ref = FirstOutput(lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=13)).eval()
    export_plain(ref, path, size)
    return ref


def measure_latency(
    encoders: list[str], names: list[str], size: tuple[int, int], threads: int, runs: int
) -> dict[str, dict[str, float]]:
    """``{"<encoder> <variant>": {params_m, gflops, ort_ms, ...}}`` plus the reference, timed interleaved."""
    from densemtl.deploy.benchmark import model_cost, time_interleaved
    from densemtl.deploy.export import export_model
    from densemtl.deploy.ort import create_session
    from densemtl.models import build_model

    torch.set_num_threads(threads)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
    fns, costs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for enc in encoders:
            for name in names:
                key = f"{enc} {name}"
                model = build_model(variant_config(name, enc, num_classes=13)).eval()
                costs[key] = model_cost(model, size)
                path = export_model(model, Path(tmp) / f"{len(fns)}.onnx", size, class_ids=False)
                session = create_session(path, threads)
                fns[key] = lambda s=session: s.run(None, {"image": x})
                print(f"exported {key}: {costs[key]['gflops']:.2f} GFLOPs", flush=True)
        ref = _export_reference(Path(tmp) / "ref.onnx", size)
        costs[REFERENCE] = model_cost(ref, size)
        session = create_session(Path(tmp) / "ref.onnx", threads)
        fns[REFERENCE] = lambda: session.run(None, {"image": x})
        stats = time_interleaved(fns, runs, warmup=3)
    ref_ms = stats[REFERENCE]["median_ms"]
    return {
        k: {
            **costs[k],
            "ort_ms": v["median_ms"],
            "ort_p90_ms": v["p90_ms"],
            "vs_lraspp": v["median_ms"] / ref_ms,
        }
        for k, v in stats.items()
    }


# --------------------------------------------------------------------------------------------- synthetic
DECODER_FIELDS = ("decoder", "decoder_channels", "decoder_taper", "crp_stages", "head", "head_channels")


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def synthetic_metrics(names: list[str], work: Path) -> dict[str, dict[str, float]]:
    """Train every variant (MobileNetV2, ImageNet weights) at the MTL study's cpu budget; val metrics."""
    from mtl_study import PRESETS, base_overrides, ensure_data

    from densemtl.config import load_config
    from densemtl.train.engine import train

    p = PRESETS["cpu"]
    root = ensure_data(p, work / "data")
    out: dict[str, dict[str, float]] = {}
    for name in names:
        run = work / "runs" / name.replace("+", "_")
        sets = base_overrides(p, root, 0, run)
        sets += [f"model.backbone_weights={IMAGENET}", "model.tasks=[semseg, depth]"]
        mc = variant_config(name, "mobilenet_v2")  # every decoder/head field explicit (the preset sets some)
        sets += [f"model.{k}={json.dumps(_plain(getattr(mc, k)))}" for k in DECODER_FIELDS]
        cfg = load_config(None, sets)
        log = run / "metrics.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        if len(records) != cfg.train.epochs:
            t0 = time.perf_counter()
            train(cfg, overwrite=True)  # an unfinished run of this variant is replaced
            print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
            records = [json.loads(line) for line in log.read_text().splitlines()]
        last = records[-1]
        out[name] = {
            k[len("val/") :]: last[k]
            for k in ("val/semseg/miou", "val/depth/abs_rel", "val/depth/delta1", "val/score")
            if k in last
        }
        out[name]["train_images_per_s"] = last.get("images_per_s", float("nan"))
    return out


# ------------------------------------------------------------------------------------------------ report
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (lower latency, higher accuracy)."""
    front = []
    for k, (ms, acc) in points.items():
        if not any(m2 <= ms and a2 >= acc and (m2, a2) != (ms, acc) for m2, a2 in points.values()):
            front.append(k)
    return sorted(front, key=lambda k: points[k][0])


def plot(result: dict[str, Any], path: Path) -> Path:
    """Real-fit mIoU and synthetic val mIoU against ONNX Runtime latency (MobileNetV2 encoder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat, fit, syn = result["latency"], result.get("fit", {}), result.get("synthetic", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, source, title in ((axes[0], fit, "real-fit mIoU (6 NYUv2 frames)"),
                              (axes[1], syn, "synthetic val mIoU (fixed budget)")):  # fmt: skip
        for name, r in source.items():
            key = f"mobilenet_v2 {name}"
            if key in lat and "semseg/miou" in r:
                ax.scatter(lat[key]["ort_ms"], r["semseg/miou"], color="tab:blue")
                ax.annotate(name, (lat[key]["ort_ms"], r["semseg/miou"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        if REFERENCE in lat:
            ax.axvline(lat[REFERENCE]["ort_ms"], color="gray", ls="--", lw=1)
            ax.text(
                lat[REFERENCE]["ort_ms"], ax.get_ylim()[0], " LR-ASPP (seg only)", fontsize=7, color="gray"
            )
        if "plain" in source and source is fit:
            ax.axhline(source["plain"]["semseg/miou"], color="tab:green", ls=":", lw=1)
            ax.text(ax.get_xlim()[0], source["plain"]["semseg/miou"], " plain loop (seg only)", fontsize=7,
                    color="tab:green", va="bottom")  # fmt: skip
        ax.set_xlabel("ONNX Runtime ms, 480x640, 2 threads, MobileNetV2 encoder")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Rank correlation, Pareto front and the Markdown table (into ``result``)."""
    fit, syn, lat = result.get("fit", {}), result.get("synthetic", {}), result["latency"]
    common = [n for n in fit if n in syn and n != "plain"]
    result["spearman_miou"] = spearman([fit[n]["semseg/miou"] for n in common],
                                       [syn[n]["semseg/miou"] for n in common])  # fmt: skip
    result["spearman_abs_rel"] = spearman([fit[n]["depth/abs_rel"] for n in common],
                                          [syn[n]["depth/abs_rel"] for n in common])  # fmt: skip
    points = {n: (lat[f"mobilenet_v2 {n}"]["ort_ms"], fit[n]["semseg/miou"])
              for n in fit if f"mobilenet_v2 {n}" in lat}  # fmt: skip
    result["pareto_front_real_fit"] = pareto_front(points)
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict[str, Any]) -> str:
    """One row per variant: cost and latency per encoder, real-fit and synthetic accuracy."""
    lat, fit, syn = result["latency"], result.get("fit", {}), result.get("synthetic", {})
    encoders = [e for e in ENCODERS if any(k.startswith(e + " ") for k in lat)]
    head = ["variant", "params M (v3-L)", "GFLOPs (v3-L)"] + [
        f"ms {e.replace('mobilenet_', '')}" for e in encoders
    ]
    head += ["x LR-ASPP (v3-L)", "real-fit mIoU", "real-fit AbsRel", "synth mIoU", "synth AbsRel"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = [n for n in VARIANTS if any(k.endswith(" " + n) for k in lat)]

    def f(v: Any, fmt: str = ".3f") -> str:
        return "" if v is None else format(v, fmt)

    for n in names:
        large = lat.get(f"mobilenet_v3_large {n}", {})
        row = [n, f(large.get("params_m"), ".2f"), f(large.get("gflops"), ".2f")]
        row += [f(lat.get(f"{e} {n}", {}).get("ort_ms"), ".1f") for e in encoders]
        row += [f(large.get("vs_lraspp"), ".2f"), f(fit.get(n, {}).get("semseg/miou")),
                f(fit.get(n, {}).get("depth/abs_rel")), f(syn.get(n, {}).get("semseg/miou")),
                f(syn.get(n, {}).get("depth/abs_rel"))]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    if (
        REFERENCE in lat
    ):  # torchvision's LR-ASPP has a MobileNetV3-Large encoder: its time sits in that column
        r = lat[REFERENCE]
        cells = [f"{r['ort_ms']:.1f}" if e == "mobilenet_v3_large" else "" for e in encoders]
        row = [
            f"{REFERENCE} (seg only)",
            f"{r['params_m']:.2f}",
            f"{r['gflops']:.2f}",
            *cells,
            "1.00",
            "",
            "",
            "",
            "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    if "plain" in fit:
        row = ["plain loop (MobileNetV2, seg only)", "", "", *("" for _ in encoders), "",
               f"{fit['plain']['semseg/miou']:.3f}", "", "", ""]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="latency,synthetic,report", help="latency,fit,synthetic,report")
    ap.add_argument("--encoders", default=",".join(ENCODERS), help="comma-separated backbones")
    ap.add_argument("--variants", default="all", help="comma-separated names of variants.py, or 'all'")
    ap.add_argument("--size", default="480x640", help="latency input HEIGHTxWIDTH")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime / torch threads")
    ap.add_argument("--runs", type=int, default=20, help="timed rounds (every model once per round)")
    ap.add_argument("--work", type=Path, default=Path("runs/pareto"), help="synthetic data and run folders")
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "pareto.json", help="JSON (merged with an existing one)"
    )
    args = ap.parse_args(argv)
    args.names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    args.stage_set = set(args.stages.split(","))
    args.size_hw = tuple(int(v) for v in args.size.lower().split("x"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["command"] = " ".join(
        ["python benchmarks/pareto.py", *(argv if argv is not None else sys.argv[1:])]
    )
    if "latency" in args.stage_set:
        result["latency_setup"] = {"size": list(args.size_hw), "threads": args.threads, "runs": args.runs,
                                   "backend": "onnxruntime", "interleaved": True}  # fmt: skip
        result["latency"] = measure_latency(args.encoders.split(","), args.names, args.size_hw, args.threads,
                                            args.runs)  # fmt: skip
    if "fit" in args.stage_set:
        import real_fit

        real_fit.main(["--variants", ",".join(args.names)])
    fit_file = RESULTS / "real_fit.json"
    if fit_file.is_file():
        result["fit"] = json.loads(fit_file.read_text())["results"]
    if "synthetic" in args.stage_set:
        result["synthetic"] = synthetic_metrics(args.names, args.work)
    if "report" in args.stage_set and "latency" in result:
        report(result)
        plot(result, args.out.with_suffix(".png"))
        args.out.with_suffix(".md").write_text(result["markdown"])
        print(result["markdown"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
