"""Building blocks shared by the task heads (each task's head lives in its module under ``densemtl.tasks``).

Heads are light on purpose: they run at the decoder's stride-4 resolution, once per task, so every layer here is
paid for as many times as there are tasks.
"""

from __future__ import annotations

from torch import nn


def light_trunk(channels: int) -> nn.Sequential:
    """Depthwise 3x3 conv + ReLU: local spatial context per task at almost no cost (no BatchNorm: at stride 4
    it would be one more full-resolution pass per head at inference)."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.ReLU(inplace=True))
