"""The model table behind ``densemtl models``: parameters and GFLOPs of every backbone x decoder x sharing.

Models are built on the ``meta`` device, so counting needs no memory and no arithmetic: the whole table takes
seconds. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` and count 2 per multiply-add
(convolutions, matmuls); elementwise ops, pooling and resizing are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import ModelConfig
from densemtl.models.backbones import BACKBONES
from densemtl.models.decoders import DECODERS
from densemtl.models.multitask import SHARING_MODES, build_model

TABLE_CLASSES = 8  # the default tasks with 8 classes, the synthetic dataset's size


def describe(cfg: ModelConfig, size: tuple[int, int] = (480, 640)) -> dict[str, Any]:
    """Parameters (millions) and GFLOPs of the model ``cfg`` for one (1, 3, *size) image."""
    with torch.device("meta"):
        model = build_model(cfg).eval()
        x = torch.empty(1, 3, *size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return {
        "backbone": cfg.backbone,
        "decoder": cfg.decoder,
        "sharing": cfg.sharing,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": counter.get_total_flops() / 1e9,
        "size": f"{size[0]}x{size[1]}",
    }


def model_table(size: tuple[int, int] = (480, 640)) -> list[dict[str, Any]]:
    """One row per backbone x decoder x sharing for the default tasks (``ModelConfig().tasks``, 8 classes) at
    ``size`` (H, W)."""
    base = ModelConfig(num_classes=TABLE_CLASSES)  # default tasks
    rows = []
    for backbone in BACKBONES:
        for decoder in DECODERS:
            for sharing in SHARING_MODES:
                cfg = ModelConfig(
                    **{**base.__dict__, "backbone": backbone, "decoder": decoder, "sharing": sharing}
                )
                rows.append(describe(cfg, size))
    return rows


def format_model_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table of :func:`model_table` rows."""
    if not rows:
        return "(no models)"
    header = ["backbone", "decoder", "sharing", "params (M)", f"GFLOPs @ {rows[0]['size']}"]
    body = [
        [r["backbone"], r["decoder"], r["sharing"], f"{r['params_m']:.2f}", f"{r['gflops']:.2f}"]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:3], widths[:3], strict=True)]
        right = [c.rjust(w) for c, w in zip(cells[3:], widths[3:], strict=True)]
        return "  ".join(left + right)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)])
