"""Building blocks shared by the task heads (each task's head lives in its module under ``densemtl.tasks``).

Heads run at the decoder's stride-4 resolution, once per task, so every layer here is paid for as many times as
there are tasks. Two trunks (the layers before a head's output convolution), chosen with ``model.head``:

* ``light``: depthwise 3x3 + ReLU, local spatial context at almost no cost;
* ``separable``: depthwise 3x3, then a 1x1 conv-BN-ReLU to ``model.head_channels``: each task gets its own
  mixing (and widening) of the shared channels, which the light trunk (one filter per channel) cannot do, at a
  ninth of a full 3x3 convolution's cost;
* ``conv``: a full 3x3 conv-BN-ReLU (optionally wider, ``model.head_channels``), as in the heads of Nekrasov et
  al.'s multi-task RefineNet code.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

HEAD_KINDS = ("light", "separable", "conv")


def light_trunk(channels: int) -> nn.Sequential:
    """Depthwise 3x3 conv + ReLU: local spatial context per task at almost no cost (no BatchNorm: at stride 4
    it would be one more full-resolution pass per head at inference)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU(inplace=True))


def conv_trunk(channels: int, hidden: int) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm + ReLU from ``channels`` to ``hidden`` channels."""
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)
    )


def separable_trunk(channels: int, hidden: int) -> nn.Sequential:
    """Depthwise 3x3 (spatial context per channel) + 1x1 conv (no bias) + BatchNorm + ReLU to ``hidden``."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        nn.Conv2d(channels, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
    )


_TRUNKS: dict[str, Callable[[int, int], nn.Module]] = {
    "light": lambda channels, hidden: light_trunk(channels),
    "separable": separable_trunk,
    "conv": conv_trunk,
}


def make_trunk(channels: int, kind: str = "light", hidden: int = 0) -> tuple[nn.Module, int]:
    """A head trunk and its output width (the head's output convolution takes that many channels).

    Args:
        channels: the decoder's output width.
        kind: one of :data:`HEAD_KINDS` (``model.head``).
        hidden: the separable/conv trunk's width (0 = ``channels``); the light trunk keeps ``channels``.
    """
    if kind not in _TRUNKS:
        raise ValueError(f"model.head={kind!r} is not one of {HEAD_KINDS}")
    if hidden < 0:
        raise ValueError(f"model.head_channels must be >= 0 (0 = the decoder's width), got {hidden}")
    width = channels if kind == "light" or hidden == 0 else hidden
    return _TRUNKS[kind](channels, width), width


def head_dropout(p: float) -> nn.Module:
    """``Dropout2d(p)`` before a head's output convolution (``model.dropout``), or a no-op when ``p`` is 0.

    Dropping whole channels of the trunk's output is what MC dropout samples at inference (``--mc-samples``).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {p}")
    return nn.Dropout2d(p) if p > 0 else nn.Identity()
