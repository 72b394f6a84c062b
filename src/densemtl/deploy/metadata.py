"""What an exported ONNX file says about itself: the ``densemtl`` metadata JSON, and the array hand-over to ORT.

Kept apart from export so that the ONNX Runtime backend can read a file without importing the exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

METADATA_KEY = "densemtl"
FORMAT = "densemtl-onnx"
METADATA_VERSION = 2  # 2: the graph takes RGB in [0, 1] and normalises it itself


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``densemtl`` metadata JSON of an exported file (without loading the weights into a session)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata; export it with `densemtl export`")
    return json.loads(props[METADATA_KEY])


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Contiguous float32 NumPy array (what ONNX Runtime expects)."""
    return np.ascontiguousarray(x.detach().cpu().float().numpy())
