"""The depth head: metres bounded by a parametrisation of the raw output, and optionally the std of ln depth."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densemtl.models.decoders import resize
from densemtl.models.heads import head_dropout, make_trunk

DEPTH_PARAMS = ("direct", "log", "inverse")


def depth_from_raw(raw: torch.Tensor, param: str, min_depth: float, max_depth: float) -> torch.Tensor:
    """Map the head's unbounded output to metres in ``[min_depth, max_depth]``.

    * ``direct``: ``min + softplus(raw)``, clamped at ``max``.
    * ``log``: ``exp`` of a sigmoid-bounded log-depth between ``log(min)`` and ``log(max)``.
    * ``inverse``: ``1 / inv`` with inverse depth sigmoid-bounded between ``1/max`` and ``1/min``.
    """
    if param == "direct":
        return (min_depth + F.softplus(raw)).clamp(max=max_depth)
    if param == "log":
        lo, hi = math.log(min_depth), math.log(max_depth)
        return torch.exp(lo + (hi - lo) * torch.sigmoid(raw)).clamp(min_depth, max_depth)
    if param == "inverse":
        lo, hi = 1.0 / max_depth, 1.0 / min_depth
        return (1.0 / (lo + (hi - lo) * torch.sigmoid(raw))).clamp(min_depth, max_depth)
    raise ValueError(f"model.depth_param={param!r} is not one of {DEPTH_PARAMS}")


def raw_for_depth(depth: float, param: str, min_depth: float, max_depth: float) -> float:
    """The raw value that :func:`depth_from_raw` maps to ``depth`` metres (used to initialise the bias)."""
    if param == "direct":
        return math.log(math.expm1(depth - min_depth))  # softplus^-1
    if param == "log":
        t = (math.log(depth) - math.log(min_depth)) / (math.log(max_depth) - math.log(min_depth))
    elif param == "inverse":
        t = (1.0 / depth - 1.0 / max_depth) / (1.0 / min_depth - 1.0 / max_depth)
    else:
        raise ValueError(f"model.depth_param={param!r} is not one of {DEPTH_PARAMS}")
    return math.log(t / (1.0 - t))  # sigmoid^-1


STD_MIN, STD_MAX = 1e-3, 3.0  # bounds of the predicted std of ln depth (0.1 % .. a factor e^3)
STD_INIT = 0.3  # initial std of ln depth (about 30 %)


def std_from_raw(raw: Tensor) -> Tensor:
    """Map the std channel's unbounded output to the std of ln depth, log-uniformly in [STD_MIN, STD_MAX]."""
    lo, hi = math.log(STD_MIN), math.log(STD_MAX)
    return torch.exp(lo + (hi - lo) * torch.sigmoid(raw))


def raw_for_std(std: float) -> float:
    """The raw value :func:`std_from_raw` maps to ``std`` (the std channel's initial bias)."""
    t = (math.log(std) - math.log(STD_MIN)) / (math.log(STD_MAX) - math.log(STD_MIN))
    return math.log(t / (1.0 - t))


class DepthHead(nn.Module):
    """Metric depth in metres, bounded to ``[min_depth, max_depth]``, and optionally its uncertainty.

    The raw output is mapped to metres at the decoder's resolution (stride 4), then resized to the input:
    bilinear resizing is a convex combination of neighbours, so every pixel still respects the bounds, and the
    exp/sigmoid/clamp passes run on 1/16 of the pixels (they were ~5% of ONNX Runtime time at 480x640 when
    they ran at full resolution). The last convolution starts with tiny weights and the bias of the geometric
    mean of the bounds.

    With ``uncertainty`` a second output channel is ``s``, the std of ln depth (so the depth's std is about
    ``depth * s`` metres), bounded by :data:`STD_MIN`/:data:`STD_MAX` and multiplied by the buffer
    ``calib_std_scale`` that ``densemtl calibrate`` fits on held-out data (1 until then).
    """

    def __init__(
        self,
        in_channels: int,
        param: str = "log",
        min_depth: float = 0.1,
        max_depth: float = 100.0,
        trunk: str = "light",
        hidden: int = 0,
        uncertainty: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"depth bounds need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.param, self.min_depth, self.max_depth = param, float(min_depth), float(max_depth)
        self.uncertainty = uncertainty
        self.trunk, width = make_trunk(in_channels, trunk, hidden)
        self.drop = head_dropout(dropout)
        self.out = nn.Conv2d(width, 2 if uncertainty else 1, 1)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.constant_(
            self.out.bias, raw_for_depth(math.sqrt(min_depth * max_depth), param, min_depth, max_depth)
        )
        if uncertainty:
            with torch.no_grad():
                self.out.bias[1] = raw_for_std(STD_INIT)
            self.register_buffer("calib_std_scale", torch.ones(()))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, in_channels, h, w) -> metres (B, 1, *size), or (B, 2, *size) [metres, std of ln depth]."""
        raw = self.out(self.drop(self.trunk(x)))  # (B, 1 or 2, h, w)
        metres = depth_from_raw(raw[:, :1], self.param, self.min_depth, self.max_depth)
        if self.uncertainty:
            metres = torch.cat([metres, std_from_raw(raw[:, 1:]) * self.calib_std_scale], dim=1)
        return resize(metres, size)
