"""Transfer learning from the real ImageNet MobileNetV2 weights: what is frozen stays frozen while training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densemtl.config import load_config
from densemtl.models import build_model
from densemtl.train.engine import build_optimizer, train_one_epoch
from densemtl.train.losses import build_loss
from densemtl.train.weighting import shared_parameters

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
C = 4

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"{WEIGHTS} not present")


def _batches(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(2, 3, size, size, generator=g),
            "semseg": torch.randint(0, C, (2, size, size), generator=g),
            "depth": torch.rand(2, 1, size, size, generator=g) * 20 + 1,
        }
        for _ in range(n)
    ]


def _train(sets: list[str], steps: int = 2, size: int = 64):
    """A model built from ``sets``, its state before, and after two training steps through the engine."""
    cfg = load_config(
        None,
        [
            "model.backbone=mobilenet_v2",
            f"model.backbone_weights={WEIGHTS}",
            f"model.num_classes={C}",
            "model.decoder_channels=16",
            "train.lr=1e-2",
            "train.channels_last=false",
            "train.log_every=1",
            *sets,
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg.model)
    loss_fn = build_loss(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, loss_fn, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    stats = train_one_epoch(
        model, loss_fn, _batches(steps, size), optimizer, scheduler, scaler, torch.device("cpu"), cfg, 0, 3
    )
    return model, before, stats


def _changed(model: torch.nn.Module, before: dict[str, torch.Tensor], prefix: str) -> dict[str, bool]:
    return {
        k: not torch.equal(v, before[k])
        for k, v in model.state_dict().items()
        if k.startswith(prefix) and v.is_floating_point()
    }


def test_imagenet_weights_are_loaded_into_the_encoder() -> None:
    cfg = load_config(
        None, ["model.backbone=mobilenet_v2", f"model.backbone_weights={WEIGHTS}", f"model.num_classes={C}"]
    )
    sd = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    first_conv = build_model(cfg.model).backbone.stages[0][0][0].weight  # features.0.0.weight
    torch.testing.assert_close(first_conv, sd["features.0.0.weight"])


@pytest.mark.parametrize("weighting", ["fixed", "pcgrad"])
def test_frozen_encoder_does_not_change_while_the_decoder_trains(weighting: str) -> None:
    """freeze=all: every encoder parameter AND BatchNorm statistic is bit-identical after training."""
    model, before, stats = _train(["model.freeze=all", f"loss.weighting={weighting}"])
    assert stats["skipped_batches"] == 0
    encoder = _changed(model, before, "backbone.")
    assert encoder and not any(encoder.values()), [k for k, c in encoder.items() if c]
    assert any(_changed(model, before, "decoders.").values()) and any(
        _changed(model, before, "heads.").values()
    )
    assert list(model.encoder_parameters()) == []
    shared = shared_parameters(model)  # PCGrad still combines the shared decoder's task gradients
    assert shared and all(id(p) not in {id(q) for q in model.backbone.parameters()} for p in shared)


def test_partial_fine_tuning_freezes_only_the_first_stages() -> None:
    model, before, _ = _train(
        ["model.freeze=first_n_stages", "model.freeze_stages=2", "train.encoder_lr_mult=0.1"],
        steps=1,
        size=32,
    )
    frozen = {k: c for k, c in _changed(model, before, "backbone.").items() if k.split(".")[2] in ("0", "1")}
    tuned = {
        k: c for k, c in _changed(model, before, "backbone.").items() if k.split(".")[2] not in ("0", "1")
    }
    assert frozen and not any(frozen.values())
    assert any(tuned.values())
