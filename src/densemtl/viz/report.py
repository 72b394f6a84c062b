"""A run's Markdown report: what was trained, how long it took, how well it does, and what it looks like.

Reads only files the run already wrote (config.yaml, metrics.jsonl, eval_val/, predictions/, preview.png), so
it can be regenerated at any time without a model. Every task-specific part (settings, baselines, evaluation
pictures, training curves) loops over the run's tasks (``model.tasks``) and asks each :class:`Task`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from densemtl.fileio import atomic_write_text
from densemtl.tasks import TASKS, Task


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _relative(path: Path, base: Path) -> str:
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _known(tasks: list[str]) -> list[Task]:
    """The run's tasks that this process knows (a plug-in task must be registered to be described)."""
    return [TASKS[t] for t in tasks if t in TASKS]


def _setup(cfg: dict[str, Any], tasks: list[Task]) -> list[str]:
    """The Setup section: data, model, loss combination, then one line per task with its own settings."""
    m, loss = cfg["model"], cfg["loss"]
    classes = f", {m['num_classes']} classes" if any(t.uses_classes for t in tasks) else ""
    lines = [
        "## Setup",
        "",
        f"- data: `{cfg['data']['root']}` (train split `{cfg['data']['train_split']}`, "
        f"eval split `{cfg['data']['val_split']}`)",
        f"- model: {m['backbone']} + {m['decoder']} ({m['sharing']} decoder), tasks {m['tasks']}{classes}",
        f"- loss: weighting `{loss.get('weighting', 'fixed')}`, weights {loss.get('weights', {})}",
    ]
    for t in tasks:
        # a task's settings are the keys named after it: loss.<task>, model/loss <task>_* (e.g. depth_space)
        own = [f"loss `{loss[t.name]}`"] if t.name in loss else []
        for section in (m, loss):
            own += [f"{k} `{v}`" for k, v in section.items() if k.startswith(f"{t.name}_")]
        lines.append(f"- {t.name}: " + (", ".join(own) or "defaults"))
    return lines


def _evaluation(run: Path, eval_dir: str, tasks: list[Task], info: dict) -> list[str]:
    """The Evaluation section (metrics table, baselines, pictures); [] when the run was not evaluated."""
    metrics_md = run / eval_dir / "metrics.md"
    if not metrics_md.is_file():
        return []
    result = json.loads((run / eval_dir / "metrics.json").read_text())
    baselines = "; ".join(f"{t.name}: {t.baseline_text()}" for t in tasks if t.baseline_text())
    lines = [
        f"## Evaluation ({result.get('split')} split, {result.get('num_images')} images, "
        f"checkpoint epoch {(result.get('epoch') or 0) + 1})",
        "",
        f"Trivial baselines, fitted on the training set: {baselines}.",
        "",
        metrics_md.read_text(),
    ]
    for title, name in result.get("plots", {}).items():  # written by evaluation.write_outputs
        if (run / eval_dir / name).is_file():
            lines += [f"### {title}", "", f"![{title}]({eval_dir}/{name})", ""]
    return lines


def _dataset_info(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's dataset.json (class names for the pictures), or {} when the data has moved."""
    path = Path(cfg["data"]["root"]) / "dataset.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(run_dir: str | Path, eval_dir: str = "eval_val", max_panels: int = 4) -> Path:
    """Write ``<run_dir>/report.md`` and return its path."""
    from densemtl.viz.plots import plot_training_curves

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} has no config.yaml: is it a densemtl run folder (train.out_dir)?")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    tasks = _known(list(cfg["model"]["tasks"]))
    records = _read_jsonl(run / "metrics.jsonl")
    lines = [f"# densemtl run report: `{run}`", "", *_setup(cfg, tasks)]
    if records:
        seconds = sum(r.get("train_seconds", 0.0) for r in records)
        lines.append(
            f"- training: {len(records)} epochs, {seconds / 60:.1f} min of training steps, "
            f"last epoch {records[-1].get('images_per_s', 0):.1f} images/s"
        )
    lines.append("")
    lines += _evaluation(run, eval_dir, tasks, _dataset_info(cfg))
    if records:
        keys = ["loss/total", *(f"val/{t.name}/{t.headline}" for t in tasks)]
        curves = plot_training_curves(records, keys, run / "training_curves.png")
        lines += ["## Training curves", "", f"![curves]({_relative(curves, run)})", ""]
    panels = sorted((run / "predictions").glob("*_panel.png"))[:max_panels]
    if panels:
        lines += [f"## Predictions (RGB | {' | '.join(t.name for t in tasks)})", ""]
        lines += [f"![{p.stem}]({_relative(p, run)})" for p in panels] + [""]
    if (run / "preview.png").is_file():
        lines += ["## Dataset preview (RGB, then each task's target)", "", "![preview](preview.png)", ""]
    out = run / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
