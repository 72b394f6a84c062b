"""Why the objects demo finds no people (issue #15's person AP50 target): docs/objects.md, "People".

Stages (``--stages``, each on the demo's synthetic data at the model's 1/2 input scale):

* ``heat``: a trained model's heatmap score at each scored object's own centre cell (the score a peak there would
  decode to) on validation images, per class: whether the head sees the object at all;
* ``seen``: that model's AP50 per class on training images with people and on validation images with people:
  both near 0 is under-fitting (the head never learned people), a high training AP over-fitting;
* ``overfit``: the objects head alone, from scratch, on 16 training scenes with people, ``OVERFIT_STEPS`` steps
  without augmentation: AP50 per class on those scenes. High means the head, its targets, decoding and metrics
  can learn people; what the demo lacks is then data or training, not the pipeline.
* ``widths``: the box a trained model regresses at each scored object's own centre cell (what a peak there
  decodes to) on validation images, against the true box: median predicted / true width and height per class,
  for objects under ``SMALL_PX`` pixels high at the network input and the rest (kept per checkpoint);
* ``backbone``: the objects head alone on the whole training split, 3 epochs at 1/2 scale, on MobileNetV2 from
  scratch and from ImageNet (``SHARED_WEIGHTS``), everything else the same: AP50 per class after each epoch.
  Whether people need features that a few epochs from scratch cannot grow (runs under ``--work``, reused).

    python benchmarks/objects_people.py --checkpoint runs/objects_bench/objects/best.pt   # about 4 minutes
    python benchmarks/objects_people.py --stages backbone                                # about 9 minutes
    python benchmarks/objects_people.py --stages widths --checkpoint runs/objects_bench/objects/best.pt  # 1 minute

Writes results/objects_people.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PERSON = 1  # the synthetic data's object classes: car, person
SCENES = 16  # scenes with people in the overfit
SEEN = 48  # images with people per split in ``seen``
OVERFIT_STEPS = 200
HEAT_IMAGES = 150
SMALL_PX = 16  # ``widths``: objects under this many pixels high at the network input are "small"


def scored_people(rows: torch.Tensor, height: int) -> torch.Tensor:
    """(N,) bool: the packed rows that are scored people in an image ``height`` pixels high."""
    from densemtl.tasks.objects_codec import COL, scored

    return scored(rows, height) & (rows[:, COL["class"]] == PERSON)


def resized_split(data: Path, split: str, scale: float):
    """``split``'s objects samples resized by ``scale``, as evaluation resizes them."""
    from densemtl.data.folder import FolderDataset
    from densemtl.data.transforms import build_transforms

    return FolderDataset(data, split, tasks=("objects",), transform=build_transforms(False, None, base_scale=scale))


def samples_with_people(data: Path, split: str, scale: float, n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``split`` with a scored person, resized by ``scale`` (the evaluation's resize)."""
    from densemtl.tasks.objects import OBJECTS

    ds = resized_split(data, split, scale)
    out = []
    for i in range(len(ds)):
        s = ds[i]
        packed = OBJECTS.pack(s["objects"], s)
        if bool(scored_people(packed, s["image"].shape[-2]).any()):
            out.append({"image": s["image"].as_subclass(torch.Tensor), "y": packed})
        if len(out) == n:
            break
    return out


def ap50(model: torch.nn.Module, cfg, info: dict, samples: list[dict[str, Any]]) -> dict[str, float]:
    """AP50 per class (and the scored objects' count) of ``model`` on ``samples``, 16 at a time."""
    from torch.utils.data import default_collate

    from densemtl.tasks import TASKS

    metrics = TASKS["objects"].make_metrics(cfg, info)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), 16):
            batch = default_collate(samples[i : i + 16])
            metrics.update(model(batch["image"])["objects"], batch["y"])
    r = metrics.compute()
    return {k: round(float(r[k]), 4) for k in ("gt_objects", "ap50_car", "ap50_person")}


