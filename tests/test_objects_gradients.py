"""benchmarks/objects_gradients.py: the objects loss split into its terms adds back up to the training loss, and
the measurement gives every term's gradient cosine with each dense task's on a saved checkpoint."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

TERMS = ("heat", "box", "distance", "box3d")
DENSE = ("semseg", "depth", "normals")


def _benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "objects_gradients.py"
    spec = importlib.util.spec_from_file_location("objects_gradients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objects_terms_add_up_to_the_training_loss_and_are_measured(synthetic_root, tiny_overrides, tmp_path) -> None:
    from densemtl.config import load_config
    from densemtl.data.loaders import make_loader
    from densemtl.train.checkpoint import make_payload, save_checkpoint
    from densemtl.train.engine import setup

    bench = _benchmark()
    sets = ["model.tasks=[semseg,depth,normals,objects]", "loss.weights.objects=0.1", "loss.objects_terms.heat=2"]
    run = setup(load_config(None, [*tiny_overrides(synthetic_root, tmp_path / "run"), *sets]), check_files=False)
    run.model.eval()  # the same outputs for both forwards below
    phase = run.phases[-1]
    batch = next(iter(make_loader(run.train_sets[phase.index], 8, True, 0, 0, run.device)))
    terms = bench.weighted_terms(run, batch)
    assert set(terms) == {*DENSE, *(f"objects/{t}" for t in TERMS)}
    with torch.no_grad():
        total = run.loss_fn({k: v.float() for k, v in run.net(batch["image"]).items()}, batch)["total"]
    assert float(sum(terms.values()).detach()) == pytest.approx(float(total), rel=1e-5)
    assert float(terms["objects/box3d"].detach()) > 0  # the synthetic objects have 3-D boxes
    assert run.loss_fn.losses["objects"].weights["heat"] == 2.0  # the term weights are put back

    checkpoint = save_checkpoint(tmp_path / "c.pt", make_payload(run.cfg, run.model, run.info))
    result = bench.measure(checkpoint, synthetic_root, batches=2)
    assert result["batches"] == 2
    for term in TERMS:
        assert result[f"objects/{term} norm / depth"] > 0
        for dense in DENSE:
            cos = result[f"objects/{term} cos {dense}"]
            assert math.isfinite(cos) and -1.0 <= cos <= 1.0
