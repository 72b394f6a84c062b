"""A run's Markdown report: what was trained, how long it took, how well it does, and what it looks like.

Reads only files the run already wrote (config.yaml, metrics.jsonl, eval_val/, predictions/, preview.png), so it
can be regenerated at any time without a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _relative(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def write_report(run_dir: str | Path, eval_dir: str = "eval_val", max_panels: int = 4) -> Path:
    """Write ``<run_dir>/report.md`` and return its path."""
    from densemtl.viz.plots import plot_training_curves

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} has no config.yaml: is it a densemtl run folder (train.out_dir)?")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    records = _read_jsonl(run / "metrics.jsonl")
    m = cfg["model"]
    lines = [f"# densemtl run report: `{run}`", ""]
    lines += [
        "## Setup",
        "",
        f"- data: `{cfg['data']['root']}` (train split `{cfg['data']['train_split']}`, "
        f"eval split `{cfg['data']['val_split']}`)",
        f"- model: {m['backbone']} + {m['decoder']} ({m['sharing']} decoder), tasks {m['tasks']}, "
        f"{m['num_classes']} classes, depth head `{m['depth_param']}`",
        f"- loss: semseg `{cfg['loss']['semseg']}`, depth `{cfg['loss']['depth']}` in "
        f"`{cfg['loss']['depth_space']}` space, weights {cfg['loss']['weights']}",
    ]
    if records:
        seconds = sum(r.get("train_seconds", 0.0) for r in records)
        lines.append(
            f"- training: {len(records)} epochs, {seconds / 60:.1f} min of training steps, "
            f"last epoch {records[-1].get('images_per_s', 0):.1f} images/s"
        )
    lines.append("")
    metrics_md = run / eval_dir / "metrics.md"
    if metrics_md.is_file():
        result = json.loads((run / eval_dir / "metrics.json").read_text())
        lines += [
            f"## Evaluation ({result.get('split')} split, {result.get('num_images')} images, "
            f"checkpoint epoch {(result.get('epoch') or 0) + 1})",
            "",
            "Trivial baselines: the training set's majority class everywhere; its median depth everywhere.",
            "",
            metrics_md.read_text(),
        ]
        for name, title in (
            ("confusion.png", "Confusion matrix"),
            ("depth_error_vs_distance.png", "Depth error vs distance"),
            ("depth_histogram.png", "Depth distribution"),
        ):
            if (run / eval_dir / name).is_file():
                lines += [f"### {title}", "", f"![{title}]({eval_dir}/{name})", ""]
    if records:
        curves = plot_training_curves(
            records,
            ["loss/total", "val/semseg/miou", "val/depth/abs_rel", "val/depth/delta1"],
            run / "training_curves.png",
        )
        lines += ["## Training curves", "", f"![curves]({_relative(curves, run)})", ""]
    panels = sorted((run / "predictions").glob("*_panel.png"))[:max_panels]
    if panels:
        lines += ["## Predictions (RGB | segmentation overlay | depth)", ""]
        lines += [f"![{p.stem}]({_relative(p, run)})" for p in panels] + [""]
    if (run / "preview.png").is_file():
        lines += ["## Dataset preview (RGB | labels | depth | normals)", "", "![preview](preview.png)", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out
