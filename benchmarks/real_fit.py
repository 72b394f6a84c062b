"""Real-image capacity test: can a model fit a handful of real NYUv2 frames (semseg + depth) at all?

Nothing has to generalise: every model trains on the same real frames it is evaluated on, so the number says how
much of a real indoor scene the architecture can hold, which the synthetic scenes cannot tell (their flat colours
are easy to fit for any decoder). The frames are read from ``../shared/data`` (never copied into the repository):

* ``nyu_label13/``: 4 frames with 13-class labels (value - 1, 0 = unlabelled -> 255) and depth in millimetres;
* ``nyu_samples/``: 2 frames with 40-class labels mapped to the same 13 classes with
  ``nyuv2_meta/class13Mapping.mat``, depth in 1/5000 m.

All run at ``--scale`` (0.5: 240x320) with the ImageNet MobileNetV2 encoder from ``../shared/weights``: batches of
``--batch`` frames drawn without replacement, AdamW, one-cycle cosine LR peaking at ``--lr``, no augmentation.
Each densemtl variant trains semseg + depth together with the library's own losses (``build_loss``, fixed weights
1:1), optimiser (``build_optimizer``) and metrics; the reference is a 30-line plain PyTorch loop, trained in the
same run: MobileNetV2 features + 1x1 conv-BN-ReLU (256) + 1x1 conv, bilinear upsampling, semseg only.

    python benchmarks/real_fit.py                         # default model + reference -> results/real_fit.json
    python benchmarks/real_fit.py --variants all          # every decoder/head variant of benchmarks/variants.py
    python benchmarks/real_fit.py --steps 5 --frames 2    # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from densemtl.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from densemtl.datasets.nyuv2 import load_mapping13
from densemtl.metrics import build_metrics, summarize
from densemtl.models import build_model
from densemtl.train.engine import build_optimizer
from densemtl.train.losses import build_loss

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from variants import VARIANTS, variant_config  # noqa: E402

SHARED = HERE.parent.parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
RESULTS = HERE / "results" / "real_fit.json"
NUM_CLASSES = 13
INFO = {"name": "nyu-real-frames", "classes": [f"c{i}" for i in range(NUM_CLASSES)], "ignore_index": 255}


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the real frames live in ../shared/data beside the checkout"
        )
    with Image.open(path) as img:
        return np.asarray(img)


def _sample(rgb: np.ndarray, label: np.ndarray, depth_m: np.ndarray, size: tuple[int, int]) -> dict:
    """Resize to ``size`` (H, W): RGB bilinear (antialiased), labels and depth nearest (0 m = invalid)."""
    h, w = size
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()[None] / 255.0
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    lab = Image.fromarray(label).resize((w, h), Image.NEAREST)
    dep = Image.fromarray(depth_m.astype(np.float32)).resize((w, h), Image.NEAREST)
    return {
        "image": image.clamp(0, 1),
        "semseg": torch.from_numpy(np.asarray(lab).astype(np.int64)),
        "depth": torch.from_numpy(np.asarray(dep, dtype=np.float32).copy())[None],
    }


def load_frames(scale: float = 0.5, data: Path = DATA) -> list[dict]:
    """The six real frames with 13-class labels (255 = ignore) and metric depth (0 = invalid), at ``scale``."""
    size = (round(480 * scale), round(640 * scale))
    frames = []
    for rgb_path in sorted((data / "nyu_label13" / "rgb").glob("*.png")):
        label = _read(data / "nyu_label13" / "label13" / rgb_path.name).astype(np.int64) - 1
        label[label < 0] = 255
        depth = _read(data / "nyu_label13" / "depth_mm" / rgb_path.name).astype(np.float32) / 1000.0
        frames.append(_sample(_read(rgb_path)[..., :3], label.astype(np.uint8), depth, size))
    lut13, _ = load_mapping13(data / "nyuv2_meta" / "class13Mapping.mat")
    for rgb_path in sorted((data / "nyu_samples").glob("[0-9]*.png")):
        label = lut13[_read(data / "nyu_samples" / f"segm_gt_{rgb_path.name}")]
        depth = _read(data / "nyu_samples" / f"depth_gt_{rgb_path.name}").astype(np.float32) / 5000.0
        frames.append(_sample(_read(rgb_path)[..., :3], label, depth, size))
    if not frames:
        raise FileNotFoundError(f"no real frames under {data}: ../shared/data must sit beside the checkout")
    return frames


def batches(frames: list[dict], steps: int, batch: int, seed: int):
    """``steps`` collated batches of ``batch`` distinct frames (a fixed random order per seed)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(frames), generator=g)[: min(batch, len(frames))].tolist()
        yield {k: torch.stack([frames[i][k] for i in idx]) for k in frames[0]}


