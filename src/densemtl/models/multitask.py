"""The multi-task network and ``build_model``, the only place that reads :class:`~densemtl.config.ModelConfig`.

``MultiTaskNet`` receives its parts (like torchvision's ``_SimpleSegmentationModel`` or SAM's ``Sam``): one
backbone, decoders keyed either ``"shared"`` (one decoder, a light head per task: the real-time design) or by
task name (shared encoder, one decoder per task), and one head per task. It returns ``{task: tensor}``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from densemtl import tasks as task_table  # the module, not its names: tasks' modules import models.heads
from densemtl.config import ModelConfig
from densemtl.models.backbones import BACKBONES, Backbone, freeze
from densemtl.models.decoders import DECODERS
from densemtl.models.heads import HEAD_KINDS

SHARED = "shared"
SHARING_MODES = ("shared", "split")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiTaskNet(nn.Module):
    """Backbone -> decoder(s) -> one head per task; outputs at input resolution.

    Args:
        backbone: returns a fine-to-coarse feature list (see :class:`~densemtl.models.backbones.Backbone`).
        decoders: ``{"shared": decoder}`` or ``{task: decoder}`` for every task; a task uses its own decoder
            when there is one, else the shared one. Each decoder is run once per forward.
        heads: ``{task: head}``; ``head(features, size)`` returns the task's output at ``size``. The order of
            the keys is the order of ``model.tasks``.
        pixel_mean, pixel_std: per-channel statistics the input is normalised with (ImageNet's by default):
            the model owns its normalisation (like SAM's ``pixel_mean``), so training, the Predictor, export,
            ONNX Runtime and quantisation all feed it the same RGB in [0, 1].
    """

    def __init__(
        self,
        backbone: Backbone,
        decoders: Mapping[str, nn.Module],
        heads: Mapping[str, nn.Module],
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
        pixel_std: tuple[float, float, float] = IMAGENET_STD,
    ):
        super().__init__()
        missing = [t for t in heads if t not in decoders and SHARED not in decoders]
        if missing:
            raise ValueError(f"no decoder for task(s) {missing}: pass decoders['{SHARED}'] or one per task")
        self.backbone = backbone
        self.decoders = nn.ModuleDict(decoders)
        self.heads = nn.ModuleDict(heads)
        self.tasks = tuple(heads)
        self._route = {t: t if t in decoders else SHARED for t in self.tasks}
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> ``{task: (B, C_task, H, W)}`` (each task's raw output)."""
        size = x.shape[-2:]
        x = (x - self.pixel_mean) / self.pixel_std
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
        "head": (cfg.head, HEAD_KINDS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"model.{key}={value!r} is not one of {allowed}")
    if cfg.decoder_channels < 1:
        raise ValueError(f"model.decoder_channels must be positive, got {cfg.decoder_channels}")
    for t in tasks:
        task_table.TASKS[t].check_model_config(cfg)


def build_model(cfg: ModelConfig) -> MultiTaskNet:
    """Build the network described by ``cfg`` (``cfg.num_classes`` already resolved by the caller)."""
    tasks = task_table.check_tasks(cfg.tasks)
    _check(cfg, tasks)
    backbone = freeze(
        BACKBONES[cfg.backbone](cfg.pretrained, cfg.backbone_weights), cfg.freeze, cfg.freeze_stages
    )
    names = (SHARED,) if cfg.sharing == "shared" else tasks
    decoders = {
        n: DECODERS[cfg.decoder](
            backbone.out_channels,
            cfg.decoder_channels,
            upsample=cfg.upsample,
            aspp=cfg.aspp,
            taper=cfg.decoder_taper,
            crp_stages=cfg.crp_stages,
        )
        for n in names
    }
    width = next(iter(decoders.values())).out_channels
    heads = {t: task_table.TASKS[t].make_head(width, cfg) for t in tasks}
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
