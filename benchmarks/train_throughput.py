"""Training throughput (images/s): densemtl's engine against a bare PyTorch loop, same model, data and batch.

The data are the six real NYUv2 frames of ``benchmarks/real_fit.py`` at 240x320, repeated to ``--copies`` samples
per frame and written as a folder-format dataset in a temporary folder. The bare loop trains on batches already
in memory (no loader, no augmentation, no checks); the engine (``densemtl.train.engine.train``) reads the folder
through its loaders with augmentation off, in the configurations users choose between: ``channels_last`` on/off
and 0 or 2 loader workers. AMP only acts on CUDA (on CPU ``train.amp`` is a no-op), so it is not varied here.
Each configuration trains the same number of steps; the engine's images/s are its own ``metrics.jsonl``
figures (training time only, evaluation excluded), the first epoch dropped as warm-up.

    python benchmarks/train_throughput.py [--epochs 3] [--copies 8] [--batch 4]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_fit  # noqa: E402

RESULTS = HERE / "results" / "train_throughput.json"
ENGINE_SETUPS = {
    "engine, channels_last, 2 workers": ["train.channels_last=true", "data.num_workers=2"],
    "engine, channels_last, 0 workers": ["train.channels_last=true", "data.num_workers=0"],
    "engine, NCHW, 2 workers": ["train.channels_last=false", "data.num_workers=2"],
}


def write_frames(root: Path, frames: list[dict], copies: int) -> Path:
    """The frames as a folder-format dataset: ``copies`` samples per frame in train, one each in val."""
    from densemtl.data.folder import write_sample
    from densemtl.data.format import write_dataset_json

    classes = [f"c{i}" for i in range(real_fit.NUM_CLASSES)]
    write_dataset_json(root, name="nyu-real-frames", tasks=["semseg", "depth"], classes=classes,
                       palette=[[i * 19 % 256, i * 53 % 256, i * 97 % 256] for i in range(len(classes))],
                       splits=["train", "val"], depth_max=10.0)  # fmt: skip
    for i, f in enumerate(frames):
        rgb = (f["image"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        arrays = {"semseg": f["semseg"].numpy().astype("uint8"), "depth": f["depth"][0].numpy()}
        for c in range(copies):
            write_sample(root, "train", f"f{i}_{c}", rgb, **arrays)
        write_sample(root, "val", f"f{i}", rgb, **arrays)
    return root


def engine_overrides(root: Path, out: Path, size: list[int], batch: int, epochs: int) -> list[str]:
    """Augmentation off (a fixed full-frame crop, no zoom, flip or jitter), one phase, the real-fit model."""
    mc = real_fit.variant_config("default", "mobilenet_v2", num_classes=real_fit.NUM_CLASSES)
    return [
        f"data.root={root}", f"data.crop=[{size[0]}, {size[1]}]", "data.scale_range=[1.0, 1.0]",
        "data.hflip=false", "data.color_jitter=0.0", "data.eval_depth_max=10.0",
        f"model.backbone={mc.backbone}", f"model.backbone_weights={real_fit.WEIGHTS}",
        f"train.epochs={epochs}", f"train.batch_size={batch}", "train.lr=1e-3", "train.device=cpu",
        f"train.out_dir={out}", "train.log_every=1000",
    ]  # fmt: skip


def run_engine(sets: list[str]) -> float:
    """Mean training images/s of the epochs after the first."""
    from densemtl.config import load_config
    from densemtl.train.engine import train

    cfg = load_config(None, sets)
    train(cfg)
    records = [
        json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["images_per_s"] for r in records[1:]] or [records[0]["images_per_s"]]
    return sum(rates) / len(rates)


def run_plain(frames: list[dict], steps: int, batch: int) -> float:
    """The bare loop's images/s on the same model (``real_fit.train_densemtl``), after a 2-step warm-up."""
    cfg = real_fit.fit_config(
        real_fit.variant_config("default", "mobilenet_v2", num_classes=real_fit.NUM_CLASSES,
                                backbone_weights=str(real_fit.WEIGHTS)), 1e-3)  # fmt: skip
    real_fit.train_densemtl(cfg, frames, 2, batch, 0)
    return real_fit.train_densemtl(cfg, frames, steps, batch, 0)[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="engine epochs per setup (the first is warm-up)")
    ap.add_argument("--copies", type=int, default=8, help="training samples per real frame")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.5, help="frames are 480x640 times this")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    frames = real_fit.load_frames(args.scale)
    size = list(frames[0]["image"].shape[-2:])
    steps = (len(frames) * args.copies // args.batch) * (args.epochs - 1)
    result: dict[str, Any] = {"command": " ".join(["python benchmarks/train_throughput.py", *(argv or [])]),
                              "size": size, "batch": args.batch, "threads": args.threads, "images_per_s": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        root = write_frames(Path(tmp) / "data", frames, args.copies)
        t0 = time.perf_counter()
        result["images_per_s"]["bare loop (batches in memory)"] = run_plain(frames, steps, args.batch)
        for i, (name, extra) in enumerate(ENGINE_SETUPS.items()):
            sets = engine_overrides(root, Path(tmp) / f"run{i}", size, args.batch, args.epochs) + extra
            result["images_per_s"][name] = run_engine(sets)
            print(f"{name}: {result['images_per_s'][name]:.2f} img/s", flush=True)
        result["seconds"] = time.perf_counter() - t0
    bare = result["images_per_s"]["bare loop (batches in memory)"]
    result["ratio_to_bare_loop"] = {k: v / bare for k, v in result["images_per_s"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["images_per_s"], indent=2))
    return result


if __name__ == "__main__":
    main()
