"""Training runs at the demo budget for the benchmarks: configs/synthetic.yaml (or a variant's own config) plus
each variant's overrides."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _signature(cfg) -> tuple:
    """What makes two demo runs the same experiment (the run folder and resolved class names aside)."""
    from dataclasses import replace

    m, tr = cfg.model, cfg.train
    loss = replace(cfg.loss, weights={t: float(cfg.loss.weights.get(t, 1.0)) for t in m.tasks})  # 1 = unset
    if "objects" not in m.tasks:  # the objects loss's own settings mean nothing to a model without the head
        loss = replace(loss, objects_terms={}, objects_class_balance=0.0)
    start = (m.pretrained, Path(m.backbone_weights).name)  # where the backbone starts (a file by name: any copy)
    return (m.tasks, m.backbone, m.decoder, m.objects_trunks, start, loss, tr.phases, tr.encoder_lr_mult, tr.seed)


def train_demo_runs(
    work: Path, data: Path, variants: dict[str, list[str]], configs: dict[str, Path] | None = None
) -> dict[str, float]:
    """Train each variant (``{name: --set overrides}``) into ``work/<name>``, the demo's config (or
    ``configs[name]``), seed and budget; a finished run (best.pt, every epoch logged, the same model, loss and
    schedule in its config.yaml) is reused. Returns each run's training seconds as its metrics.jsonl logs them
    (every epoch's training, its validation excluded), reused runs included."""
    from densemtl.config import load_config
    from densemtl.train.engine import train

    seconds: dict[str, float] = {}
    for name, sets in variants.items():
        run = work / name
        path = (configs or {}).get(name, ROOT / "configs" / "synthetic.yaml")
        cfg = load_config(path, [*sets, f"data.root={data}", f"train.out_dir={run}"])
        done = logged_epochs(run) if (run / "metrics.jsonl").is_file() else 0
        same = (run / "config.yaml").is_file() and _signature(load_config(run / "config.yaml")) == _signature(cfg)
        if not ((run / "best.pt").is_file() and done == sum(p.epochs for p in cfg.train.phases) and same):
            t0 = time.perf_counter()
            train(cfg, overwrite=True)
            print(f"trained {name} in {time.perf_counter() - t0:.0f} s (validation included)", flush=True)
        seconds[name] = logged_train_seconds(run)
    return seconds


def logged_epochs(run: Path) -> int:
    """How many epochs a run trained: its metrics.jsonl's records, one per epoch."""
    return len([line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()])


def logged_train_seconds(run: Path) -> float:
    """The training seconds a run's metrics.jsonl records, summed over its epochs (validation excluded)."""
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return sum(float(json.loads(line).get("train_seconds", 0.0)) for line in lines if line.strip())


def write_results(result: dict, name: str, report: bool, targets, markdown) -> dict:
    """With ``report``, add ``targets(result)`` and write ``results/<name>.md``; always write
    ``results/<name>.json``; print the targets."""
    import json

    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    if report:
        result["targets"] = targets(result)
        (results / f"{name}.md").write_text(markdown(result))
    (results / f"{name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps(result.get("targets", {}), indent=2))
    return result
