"""Backbones: torchvision classifiers cut into four stages whose outputs have strides 4, 8, 16 and 32.

Every backbone is a :class:`Backbone`: it returns a list of feature maps from fine to coarse and exposes
``out_channels`` and ``strides`` (timm's ``feature_info`` idea), so decoders size themselves from it. Names map to
builder functions through the plain dict :data:`BACKBONES`.

Weights: ``pretrained="imagenet"`` uses torchvision's weights enums (a download when not cached). Offline that
fails fast with a message naming the fix (a local file via ``model.backbone_weights=PATH``), instead of hanging
on a socket. A local file is loaded with ``torch.load(..., weights_only=True)``; missing and unexpected keys are
reported, and a file that matches nothing is an error.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

STRIDES = (4, 8, 16, 32)
DOWNLOAD_HOST = ("download.pytorch.org", 443)
FREEZE_MODES = ("none", "all", "bn", "first_n_stages")


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights are neither cached nor downloadable; the message says how to pass a local file."""


class Backbone(nn.Module):
    """Four stages run in sequence; each stage's output is one feature map.

    Args:
        stages: modules applied one after the other; stage ``i`` outputs stride ``strides[i]``.
        out_channels: channels of each stage's output.
        strides: total stride of each stage's output with respect to the input.
    """

    def __init__(
        self, stages: Sequence[nn.Module], out_channels: Sequence[int], strides: Sequence[int] = STRIDES
    ):
        super().__init__()
        if not len(stages) == len(out_channels) == len(strides):
            raise ValueError("stages, out_channels and strides must have the same length")
        self.stages = nn.ModuleList(stages)
        self.out_channels = tuple(out_channels)
        self.strides = tuple(strides)
        self.frozen_bn_stages: tuple[int, ...] = ()  # BatchNorm in these stages stays in eval mode

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i]))]."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def train(self, mode: bool = True) -> Backbone:
        """Like ``nn.Module.train`` but frozen BatchNorm layers keep their running statistics (eval mode)."""
        super().train(mode)
        for i in self.frozen_bn_stages:
            for m in self.stages[i].modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


def freeze(backbone: Backbone, mode: str, n_stages: int = 0) -> Backbone:
    """Freeze parts of ``backbone`` for transfer learning; returns it.

    Args:
        backbone: the backbone to modify in place.
        mode: ``none``; ``all`` (every parameter and BatchNorm statistic); ``bn`` (BatchNorm affine parameters
            and running statistics only); ``first_n_stages`` (everything in stages ``0 .. n_stages - 1``).
        n_stages: number of stages frozen by ``first_n_stages``, 1 to 4.
    """
    if mode not in FREEZE_MODES:
        raise ValueError(f"model.freeze={mode!r} is not one of {FREEZE_MODES}")
    n = len(backbone.stages)
    if mode == "none":
        return backbone
    if mode == "first_n_stages" and not 1 <= n_stages <= n:
        raise ValueError(f"model.freeze=first_n_stages needs model.freeze_stages in 1..{n}, got {n_stages}")
    stages = range(n_stages) if mode == "first_n_stages" else range(n)
    for i in stages:
        for m in backbone.stages[i].modules():
            if mode != "bn" or isinstance(m, _BatchNorm):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(False)
    backbone.frozen_bn_stages = tuple(stages)
    return backbone.train(backbone.training)


