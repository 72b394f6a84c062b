"""The ``README.md`` model card of a pretrained folder: Hub front matter, tasks, classes, data, metrics, latency.

Everything comes from files that already exist: the checkpoint (config, dataset facts, its validation summary),
the run folder beside it (``eval_val/metrics.json`` from ``densemtl evaluate``, ``metrics.jsonl``) and a
``densemtl benchmark --json`` file. Task-specific text is asked of each task (``Task.outputs`` and the optional
``hub_pipeline_tag`` / ``model_card_notes``); nothing here names a task.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from densemtl.tasks import TASKS

log = logging.getLogger("densemtl")

# Model settings every card lists; a task's own settings (keys starting with "<task>_") are added per task.
KEY_MODEL_SETTINGS = ("backbone", "decoder", "decoder_channels", "sharing", "head", "head_channels", "uncertainty")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read (%s); the model card does not use it", path, e)
        return None


def read_metrics(ckpt: dict[str, Any], path: Path | None) -> tuple[dict[str, float], str]:
    """The checkpoint's evaluation summary and where it came from, best source first.

    ``eval_val/metrics.json`` beside the checkpoint (a full ``densemtl evaluate`` of the same epoch), else the
    run's ``metrics.jsonl`` line for that epoch, else the validation summary inside the checkpoint, else none.
    """
    epoch = ckpt.get("epoch")
    run = path.parent if path is not None else None
    if run is not None and (run / "eval_val" / "metrics.json").is_file():
        result = _read_json(run / "eval_val" / "metrics.json")
        if isinstance(result, dict) and isinstance(result.get("summary"), dict) and result.get("epoch") == epoch:
            where = f"{result.get('split', 'val')} split, {result.get('num_images', '?')} images"
            return result["summary"], f"`densemtl evaluate` of this checkpoint (`eval_val/metrics.json`, {where})"
    if run is not None and isinstance(epoch, int) and (run / "metrics.jsonl").is_file():
        text = (run / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
        for line in reversed(text.splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            values = {k[4:]: v for k, v in record.items() if k.startswith("val/")} if record else {}
            if record.get("epoch") == epoch + 1 and values:
                return values, f"validation after epoch {epoch + 1} during training (the run's `metrics.jsonl`)"
    if isinstance(ckpt.get("metrics"), dict) and ckpt["metrics"]:
        when = f" after epoch {epoch + 1}" if isinstance(epoch, int) else ""
        return dict(ckpt["metrics"]), f"validation{when} during training (stored in the checkpoint)"
    return {}, "not evaluated"


def benchmark_lines(path: Path) -> list[str]:
    """Markdown lines with the latencies of a ``densemtl benchmark --json`` file."""
    result = _read_json(path) if path.is_file() else None
    if not isinstance(result, dict) or not isinstance(result.get("engines"), dict):
        raise ValueError(
            f"--benchmark {path} is not a densemtl benchmark JSON (no 'engines'): write one with "
            "`densemtl benchmark --checkpoint best.pt --json FILE`"
        )
    h, w = result.get("size", ("?", "?"))
    lines = [
        f"Measured with `densemtl benchmark`: batch {result.get('batch', 1)}, {h}x{w} input, "
        f"{result.get('threads', '?')} threads on `{result.get('cpu', '?')}`, {result.get('runs', '?')} runs.",
        "",
        "| model | backend | median ms | p90 ms | FPS |",
        "|---|---|---:|---:|---:|",
    ]
    for name, s in result["engines"].items():
        cells = [_fmt(float(s[k])) if isinstance(s.get(k), int | float) else "" for k in ("median_ms", "p90_ms", "fps")]
        lines.append(f"| {s.get('model', name)} | {s.get('engine', name)} | {' | '.join(cells)} |")
    return lines


def _front_matter(meta: dict[str, Any], license: str | None) -> list[str]:
    tasks, model = meta["tasks"], meta["config"]["model"]
    tags = ["densemtl", "multi-task-learning", "dense-prediction", *tasks, model["backbone"]]
    pipeline = next((TASKS[t].hub_pipeline_tag for t in tasks if getattr(TASKS.get(t), "hub_pipeline_tag", "")), "")
    front: dict[str, Any] = {"library_name": "densemtl", "tags": tags}
    if license:
        front["license"] = license
    if pipeline:
        front["pipeline_tag"] = pipeline
    return ["---", yaml.safe_dump(front, sort_keys=False).rstrip("\n"), "---", ""]


def _classes(meta: dict[str, Any]) -> list[str]:
    if not meta["classes"]:
        return []
    lines = ["## Classes", "", "| id | name | colour |", "|---:|---|---|"]
    palette = meta["palette"] + [[0, 0, 0]] * (len(meta["classes"]) - len(meta["palette"]))
    for i, (name, rgb) in enumerate(zip(meta["classes"], palette, strict=False)):
        lines.append(f"| {i} | {name} | `#{rgb[0]:02x}{rgb[1]:02x}{rgb[2]:02x}` |")
    return [*lines, "", "Pixels labelled 255 were ignored in training and evaluation.", ""]


def _training(meta: dict[str, Any]) -> list[str]:
    cfg, dataset = meta["config"], meta["dataset"]
    data, model, loss, train = cfg["data"], cfg["model"], cfg["loss"], cfg["train"]
    phases = f", {len(train['phases'])} resolution phases" if train.get("phases") else ""
    settings = ", ".join(f"{k} `{model[k]}`" for k in KEY_MODEL_SETTINGS if k in model)
    lines = [
        "## Training data and configuration",
        "",
        f"- data: `{dataset.get('name', 'unnamed')}` (`{data['root']}`, split `{data['train_split']}`), "
        f"crop {data['crop'][0]}x{data['crop'][1]}; the network sees images scaled by {meta['input_scale']:g}",
        f"- schedule: {train['epochs']} epochs{phases}, batch {train['batch_size']}, lr {train['lr']:g}, "
        f"weight decay {train['weight_decay']:g}, seed {train['seed']}",
        f"- model: {settings}",
        f"- loss weighting: `{loss.get('weighting', 'fixed')}`, weights {loss.get('weights') or 'equal'}",
    ]
    for t in meta["tasks"]:
        own = [f"loss `{loss[t]}`"] if t in loss else []
        for section in (model, loss):
            own += [f"{k} `{v}`" for k, v in section.items() if k.startswith(f"{t}_")]
        lines.append(f"- {t}: " + (", ".join(own) or "defaults"))
    epoch = f" (checkpoint of epoch {meta['epoch'] + 1})" if isinstance(meta.get("epoch"), int) else ""
    return [*lines, "", f"The full configuration is `config` in `config.json`{epoch}.", ""]


def _evaluation(metrics: dict[str, float], source: str) -> list[str]:
    if not metrics:
        return ["## Evaluation", "", "Not evaluated: run `densemtl evaluate --checkpoint CKPT`, then save again.", ""]
    lines = ["## Evaluation", "", f"Source: {source}.", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if isinstance(v, int | float)]
    return [*lines, ""]


def _limits(meta: dict[str, Any]) -> list[str]:
    name = str(meta["dataset"].get("name", ""))
    lines = ["## Intended use and limitations", ""]
    if name.startswith("synthetic"):
        lines.append(
            "- Trained on procedurally rendered **synthetic** street scenes only (densemtl's renderer): expect a "
            "large drop on real photographs. Use it to try the library or as a starting point (`model.init_from`)."
        )
    else:
        lines.append(f"- Trained on `{name or 'one dataset'}` only: other scenes, cameras or classes are untested.")
    lines.append(
        f"- Outputs are learned at the training resolution (input scale {meta['input_scale']:g}): keep it, as "
        "`Predictor` does by default, unless you know your camera matches."
    )
    for t in meta["tasks"]:
        note = getattr(TASKS.get(t), "model_card_notes", None)
        text = note(meta["config"]) if callable(note) else ""
        lines += [f"- {text}"] if text else []
    lines.append("- Not validated for safety-critical use (driving, robotics): do not rely on it there.")
    return [*lines, ""]


def _usage(meta: dict[str, Any], onnx_note: str | None) -> list[str]:
    files = ["`config.json` (config, classes, palette, input scale)", "`model.safetensors` (weights)"]
    files += [onnx_note] if onnx_note else []
    return [
        "## How to use",
        "",
        "```python",
        "from densemtl.inference import Predictor",
        "",
        'predictor = Predictor.from_pretrained("ORG/NAME")  # a Hub id, or this folder\'s path',
        'result = predictor.predict("image.jpg")  # {output: numpy array} at the image size',
        "```",
        "",
        "Offline: `hf download ORG/NAME --local-dir DIR` on a connected machine, then "
        "`Predictor.from_pretrained(\"DIR\")`. Files: " + "; ".join(files) + ".",
        "",
    ]


def model_card(
    meta: dict[str, Any],
    metrics: dict[str, float],
    metrics_source: str,
    latency: list[str],
    license: str | None = None,
    onnx_note: str | None = None,
) -> str:
    """The card's Markdown for a pretrained folder's ``config.json`` content ``meta``."""
    model = meta["config"]["model"]
    lines = _front_matter(meta, license)
    lines += [
        f"# densemtl: {model['backbone']} + {model['decoder']} for {', '.join(meta['tasks'])}",
        "",
        "One network that predicts every task below from one RGB image, trained and saved with densemtl "
        "(`densemtl save-pretrained`).",
        "",
        "## Tasks",
        "",
        "| task | outputs of `Predictor.predict` |",
        "|---|---|",
    ]
    for t in meta["tasks"]:
        outputs = TASKS[t].outputs if t in TASKS else ()
        lines.append(f"| {t} | {', '.join(f'`{o}`' for o in outputs) or 'see the task module'} |")
    lines += ["", *_classes(meta), *_training(meta), *_evaluation(metrics, metrics_source)]
    lines += ["## Latency", "", *(latency or ["Not measured (save with `--benchmark FILE` from `densemtl benchmark "
              "--json FILE`)."]), ""]  # fmt: skip
    lines += [*_usage(meta, onnx_note), *_limits(meta)]
    return "\n".join(lines)
