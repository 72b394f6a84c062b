"""The objects head learns: a small model trained on a few synthetic scenes finds their cars and people."""

from __future__ import annotations

import pytest
import torch

from densemtl.tasks import TASKS
from densemtl.tasks.objects import OBJECTS


@pytest.mark.slow
def test_training_finds_the_objects_of_the_scenes_it_saw(synthetic_root) -> None:
    """150 steps on 8 tiny scenes (64 x 128): loss down 5x, and those scenes' objects found with their distances
    (an untrained head scores AP50 ~0, the training/decoding/metric chain end to end)."""
    from torch.utils.data import default_collate

    from densemtl.config import Config, ModelConfig, replace
    from densemtl.data.folder import FolderDataset
    from densemtl.data.format import read_dataset_json
    from densemtl.models import build_model
    from densemtl.train.engine import resolve_config

    torch.manual_seed(0)
    info = read_dataset_json(synthetic_root)
    model_cfg = ModelConfig(tasks=(OBJECTS.name,), backbone="mobilenet_v3_small", decoder_channels=32)
    cfg = resolve_config(replace(Config(), model=model_cfg), info)
    ds = FolderDataset(synthetic_root, "train", tasks=(OBJECTS.name,))
    samples = [ds[i] for i in range(8)]
    batch = default_collate([{"image": s["image"].as_subclass(torch.Tensor), "y": OBJECTS.pack(s[OBJECTS.name], s)}
                             for s in samples])  # fmt: skip
    model = build_model(cfg.model)
    loss_fn = OBJECTS.make_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    everyone = torch.ones(8, dtype=torch.bool)
    losses = []
    for _ in range(150):
        loss = loss_fn(model(batch["image"])[OBJECTS.name], batch["y"], everyone)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    metrics = TASKS[OBJECTS.name].make_metrics(cfg, info)
    with torch.no_grad():
        metrics.update(model.eval()(batch["image"])[OBJECTS.name], batch["y"])
    r = metrics.compute()
    assert r["gt_objects"] >= 10, r  # scored objects in those scenes
    assert r["ap50"] > 0.5, r
    assert r["matched"] >= 5 and r["distance_delta1"] > 0.8, r