def scored_on_val(model: torch.nn.Module, data: Path, scale: float):
    """For each of the first ``HEAT_IMAGES`` validation images at ``scale``: its scored objects' rows (m, FIELDS)
    and the model's raw objects output (K + 14, h, w)."""
    from densemtl.tasks.objects import OBJECTS
    from densemtl.tasks.objects_codec import COL, scored

    ds = resized_split(data, "val", scale)
    model.eval()
    for i in range(min(HEAT_IMAGES, len(ds))):
        s = ds[i]
        rows = OBJECTS.pack(s["objects"], s)
        rows = rows[(rows[:, COL["class"]] >= 0) & scored(rows, s["image"].shape[-2])]
        with torch.no_grad():
            yield rows, model(s["image"].as_subclass(torch.Tensor)[None])["objects"][0]


def heat_at_centres(model: torch.nn.Module, data: Path, scale: float) -> dict[str, Any]:
    """Per class, the heatmap score at the scored objects' centre cells of ``HEAT_IMAGES`` validation images."""
    from densemtl.tasks.objects_codec import COL, centre_cells

    at: dict[int, list[float]] = {0: [], PERSON: []}
    for rows, raw in scored_on_val(model, data, scale):
        heat = raw[:2].sigmoid()
        iy, ix = centre_cells(rows[:, COL["x0"] : COL["y1"] + 1], tuple(heat.shape[-2:]))
        for c, y, x in zip(rows[:, COL["class"]].long().tolist(), iy.tolist(), ix.tolist(), strict=True):
            at[c].append(float(heat[c, y, x]))
    names = {0: "car", PERSON: "person"}
    return {
        names[c]: {"n": len(v), "median": float(np.median(v)), "p90": float(np.percentile(v, 90))}
        for c, v in at.items() if v
    }  # fmt: skip


def centre_box_sizes(model: torch.nn.Module, data: Path, scale: float) -> dict[str, Any]:
    """Per class and size (under ``SMALL_PX`` high at the network input, or not), the median ratio of the width and
    height regressed at the scored objects' centre cells to the true ones, over ``HEAT_IMAGES`` validation images."""
    from objects_errors import centre_cell_boxes

    from densemtl.tasks.objects_codec import COL

    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rows, raw in scored_on_val(model, data, scale):
        gt = rows[:, COL["x0"] : COL["y1"] + 1]
        pred = centre_cell_boxes(raw, gt)
        for c, g, b in zip(rows[:, COL["class"]].long().tolist(), gt, pred, strict=True):
            size = "small" if float(g[3] - g[1]) < SMALL_PX else "larger"
            key = ("person" if c == PERSON else "car", size)
            ratios.setdefault(key, []).append((float((b[2] - b[0]) / (g[2] - g[0])), float((b[3] - b[1]) / (g[3] - g[1]))))
    return {
        f"{name}_{size}": {"n": len(v), "width_ratio": round(float(np.median([w for w, _ in v])), 3),
                           "height_ratio": round(float(np.median([h for _, h in v])), 3)}
        for (name, size), v in sorted(ratios.items())
    }  # fmt: skip


def overfit(data: Path, scale: float) -> dict[str, Any]:
    """The demo's architecture with the objects head alone, from scratch, trained on ``SCENES`` training scenes
    with people (no augmentation) for ``OVERFIT_STEPS`` steps: AP50 on those scenes before and after."""
    from torch.utils.data import default_collate

    from densemtl.config import Config, load_config, replace
    from densemtl.data.format import read_dataset_json
    from densemtl.models import build_model
    from densemtl.tasks.objects import OBJECTS
    from densemtl.train.engine import resolve_config

    torch.manual_seed(0)
    info = read_dataset_json(data)
    demo = load_config(ROOT / "configs" / "synthetic_objects.yaml")
    model_cfg = replace(demo.model, tasks=("objects",), pretrained="none", backbone_weights="")  # from scratch
    cfg = resolve_config(replace(Config(), model=model_cfg), info)
    samples = samples_with_people(data, "train", scale, SCENES)
    batch = default_collate(samples)
    model = build_model(cfg.model)
    before = ap50(model, cfg, info, samples)
    loss_fn, opt = OBJECTS.make_loss(cfg), torch.optim.AdamW(model.parameters(), 2e-3)
    everyone = torch.ones(len(samples), dtype=torch.bool)
    t0 = time.perf_counter()
    for _ in range(OVERFIT_STEPS):
        model.train()
        loss = loss_fn(model(batch["image"])["objects"], batch["y"], everyone)
        opt.zero_grad()
        loss.backward()
        opt.step()
    people = int(sum(int(scored_people(s["y"], s["image"].shape[-2]).sum()) for s in samples))
    return {"scenes": len(samples), "people": people, "steps": OVERFIT_STEPS, "before": before,
            "after": ap50(model, cfg, info, samples), "seconds": round(time.perf_counter() - t0)}  # fmt: skip


