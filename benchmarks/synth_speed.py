"""Speed of the synthetic street renderer: images/s of ``generate_dataset`` with worker processes.

Also records what a regression would be located with, in CPU time (``time.process_time``), which a shared
machine disturbs far less than wall time: the workers' CPU ms per image and how busy they kept their cores; one
process's stages (scene sampling, ray casting + shading, file writing) with the workers' malloc settings
(``densemtl.synth.generate._tune_forked_worker``); and the start-up of a fresh process up to the first sample
(importing ``densemtl.synth.generate``, torch with it). The 1-minute load average before and after is recorded
with the result.

    .venv/bin/python benchmarks/synth_speed.py --n 64 --size 256x512 --workers 0
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from densemtl.synth.generate import _cpu_count, _tune_forked_worker, generate_dataset, write_rendered
from densemtl.synth.render import render, sample_camera, sample_rng
from densemtl.synth.streets import sample_scene


def stage_times(n: int, size: tuple[int, int], out: Path) -> dict[str, float]:
    """CPU milliseconds per image for each stage, in this process, with the workers' malloc settings."""
    _tune_forked_worker()
    total = {"scene_ms": 0.0, "render_ms": 0.0, "write_ms": 0.0}
    for i in range(n):
        t0 = time.process_time()
        rng = sample_rng(123, "bench", i)
        scene = sample_scene(rng)
        t1 = time.process_time()
        s = render(scene, sample_camera(rng, scene, size), size, noise_rng=rng)
        t2 = time.process_time()
        write_rendered(out, "bench", i, s)  # what a generator worker writes, objects files included
        t3 = time.process_time()
        total["scene_ms"] += (t1 - t0) * 1e3
        total["render_ms"] += (t2 - t1) * 1e3
        total["write_ms"] += (t3 - t2) * 1e3
    return {k: round(v / n, 2) for k, v in total.items()}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def startup() -> dict[str, float]:
    """Wall and CPU seconds of a fresh interpreter importing the generator: what ``densemtl data synth`` pays
    before its workers start."""
    cpu, t0 = _children_cpu_s(), time.perf_counter()
    subprocess.run([sys.executable, "-c", "import densemtl.synth.generate"], check=True)
    return {"wall_s": round(time.perf_counter() - t0, 3), "cpu_s": round(_children_cpu_s() - cpu, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images to generate (train split)")
    ap.add_argument("--size", default="256x512")
    ap.add_argument("--workers", type=int, default=0, help="0 = one per CPU core")
    ap.add_argument("--stages", type=int, default=48, help="images for the single-process stage timing")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/synth_speed.json"))
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    load_before = os.getloadavg()[0]
    start = startup()
    with tempfile.TemporaryDirectory() as tmp:
        cpu = _children_cpu_s()
        stats = generate_dataset(tmp, n_train=args.n, n_val=0, size=size, seed=0, workers=args.workers)
        cpu = _children_cpu_s() - cpu  # the pool's workers, reaped when it closed
        stages = stage_times(args.stages, size, Path(tmp))
    result = {
        "images_per_s": stats["images_per_s"],
        "images": stats["images"],
        "seconds": stats["seconds"],
        "size": list(size),
        "workers": stats["workers"],
        "cores": _cpu_count(),
        "worker_cpu_ms_per_image": round(cpu / stats["images"] * 1e3, 2),
        "worker_core_utilisation": round(cpu / (stats["seconds"] * stats["workers"]), 3),
        "single_process_cpu_ms_per_image": stages,
        "startup": start,
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
