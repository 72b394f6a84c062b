"""Which part of the objects loss pulls the shared network against depth (and segmentation, normals)?

On a trained objects model (``--checkpoint``, default the objects demo's seed-0 run), for training batches at its
last phase's scale: each dense task's weighted loss and each term of the weighted objects loss (heat, box,
distance, box3d, each times ``loss.objects_terms`` and ``loss.weights.objects``, as training weighs them) are
back-propagated one at a time into the shared parameters (backbone and shared decoder,
``densemtl.train.weighting.shared_parameters``). Per term: the cosine of its gradient with each dense task's
(negative = the term pulls the shared weights against that task), and its norm over depth's. Averages over
``--batches`` batches, written to results/objects_gradients.json.

    python benchmarks/objects_gradients.py --checkpoint runs/objects_bench/objects/best.pt --batches 24

A diagnosis, not a target: the head moves depth delta1 by about a point (README "Objects"), and this says which
term to look at. The gradient of a trained model is the end of training's, not the whole run's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DENSE = ("semseg", "depth", "normals")


def weighted_terms(run: Any, batch: dict) -> dict[str, torch.Tensor]:
    """One forward: each dense task's weighted loss and each weighted objects term, as scalar tensors."""
    from densemtl.train.losses import _sample_mask

    outputs = {k: v.float() for k, v in run.net(batch["image"]).items()}
    weights = run.loss_fn.weighting.current_weights()
    out = {}
    for task, fn in run.loss_fn.losses.items():
        mask = _sample_mask(batch, task, outputs[task])
        if task != "objects":
            out[task] = weights[task] * fn(outputs[task], batch[task], mask)
            continue
        kept = dict(fn.weights)
        for term in kept:  # one term at a time: the others weighed 0
            fn.weights = {t: (w if t == term else 0.0) for t, w in kept.items()}
            out[f"objects/{term}"] = weights[task] * fn(outputs[task], batch[task], mask)
        fn.weights = kept
    return out


def measure(checkpoint: Path, data: Path, batches: int) -> dict[str, Any]:
    """Mean cosines and norm ratios of the objects terms' shared gradients against the dense tasks'."""
    from densemtl.data.loaders import make_loader
    from densemtl.runtime import to_device
    from densemtl.train.checkpoint import config_from_checkpoint, load_checkpoint
    from densemtl.train.engine import setup
    from densemtl.train.weighting import shared_parameters, task_gradients

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_checkpoint(ckpt)
    cfg = replace(cfg, data=replace(cfg.data, root=str(data), num_workers=0))
    run = setup(cfg, check_files=False, init_weights=False)
    run.model.load_state_dict(ckpt["model"])
    phase = run.phases[-1]
    loader = make_loader(run.train_sets[phase.index], phase.batch_size, True, 0, 0, run.device)
    shared = shared_parameters(run.model)
    run.model.train()
    sums: dict[str, float] = {}
    for i, batch in enumerate(loader):
        if i == batches:
            break
        terms = weighted_terms(run, to_device(batch, run.device))
        names = list(terms)
        grads = task_gradients([terms[n] for n in names], shared, None)  # (T, P)
        run.model.zero_grad(set_to_none=True)
        norms = grads.norm(dim=1).clamp_min(1e-12)
        for a, name in enumerate(names):
            if name in DENSE:
                continue
            for b, dense in enumerate(names):
                if dense in DENSE:
                    cos = float(grads[a] @ grads[b] / (norms[a] * norms[b]))
                    sums[f"{name} cos {dense}"] = sums.get(f"{name} cos {dense}", 0.0) + cos
            sums[f"{name} norm / depth"] = sums.get(f"{name} norm / depth", 0.0) + float(norms[a] / norms[names.index("depth")])
    n = min(batches, i + 1)
    return {"checkpoint": str(checkpoint), "batches": n, "batch_size": phase.batch_size, "scale": phase.scale,
            **{k: round(v / n, 4) for k, v in sorted(sums.items())}}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "objects_bench" / "objects" / "best.pt")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    p.add_argument("--batches", type=int, default=24)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    result = measure(args.checkpoint, args.data, args.batches)
    out = HERE / "results" / "objects_gradients.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    old[str(args.checkpoint)] = result  # one entry per checkpoint measured
    out.write_text(json.dumps(old, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