def _online(host: tuple[str, int] = DOWNLOAD_HOST, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the weights server opens within ``timeout`` seconds."""
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def imagenet_weights(enum: Any, name: str) -> Any:
    """torchvision's default ImageNet weights for ``name``, or a fast, helpful error when offline."""
    weights = enum.DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file() or _online():
        return weights
    raise WeightsUnavailableError(
        f"model.pretrained=imagenet: the {name} weights are not in the torch hub cache ({cached}) and "
        f"{DOWNLOAD_HOST[0]} cannot be reached. Download {weights.url} on a connected machine and pass it "
        "as a local file: --set model.backbone_weights=PATH (or put it at the cache path above)."
    )


def _unwrap(sd: Any, path: Path) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded file (plain, or under 'state_dict'/'model'); strip 'module.'."""
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.backbone_weights={path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_local_weights(model: nn.Module, path: str | Path, ignore: tuple[str, ...] = ()) -> nn.Module:
    """Load a local state dict into a torchvision ``model``, reporting what did not match.

    Args:
        model: the full torchvision classifier (keys like ``features.0.0.weight``).
        path: a ``.pth`` file; loaded with ``weights_only=True`` so it cannot run code.
        ignore: key prefixes the backbone does not use (the classifier), not reported as missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights={path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects, an empty or truncated file, not a torch file
        raise ValueError(
            f"model.backbone_weights={path} cannot be loaded safely ({type(e).__name__}: empty, truncated, "
            "or holding pickled objects); it must be a plain state dict of tensors, saved with "
            "torch.save(model.state_dict(), path): pickled modules and other objects are refused because "
            "loading them could run code"
        ) from None
    sd = _unwrap(loaded, path)
    own = model.state_dict()
    matched = {k: v for k, v in sd.items() if k in own}
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in matched.items()
        if v.shape != own[k].shape
    ]
    if not matched or wrong:
        example = next(iter(own))
        raise ValueError(
            f"model.backbone_weights={path}: {len(matched)} of {len(sd)} keys match {type(model).__name__}"
            f"{' with wrong shapes: ' + ', '.join(wrong[:5]) if wrong else ''}; expected a torchvision state "
            f"dict (keys like {example!r}) of the backbone named by model.backbone"
        )
    model.load_state_dict(matched, strict=False)
    missing = [k for k in own if k not in sd and not k.startswith(ignore)]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        warnings.warn(
            f"{path}: {len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]} (loaded the {len(matched)} that match)",
            stacklevel=2,
        )
    return model


def _torchvision(
    ctor: Callable[..., nn.Module],
    enum: Any,
    name: str,
    pretrained: str,
    weights_path: str,
    ignore: tuple[str, ...],
) -> nn.Module:
    """Build a torchvision classifier with ImageNet, local or random weights."""
    if pretrained not in ("none", "imagenet"):
        raise ValueError(f"model.pretrained={pretrained!r} is not one of ('none', 'imagenet')")
    if weights_path:  # a local file is the offline way to get the same weights
        return load_local_weights(ctor(weights=None), weights_path, ignore)
    return ctor(weights=imagenet_weights(enum, name) if pretrained == "imagenet" else None)


def _cut(features: nn.Sequential, ends: Sequence[int]) -> list[nn.Module]:
    """Split ``features`` into consecutive stages ending (exclusive) at ``ends``."""
    starts = [0, *ends[:-1]]
    return [features[a:b] for a, b in zip(starts, ends, strict=True)]


_TV = torchvision.models
# torchvision constructor, weights enum, where each stage ends in ``.features`` (exclusive), stage channels
_FEATURE_MODELS: dict[str, tuple[Callable[..., nn.Module], Any, tuple[int, ...], tuple[int, ...]]] = {
    "mobilenet_v3_small": (
        _TV.mobilenet_v3_small,
        _TV.MobileNet_V3_Small_Weights,
        (2, 4, 9, 13),
        (16, 24, 48, 576),
    ),
    "mobilenet_v3_large": (
        _TV.mobilenet_v3_large,
        _TV.MobileNet_V3_Large_Weights,
        (4, 7, 13, 17),
        (24, 40, 112, 960),
    ),
    "mobilenet_v2": (_TV.mobilenet_v2, _TV.MobileNet_V2_Weights, (4, 7, 14, 19), (24, 32, 96, 1280)),
    "efficientnet_b0": (_TV.efficientnet_b0, _TV.EfficientNet_B0_Weights, (3, 4, 6, 9), (24, 40, 112, 1280)),
}
# torchvision constructor, weights enum, channels of layer1..layer4
_RESNETS: dict[str, tuple[Callable[..., nn.Module], Any, tuple[int, ...]]] = {
    "resnet18": (_TV.resnet18, _TV.ResNet18_Weights, (64, 128, 256, 512)),
    "resnet34": (_TV.resnet34, _TV.ResNet34_Weights, (64, 128, 256, 512)),
    "resnet50": (_TV.resnet50, _TV.ResNet50_Weights, (256, 512, 1024, 2048)),
}


def _features_backbone(name: str, pretrained: str, weights_path: str) -> Backbone:
    """A MobileNet/EfficientNet: its ``features`` Sequential cut into four stages."""
    ctor, enum, ends, channels = _FEATURE_MODELS[name]
    tv = _torchvision(ctor, enum, name, pretrained, weights_path, ignore=("classifier.",))
    return Backbone(_cut(tv.features, ends), channels)


def _resnet(name: str, pretrained: str, weights_path: str) -> Backbone:
    """A ResNet: stem + layer1 (stride 4), layer2, layer3, layer4."""
    ctor, enum, channels = _RESNETS[name]
    tv = _torchvision(ctor, enum, name, pretrained, weights_path, ignore=("fc.",))
    stem = nn.Sequential(tv.conv1, tv.bn1, tv.relu, tv.maxpool, tv.layer1)
    return Backbone([stem, tv.layer2, tv.layer3, tv.layer4], channels)


def mobilenet_v3_small(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """MobileNetV3-Small: 16, 24, 48, 576 channels."""
    return _features_backbone("mobilenet_v3_small", pretrained, weights_path)


def mobilenet_v3_large(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """MobileNetV3-Large: 24, 40, 112, 960 channels."""
    return _features_backbone("mobilenet_v3_large", pretrained, weights_path)


def mobilenet_v2(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """MobileNetV2: 24, 32, 96, 1280 channels."""
    return _features_backbone("mobilenet_v2", pretrained, weights_path)


def efficientnet_b0(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """EfficientNet-B0: 24, 40, 112, 1280 channels."""
    return _features_backbone("efficientnet_b0", pretrained, weights_path)


def resnet18(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """ResNet-18: 64, 128, 256, 512 channels."""
    return _resnet("resnet18", pretrained, weights_path)


def resnet34(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """ResNet-34: 64, 128, 256, 512 channels."""
    return _resnet("resnet34", pretrained, weights_path)


def resnet50(pretrained: str = "none", weights_path: str = "") -> Backbone:
    """ResNet-50: 256, 512, 1024, 2048 channels."""
    return _resnet("resnet50", pretrained, weights_path)


BACKBONES: dict[str, Callable[..., Backbone]] = {
    "mobilenet_v3_small": mobilenet_v3_small,
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v2": mobilenet_v2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "efficientnet_b0": efficientnet_b0,
}
