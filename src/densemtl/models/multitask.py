"""The multi-task network and ``build_model``, the only place that reads :class:`~densemtl.config.ModelConfig`.

``MultiTaskNet`` receives its parts (like torchvision's ``_SimpleSegmentationModel`` or SAM's ``Sam``): one
backbone, decoders keyed either ``"shared"`` (one decoder, a light head per task: the real-time design) or by
task name (shared encoder, one decoder per task), and one head per task. It returns ``{task: tensor}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from densemtl.config import ModelConfig
from densemtl.models.backbones import BACKBONES, Backbone, freeze
from densemtl.models.decoders import DECODERS
from densemtl.models.heads import DEPTH_PARAMS, DepthHead, SegHead
from densemtl.tasks import check_tasks, out_channels

SHARED = "shared"
SHARING_MODES = ("shared", "split")


class MultiTaskNet(nn.Module):
    """Backbone -> decoder(s) -> one head per task; outputs at input resolution.

    Args:
        backbone: returns a fine-to-coarse feature list (see :class:`~densemtl.models.backbones.Backbone`).
        decoders: ``{"shared": decoder}`` or ``{task: decoder}`` for every task; a task uses its own decoder
            when there is one, else the shared one. Each decoder is run once per forward.
        heads: ``{task: head}``; ``head(features, size)`` returns the task's output at ``size``. The order of
            the keys is the order of ``model.tasks``.
    """

    def __init__(self, backbone: Backbone, decoders: Mapping[str, nn.Module], heads: Mapping[str, nn.Module]):
        super().__init__()
        missing = [t for t in heads if t not in decoders and SHARED not in decoders]
        if missing:
            raise ValueError(f"no decoder for task(s) {missing}: pass decoders['{SHARED}'] or one per task")
        self.backbone = backbone
        self.decoders = nn.ModuleDict(decoders)
        self.heads = nn.ModuleDict(heads)
        self.tasks = tuple(heads)
        self._route = {t: t if t in decoders else SHARED for t in self.tasks}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) ImageNet-normalised -> {"semseg": (B, C, H, W) logits, "depth": (B, 1, H, W) metres}."""
        size = x.shape[-2:]
        feats = self.backbone(x)  # [(B, C_i, H/s_i, W/s_i)] fine to coarse
        decoded = {name: dec(feats) for name, dec in self.decoders.items()}  # (B, D, H/4, W/4) each
        return {t: self.heads[t](decoded[self._route[t]], size) for t in self.tasks}

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable backbone parameters (for an encoder learning-rate multiplier)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """Trainable decoder and head parameters; disjoint from :meth:`encoder_parameters`."""
        encoder = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if p.requires_grad and id(p) not in encoder)


def _check(cfg: ModelConfig, tasks: tuple[str, ...]) -> None:
    """Fail early, naming the config key, on values build_model cannot use."""
    choices = {
        "backbone": (cfg.backbone, tuple(BACKBONES)),
        "decoder": (cfg.decoder, tuple(DECODERS)),
        "sharing": (cfg.sharing, SHARING_MODES),
        "depth_param": (cfg.depth_param, DEPTH_PARAMS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r} is not one of {allowed}")
    if "semseg" in tasks and cfg.num_classes < 2:
        raise ValueError(
            f"model.num_classes={cfg.num_classes}: semseg needs at least 2 classes (set it, or leave 0 for the "
            "caller to read it from the dataset's dataset.json)"
        )
    if cfg.decoder_channels < 1:
        raise ValueError(f"model.decoder_channels must be positive, got {cfg.decoder_channels}")


def _head(task: str, channels: int, cfg: ModelConfig) -> nn.Module:
    if task == "semseg":
        return SegHead(channels, out_channels(task, cfg.num_classes))
    if task == "depth":
        return DepthHead(channels, cfg.depth_param, cfg.min_depth, cfg.max_depth)
    raise ValueError(f"no head for task {task!r}")


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """Build the network described by ``cfg`` (``cfg.num_classes`` already resolved by the caller)."""
    tasks = check_tasks(cfg.tasks)
    _check(cfg, tasks)
    backbone = freeze(
        BACKBONES[cfg.backbone](cfg.pretrained, cfg.backbone_weights), cfg.freeze, cfg.freeze_stages
    )
    names = (SHARED,) if cfg.sharing == "shared" else tasks
    decoders = {
        n: DECODERS[cfg.decoder](backbone.out_channels, cfg.decoder_channels, cfg.upsample, cfg.aspp)
        for n in names
    }
    width = next(iter(decoders.values())).out_channels
    heads = {t: _head(t, width, cfg) for t in tasks}
    model = MultiTaskNet(backbone, decoders, heads)
    set_bn_momentum(model, cfg.bn_momentum)
    return model


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Set every BatchNorm's running-statistics momentum.

    torchvision's MobileNetV3/EfficientNet use 0.01, tuned for long ImageNet runs; over a few hundred steps the
    running statistics then still mostly hold their initial values, and evaluation (which uses them) is far worse
    than training. 0.1 (PyTorch's default) tracks the data within tens of steps.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
