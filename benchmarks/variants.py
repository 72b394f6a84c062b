"""The decoder/head variants that benchmarks/real_fit.py and benchmarks/pareto.py compare.

Each is a set of ``ModelConfig`` overrides on the LW-RefineNet decoder (widths fine to coarse at stride
4/8/16/32; CRP stages per level; head trunk). ``default`` is whatever ``ModelConfig()`` builds today, so the
benchmarks always measure the current default against the alternatives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from densemtl.config import ModelConfig

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # widths 32-64-128-128, CRP 0-2-2-4, light heads: the real-time default chosen from CPU latency alone
    "tapered128": {"decoder_channels": 128, "decoder_taper": True, "crp_stages": (0, 2, 2, 4), "head": "light"},
    # each task widens the shared 32-channel stride-4 map with its own separable conv-BN-ReLU to 128
    "tapered128+sep128": {
        "decoder_channels": 128, "decoder_taper": True, "crp_stages": (0, 2, 2, 4), "head": "separable",
        "head_channels": 128,
    },
    # 128 at every level: the stride-4 map the heads share is 4x wider
    "uniform128": {"decoder_channels": 128, "decoder_taper": False, "crp_stages": (0, 2, 2, 4), "head": "light"},
    # widths 64-128-256-256
    "tapered256": {"decoder_channels": 256, "decoder_taper": True, "crp_stages": (0, 2, 2, 4), "head": "light"},
    "uniform128+sep128": {
        "decoder_channels": 128, "decoder_taper": False, "crp_stages": (0, 2, 2, 4), "head": "separable",
        "head_channels": 128,
    },
    # heads with a 3x3 conv-BN-ReLU before the output, as in Nekrasov et al.'s code (here widening 32 -> 64)
    "tapered128+conv64": {
        "decoder_channels": 128, "decoder_taper": True, "crp_stages": (0, 2, 2, 4), "head": "conv",
        "head_channels": 64,
    },
    # CRP at every level, as in the paper
    "uniform128+crp": {"decoder_channels": 128, "decoder_taper": False, "crp_stages": (2, 2, 2, 2), "head": "light"},
    "uniform256": {"decoder_channels": 256, "decoder_taper": False, "crp_stages": (0, 2, 2, 4), "head": "light"},
    # the paper: 256 at every level, 4 CRP stages everywhere. Nekrasov et al.'s multi-task heads are a
    # per-channel 1x1 + ReLU6, then a 3x3 output convolution; ours (light) a per-channel 3x3 + ReLU, then a 1x1
    "paper256": {"decoder_channels": 256, "decoder_taper": False, "crp_stages": (4, 4, 4, 4), "head": "light"},
}  # fmt: skip


def variant_config(name: str, backbone: str, **fields: Any) -> ModelConfig:
    """``ModelConfig`` for variant ``name`` on ``backbone`` (semseg + depth unless ``fields`` says otherwise)."""
    base = ModelConfig(backbone=backbone, tasks=("semseg", "depth"))
    return dataclasses.replace(base, **{**VARIANTS[name], **fields})