def fit_config(model: ModelConfig, lr: float) -> Config:
    """The run's Config: NYU depth range for the metrics, library default losses with fixed weights."""
    return Config(
        data=DataConfig(eval_depth_min=1e-3, eval_depth_max=10.0),
        model=model,
        loss=LossConfig(),
        train=TrainConfig(lr=lr, weight_decay=1e-4),
    )


def _one_cycle(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    max_lr = [g["lr"] for g in opt.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, anneal_strategy="cos")


def train_densemtl(
    cfg: Config, frames: list[dict], steps: int, batch: int, seed: int
) -> tuple[nn.Module, float]:
    """Train a densemtl model on ``frames`` with the library's loss and optimiser; returns it and images/s."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).train()  # loads model.backbone_weights
    loss_fn = build_loss(cfg)
    opt = build_optimizer(model, loss_fn, cfg)
    sched = _one_cycle(opt, steps)
    t0, seen = time.perf_counter(), 0
    for b in batches(frames, steps, batch, seed):
        losses = loss_fn(model(b["image"]), b)
        opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        opt.step()
        sched.step()
        seen += b["image"].shape[0]
    return model, seen / (time.perf_counter() - t0)


class PlainSeg(nn.Module):
    """The reference: MobileNetV2 features, 1x1 conv-BN-ReLU, 1x1 conv, bilinear up (semseg only)."""

    def __init__(self, num_classes: int, weights: Path = WEIGHTS):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=False)
        self.features = net.features
        self.head = nn.Sequential(
            nn.Conv2d(1280, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )  # fmt: skip
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.features((x - self.mean) / self.std))
        return {"semseg": F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def train_plain(frames: list[dict], steps: int, batch: int, lr: float, seed: int) -> tuple[nn.Module, float]:
    """The plain loop: cross-entropy (ignore 255), AdamW, the same one-cycle schedule and batches."""
    torch.manual_seed(seed)
    model = PlainSeg(NUM_CLASSES).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = _one_cycle(opt, steps)
    t0, seen = time.perf_counter(), 0
    for b in batches(frames, steps, batch, seed):
        loss = F.cross_entropy(model(b["image"])["semseg"], b["semseg"], ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        seen += b["image"].shape[0]
    return model, seen / (time.perf_counter() - t0)


@torch.no_grad()
def evaluate_fit(model: nn.Module, frames: list[dict], tasks: tuple[str, ...]) -> dict[str, float]:
    """Dataset-level metrics (the library's accumulators) on the training frames, model in eval mode."""
    cfg = fit_config(ModelConfig(tasks=tasks, num_classes=NUM_CLASSES), 1e-3)
    metrics = build_metrics(cfg, INFO)
    model.eval()
    for f in frames:
        b = {k: v[None] for k, v in f.items()}
        metrics.update(model(b["image"]), b)
    return summarize(metrics.compute())


def run_variant(name: str, frames: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate one variant (``"plain"`` = the reference loop); its metrics and training speed."""
    t0 = time.perf_counter()
    if name == "plain":
        model, ips = train_plain(frames, args.steps, args.batch, args.lr, args.seed)
        tasks: tuple[str, ...] = ("semseg",)
    else:
        mc = variant_config(name, "mobilenet_v2", num_classes=NUM_CLASSES, backbone_weights=str(args.weights))
        model, ips = train_densemtl(fit_config(mc, args.lr), frames, args.steps, args.batch, args.seed)
        tasks = mc.tasks
    m = evaluate_fit(model, frames, tasks)
    keep = ("semseg/miou", "semseg/pixel_acc", "depth/abs_rel", "depth/rmse", "depth/delta1")
    out = {k: m[k] for k in keep if k in m}
    out.update(train_images_per_s=ips, seconds=time.perf_counter() - t0)
    print(f"{name:>22}: " + "  ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="default", help="comma-separated names of variants.py, or 'all'")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per model")
    ap.add_argument("--batch", type=int, default=4, help="frames per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="one-cycle peak learning rate")
    ap.add_argument("--scale", type=float, default=0.5, help="frames are 480x640 times this")
    ap.add_argument("--frames", type=int, default=0, help="use the first N frames (0 = all six)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="ImageNet MobileNetV2 state dict")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON written here")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)} or 'all'")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the reference and every variant in one run; the JSON is rewritten after each model."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    frames = load_frames(args.scale)
    frames = frames[: args.frames] if args.frames else frames
    out: dict[str, Any] = {
        "command": " ".join(["python benchmarks/real_fit.py", *(argv if argv is not None else sys.argv[1:])]),
        "frames": len(frames),
        "size": list(frames[0]["image"].shape[-2:]),
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "torch": torch.__version__,
        "complete": False,
        "results": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in ["plain", *args.names]:
        r = out["results"][name] = run_variant(name, frames, args)
        ref = out["results"]["plain"]["semseg/miou"]
        r["miou_vs_plain"] = r["semseg/miou"] / ref if ref > 0 else float("nan")
        out["complete"] = name == args.names[-1] if args.names else True
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
