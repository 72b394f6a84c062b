"""Training runs at the demo budget for the benchmarks: configs/synthetic.yaml plus each variant's overrides."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_demo_runs(work: Path, data: Path, variants: dict[str, list[str]]) -> dict[str, float]:
    """Train each variant (``{name: --set overrides}``) into ``work/<name>``, the demo's config, seed and budget;
    finished runs (best.pt and every epoch logged) are reused. Returns the seconds each trained run took."""
    from densemtl.config import load_config
    from densemtl.train.engine import train

    seconds: dict[str, float] = {}
    for name, sets in variants.items():
        run = work / name
        cfg = load_config(ROOT / "configs" / "synthetic.yaml", [*sets, f"data.root={data}", f"train.out_dir={run}"])
        log = run / "metrics.jsonl"
        done = len(log.read_text().splitlines()) if log.is_file() else 0
        if (run / "best.pt").is_file() and done == sum(p.epochs for p in cfg.train.phases):
            continue
        t0 = time.perf_counter()
        train(cfg, overwrite=True)
        seconds[name] = time.perf_counter() - t0
        print(f"trained {name} in {seconds[name]:.0f} s", flush=True)
    return seconds