def backbone_study(work: Path, data: Path) -> dict[str, Any]:
    """The objects head alone, 3 epochs at 1/2 scale, on MobileNetV2 from scratch and from ImageNet (runs under
    ``work``, reused when finished): AP50 per class after each epoch."""
    from demo_runs import train_demo_runs
    from objects import OBJECTS_CONFIG, SHARED_WEIGHTS

    if not SHARED_WEIGHTS.is_file():
        raise SystemExit(f"the backbone stage needs the ImageNet MobileNetV2 weights at {SHARED_WEIGHTS}")
    common = ["model.tasks=[objects]", "loss.weights.objects=1.0", "model.backbone=mobilenet_v2",
              "model.pretrained=none", "train.encoder_lr_mult=1.0",
              "train.phases=[{scale: 0.5, epochs: 3, batch_size: 8, lr: 1.0e-3}]"]  # fmt: skip
    runs = {"v2_scratch": common, "v2_imagenet": [*common, f"model.backbone_weights={SHARED_WEIGHTS}"]}
    train_demo_runs(work, data, runs, dict.fromkeys(runs, OBJECTS_CONFIG))
    out = {}
    for name in runs:
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        out[name] = [{k: round(r[f"val/objects/{k}"], 4) for k in ("ap50_car", "ap50_person")} for r in rows]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "objects_bench" / "objects" / "best.pt")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    p.add_argument("--stages", default="heat,seen,overfit")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "objects_people", help="the backbone stage's runs")
    args = p.parse_args(argv)
    from densemtl.train.checkpoint import (
        config_from_checkpoint,
        input_scale,
        load_checkpoint,
        model_from_checkpoint,
    )

    torch.set_num_threads(2)
    stages = args.stages.split(",")
    result: dict[str, Any] = {}
    out = HERE / "results" / "objects_people.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    diagnoses = {"heat", "seen", "overfit"} & set(stages)  # the figures "checkpoint" names
    if diagnoses or "widths" in stages:
        ckpt = load_checkpoint(args.checkpoint)
        model, cfg, scale = model_from_checkpoint(ckpt).eval(), config_from_checkpoint(ckpt), input_scale(ckpt)
    if diagnoses:
        result |= {"checkpoint": str(args.checkpoint), "input_scale": scale}
    else:  # the last measured checkpoint's figures are kept
        result |= {k: old[k] for k in ("checkpoint", "input_scale", "heat_at_centre", "seen", "overfit") if k in old}
    if "heat" in stages:
        result["heat_at_centre"] = heat_at_centres(model, args.data, scale)
    if "seen" in stages:
        info = {"object_classes": list(cfg.model.object_classes)}
        result["seen"] = {split: ap50(model, cfg, info, samples_with_people(args.data, split, scale, SEEN))
                          for split in ("train", "val")}  # fmt: skip
    if "overfit" in stages:
        result["overfit"] = overfit(args.data, scale)
    result["widths"] = dict(old.get("widths", {}))  # one entry per checkpoint measured
    if "widths" in stages:
        result["widths"][str(args.checkpoint)] = centre_box_sizes(model, args.data, scale)
    if "backbone" in stages:
        result["backbone"] = backbone_study(args.work, args.data)
    elif "backbone" in old:
        result["backbone"] = old["backbone"]  # its own runs, not the checkpoint's: kept when not re-run
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
