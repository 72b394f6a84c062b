"""Writing the synthetic dataset: ``generate_dataset`` renders samples in worker processes into the densemtl
folder format (images, labels, depth, normals, meta, and the objects files: ``instances/`` and ``objects/``).

Sample ``i`` of split ``s`` is a pure function of (seed, s, i) (``render.render_sample``), so the files are
the same for any number of workers.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.clear import prepare_dataset_folder
from densemtl.data.folder import write_sample
from densemtl.data.format import write_dataset_json
from densemtl.data.objects import (
    INSTANCES_DIR,
    OBJECT_CLASSES_KEY,
    OBJECTS_DIR,
    instances_png_bytes,
    write_objects,
)
from densemtl.data.progress import track
from densemtl.fileio import atomic_write
from densemtl.synth.objects import OBJECT_CLASSES
from densemtl.synth.render import DEPTH_MAX, render_sample
from densemtl.synth.scene import CLASSES, PALETTE


def write_rendered(root: Path, split: str, index: int, s: dict[str, Any], image_format: str = "jpg") -> None:
    """Write one rendered sample ``s`` (``render.render``'s dict) as sample ``index`` of ``split``: the objects
    files, then labels, depth, normals, meta and the image (a sample exists once its image does). No fsync per
    file: the dataset.json written last syncs them all."""
    base, name = root / split, f"{index:06d}"
    size = s["semseg"].shape[:2]
    write_objects(base / OBJECTS_DIR / f"{name}.json", s["objects"], size=size, object_classes=OBJECT_CLASSES,
                  fsync=False)  # fmt: skip
    atomic_write(base / INSTANCES_DIR / f"{name}.png", instances_png_bytes(s["instances"]), fsync=False)
    write_sample(root, split, name, s["image"], s["meta"], semseg=s["semseg"], depth=s["depth"],
                 normals=s["normals"], image_format=image_format, fsync=False)  # fmt: skip


def _write_one(job: tuple[Path, int, str, int, tuple[int, int], str]) -> np.ndarray:
    """Worker: render and write one sample; returns its label histogram (256,)."""
    root, seed, split, index, size, image_format = job
    s = render_sample(seed, split, index, size)
    write_rendered(root, split, index, s, image_format)
    return np.bincount(s["semseg"].ravel(), minlength=256)


# Workers: one BLAS/OpenMP thread each (workers = cores, no oversubscription), and glibc malloc kept from
# returning every large temporary array to the OS (re-faulting its pages for each image costs ~20%).
_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 64 << 20, "MALLOC_TRIM_THRESHOLD_": 256 << 20}
_MALLOPT = {"MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_TRIM_THRESHOLD_": -1}  # glibc's M_MMAP_/M_TRIM_THRESHOLD
_WORKER_ENV = {
    **dict.fromkeys(
        ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1"
    ),
    **{k: str(v) for k, v in _MALLOC.items()},
}


def _tune_forked_worker() -> None:
    """Pool initializer for forked workers: the malloc settings of ``_WORKER_ENV``, through ``mallopt``.

    A forked worker does not read the environment again. Its thread settings do not matter: the renderer's
    only BLAS calls are 3x3 products, which BLAS runs in the calling thread; only malloc needs setting.
    """
    try:
        libc = ctypes.CDLL(None)
        for name, value in _MALLOC.items():
            libc.mallopt(_MALLOPT[name], value)
    except (OSError, AttributeError):  # not glibc: default malloc, ~20% slower
        pass


def _pool(workers: int) -> Any:
    """A process pool of ``workers``: forked on Linux, spawned elsewhere.

    Forked workers start at once: a spawned one re-imports densemtl (torch and torchvision with it, ~7 s on
    2 cores), which was a tenth of a 2400-image run. The workers use numpy, Pillow and OpenCV only, never torch
    (whose threads and CUDA state do not survive a fork), the same as PyTorch's own DataLoader workers.
    """
    if sys.platform == "linux":
        return get_context("fork").Pool(workers, initializer=_tune_forked_worker)
    return get_context("spawn").Pool(workers)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def generate_dataset(
    out: str | Path,
    n_train: int = 2000,
    n_val: int = 400,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    workers: int = 0,
    progress: bool = True,
    image_format: str = "jpg",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render ``n_train`` + ``n_val`` samples into ``out`` (densemtl folder format) and return stats.

    ``workers`` = 0 uses one process per CPU core, 1 renders in this process. The output does not depend on
    ``workers``. RGB is written as ``image_format`` ("jpg" quality 95 by default: fast and small; "png" for
    lossless); labels, depth and normals are always lossless PNG. ``out`` must be absent or empty; with
    ``overwrite`` an existing dataset there is deleted first (only its own files, see
    ``densemtl.data.clear.prepare_dataset_folder``). dataset.json is written last, so a folder with a
    dataset.json is complete. The returned dict (JSON-serialisable) holds counts, seconds, images/s and class
    pixel shares.
    """
    root = Path(out)
    h, w = (int(v) for v in size)
    splits = {"train": int(n_train), "val": int(n_val)}
    workers = _cpu_count() if workers <= 0 else int(workers)
    generator = {
        "seed": int(seed),
        "size": [h, w],
        "counts": splits,
        "renderer": "densemtl.synth.render (exact ray casting)",
        "world_frame": "x right, y up, z forward along the road, ground plane y = 0, metres",
        "camera_frame": "OpenCV: x right, y down, z forward; depth = z coordinate in metres, 0 = sky/invalid",
        "normals": "unit vectors in the camera frame, (0, 0, 0) for sky",
        "image_format": image_format,
        "labels": "traffic-sign panels and lamp arms are labelled pole; no pixel is 255",
        "objects": "every car and person: instances/<id>.png ids, objects/<id>.json boxes (densemtl.synth.objects)",
    }
    prepare_dataset_folder(
        root, overwrite
    )  # also: no old dataset.json, so an interrupted run looks incomplete
    jobs = [
        (root, int(seed), split, i, (h, w), image_format) for split, n in splits.items() for i in range(n)
    ]
    hist = np.zeros(256, dtype=np.int64)
    start = time.perf_counter()
    if workers == 1 or len(jobs) <= 1:
        for job in track(jobs, "synth", enabled=progress, unit="img"):
            hist += _write_one(job)
    else:
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)  # inherited by spawned workers
        try:
            with _pool(min(workers, len(jobs))) as pool:
                chunk = max(1, min(2, len(jobs) // (4 * workers)))  # small: the last chunk leaves cores idle
                done = pool.imap_unordered(_write_one, jobs, chunksize=chunk)
                for hh in track(done, "synth", total=len(jobs), enabled=progress, unit="img"):
                    hist += hh
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    write_dataset_json(
        root,
        name="synthetic-streets",
        tasks=["semseg", "depth", "normals"],
        classes=list(CLASSES),
        palette=[list(c) for c in PALETTE],
        splits=list(splits),
        depth_max=DEPTH_MAX,
        extra={OBJECT_CLASSES_KEY: list(OBJECT_CLASSES), "generator": generator},
    )
    seconds = time.perf_counter() - start
    total = max(int(hist.sum()), 1)
    return {
        "out": str(root),
        "images": len(jobs),
        "splits": splits,
        "size": [h, w],
        "seed": int(seed),
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(jobs) / max(seconds, 1e-9), 3),
        "class_pixel_share": {name: round(float(hist[i]) / total, 5) for i, name in enumerate(CLASSES)},
    }
