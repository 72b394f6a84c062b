"""Decoders: turn a backbone's fine-to-coarse feature list into one stride-4 feature map.

* :class:`LWRefineNet`: Light-Weight RefineNet (Nekrasov et al., BMVC 2018): 1x1 lateral convolutions, chained
  residual pooling (CRP), fusion from coarse to fine. The real-time default.
* :class:`UNet`: skip connections at every stride, two 3x3 convolutions per level, bilinear (+1x1 conv) or
  transposed-convolution upsampling.
* :class:`ASPP`: optional DeepLabV3+-style context module on the coarsest map (atrous separable convolutions and
  image pooling).

Every decoder exposes ``out_channels`` so heads size themselves from it. Builders live in :data:`DECODERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

UPSAMPLE_MODES = ("bilinear", "transposed")


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (same padding, no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` (a no-op when it already has that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def max_pool5(x: torch.Tensor) -> torch.Tensor:
    """5x5 max pooling, stride 1, padding 2: exactly ``nn.MaxPool2d(5, 1, 2)``, but fast on CPU.

    PyTorch's CPU kernel for stride-1 pooling in NCHW is very slow. Measured with torch.utils.benchmark, 2 threads,
    (1, 128, 120, 160) float32 (stride 4 at 480x640): NCHW 272 ms, separable 1x5 then 5x1 in NCHW 175 ms,
    separable in channels_last 36 ms, channels_last 5x5 16-23 ms (same numbers as max of shifted views).
    So we pool in channels_last; the values are identical, only the memory layout differs.
    """
    return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 5, 1, 2)


class CRP(nn.Module):
    """Chained residual pooling: ``x + sum_i t_i`` with ``t_i = conv1x1(maxpool5(t_{i-1}))`` and ``t_0 = x``.

    Each stage widens the receptive field by 4 pixels per side, so ``n`` stages see a (4n+1)^2 window; the 1x1
    convolutions learn how much pooled context to add.
    """

    def __init__(self, channels: int, n_stages: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 1, bias=False) for _ in range(n_stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        out, top = x, x
        for conv in self.convs:
            top = conv(max_pool5(top))
            out = out + top
        return out


# Real-time defaults, chosen with benchmarks/latency.py and single-thread CPU time (MobileNetV3-Large, 480x640,
# ratio to torchvision's LR-ASPP): width 128 and CRP (1, 2, 2, 2) everywhere 1.28-1.41; half width at stride 4
# and no CRP there 0.91; widths (32, 64, 128, 128) with CRP (0, 2, 2, 4) 0.88. Widths halve towards the fine
# levels (like SMP's decoders): there every op runs over 4x more positions, and a 5x5 pooling window sees little
# context, so the stride-4 level is plain fusion; the coarse levels, where pooling is cheap and sees the most
# image, get the most CRP stages (the paper uses 4 everywhere). Chosen on latency alone, this decoder could not
# fit real scenes: its 32-channel stride-4 map, shared by every task, is what the heads see. benchmarks/pareto.py
# measures accuracy (real NYUv2 frames) and latency together: widening per task in the heads (ModelConfig's
# head="separable", head_channels=128) doubled the real-frame depth accuracy and lifted mIoU 0.65 -> 0.85 for
# 1.13x the ONNX Runtime time, cheaper than widening the shared decoder (uniform 128: 0.82 at 1.14x).
LW_CRP_STAGES = (0, 2, 2, 4)  # fine to coarse


def lw_widths(channels: int, levels: int = 4, taper: bool = True) -> tuple[int, ...]:
    """Decoder width per level, fine to coarse.

    ``taper``: ``channels`` at the two coarsest levels, halving at each finer one (at least 8); otherwise
    ``channels`` everywhere (the paper's uniform 256).
    """
    if not taper:
        return (channels,) * levels
    return tuple(max(channels // 2 ** max(levels - 2 - i, 0), 8) for i in range(levels))


class LWRefineNet(nn.Module):
    """Light-Weight RefineNet: at each level from coarse to fine, ``x = CRP(relu(lateral(f) + up(td(x))))``.

    As in the paper the decoder has no BatchNorm: 1x1 convolutions, ReLU and CRP only. The top-down 1x1
    convolution runs before the bilinear upsampling: both are linear and the bilinear weights sum to one, so the
    result equals convolving after upsampling, at a quarter of the cost.

    Args:
        in_channels: channels of the backbone features, fine to coarse.
        channels: decoder width per level, fine to coarse (an int = the same at every level).
        crp_stages: CRP stages per level, fine to coarse (0 = plain fusion at that level).
        context: optional module applied to the coarsest feature first (e.g. :class:`ASPP`); ``in_channels[-1]``
            must then be its output width.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int | Sequence[int],
        crp_stages: Sequence[int] = (1, 2, 2, 2),
        context: nn.Module | None = None,
    ):
        super().__init__()
        widths = [channels] * len(in_channels) if isinstance(channels, int) else list(channels)
        if not len(crp_stages) == len(widths) == len(in_channels):
            raise ValueError(f"channels {widths} and crp_stages {tuple(crp_stages)} need one entry per level")
        self.context = context
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, widths, strict=True)
        )
        self.top_down = nn.ModuleList(
            nn.Conv2d(widths[i + 1], widths[i], 1, bias=False) for i in range(len(widths) - 1)
        )
        self.crp = nn.ModuleList(CRP(w, n) for w, n in zip(widths, crp_stages, strict=True))
        self.out_channels = widths[0]

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, H/s_i, W/s_i)] fine to coarse -> (B, out_channels, H/s_0, W/s_0)."""
        feats = list(feats)
        if self.context is not None:
            feats[-1] = self.context(feats[-1])
        x = None
        for i in reversed(range(len(feats))):
            y = self.lateral[i](feats[i])
            if x is not None:
                y = y + resize(self.top_down[i](x), y.shape[-2:])
            x = self.crp[i](F.relu(y))
        return x


class UpBlock(nn.Module):
    """U-Net level: upsample the coarser map, concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int, upsample: str = "bilinear"):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"model.upsample={upsample!r} is not one of {UPSAMPLE_MODES}")
        self.upsample = upsample
        # bilinear: the 1x1 conv commutes with bilinear resizing, so it runs at the coarse size
        self.up = (
            nn.ConvTranspose2d(cin, cout, 2, stride=2)
            if upsample == "transposed"
            else nn.Conv2d(cin, cout, 1)
        )
        self.fuse = nn.Sequential(conv_bn_relu(cout + cskip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """x (B, cin, h, w), skip (B, cskip, ~2h, ~2w) -> (B, cout, skip's size)."""
        x = self.up(x)
        h, w = skip.shape[-2:]
        if self.upsample == "transposed":  # 2h may be one more than an odd skip size: crop (or pad) to it
            x = F.pad(x, (0, w - x.shape[-1], 0, h - x.shape[-2]))
        else:
            x = resize(x, (h, w))
        return self.fuse(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net decoder over the backbone pyramid: coarse to fine, one :class:`UpBlock` per skip.

    Args:
        in_channels: channels of the backbone features, fine to coarse.
        channels: width of the coarsest up block; each finer one has half (at least 8), so the stride-4
            output has ``channels // 4`` channels with four stages.
        upsample: ``bilinear`` (+1x1 conv) or ``transposed`` (2x2 transposed convolution, stride 2).
        context: optional module applied to the coarsest feature first (e.g. :class:`ASPP`).
        taper: halve the width at each finer level (False: ``channels`` at every level).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        upsample: str = "bilinear",
        context: nn.Module | None = None,
        taper: bool = True,
    ):
        super().__init__()
        self.context = context
        n = len(in_channels) - 1  # number of up blocks; the width halves at each finer level (like SMP's)
        widths = [max(channels // 2 ** (n - 1 - i), 8) if taper else channels for i in range(n)]
        widths.append(in_channels[-1])
        self.blocks = nn.ModuleList(
            UpBlock(widths[i + 1], in_channels[i], widths[i], upsample) for i in range(len(in_channels) - 1)
        )
        self.out_channels = widths[0]

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """[(B, C_i, H/s_i, W/s_i)] fine to coarse -> (B, out_channels, H/s_0, W/s_0)."""
        x = feats[-1] if self.context is None else self.context(feats[-1])
        for i in reversed(range(len(self.blocks))):
            x = self.blocks[i](x, feats[i])
        return x


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, DeepLabV3+ style: 1x1, atrous depthwise-separable 3x3 at ``rates``, and
    image pooling, concatenated and projected to ``cout``.

    The pooling branch has no BatchNorm (a 1x1 map with batch 1 has one value per channel, which BatchNorm cannot
    normalise in training). Rates default to (2, 4, 6) because it runs at stride 32, not DeepLab's 16.
    """

    def __init__(self, cin: int, cout: int, rates: Sequence[int] = (2, 4, 6)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, k=1)])
        for r in rates:
            self.branches.append(
                nn.Sequential(conv_bn_relu(cin, cin, 3, r, groups=cin), conv_bn_relu(cin, cout, 1))
            )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, cin, h, w) -> (B, cout, h, w)."""
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.project(torch.cat(outs, dim=1))


def _context(in_channels: Sequence[int], channels: int, aspp: bool) -> tuple[list[int], nn.Module | None]:
    """The optional ASPP and the channel list the decoder then sees."""
    chans = list(in_channels)
    if not aspp:
        return chans, None
    chans[-1] = channels
    return chans, ASPP(in_channels[-1], channels)


def build_lwrefinenet(
    in_channels: Sequence[int],
    channels: int,
    upsample: str = "bilinear",
    aspp: bool = False,
    taper: bool = True,
    crp_stages: Sequence[int] = LW_CRP_STAGES,
) -> LWRefineNet:
    """Light-Weight RefineNet (upsampling is always bilinear); ``taper`` and ``crp_stages`` as in ModelConfig."""
    if upsample != "bilinear":
        raise ValueError(f"model.upsample={upsample!r}: lwrefinenet upsamples bilinearly; use decoder=unet")
    if len(crp_stages) != len(in_channels) or any(n < 0 for n in crp_stages):
        raise ValueError(
            f"model.crp_stages={tuple(crp_stages)} needs one count >= 0 per backbone level "
            f"({len(in_channels)} levels, fine to coarse)"
        )
    chans, context = _context(in_channels, channels, aspp)
    return LWRefineNet(chans, lw_widths(channels, len(chans), taper), crp_stages, context)


def build_unet(
    in_channels: Sequence[int],
    channels: int,
    upsample: str = "bilinear",
    aspp: bool = False,
    taper: bool = True,
    crp_stages: Sequence[int] = (),
) -> UNet:
    """U-Net with ``upsample`` = bilinear (+1x1 conv) or transposed; ``taper=False`` keeps ``channels`` at
    every level. It has no CRP: ``crp_stages`` is accepted for a uniform builder signature and not used."""
    chans, context = _context(in_channels, channels, aspp)
    return UNet(chans, channels, upsample, context, taper)


DECODERS: dict[str, Callable[..., nn.Module]] = {
    "lwrefinenet": build_lwrefinenet,
    "unet": build_unet,
}
