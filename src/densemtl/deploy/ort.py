"""ONNX Runtime as an inference engine that looks like the PyTorch model: tensor in, ``{task: tensor}`` out.

``OnnxModel`` wraps an ``onnxruntime.InferenceSession`` in an ``nn.Module`` without parameters, so that the
:class:`~densemtl.inference.Predictor`, evaluation and benchmarks run an exported (or INT8) file through exactly
the code paths they use for PyTorch.

Execution providers: on a machine with ``onnxruntime-gpu`` (``pip install onnxruntime-gpu``), ``device="cuda"``
asks for TensorRT first (when ORT was built with it and TensorRT is installed), then CUDA, then CPU; ORT falls
back silently, so :attr:`OnnxModel.providers` says what was really used. ``device="cpu"`` uses the CPU provider
with ``threads`` intra-op threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.deploy.metadata import METADATA_VERSION, read_metadata, to_numpy
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import check_heads_current

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def session_options(threads: int = 0, spinning: bool = False) -> Any:
    """Session options: ``threads`` intra-op threads (0 = ORT's default, one per core), one inter-op thread.

    ``spinning=False`` stops idle worker threads from busy-waiting after each run: a little latency for not
    stealing the CPU from everything else (other engines in a benchmark, other processes).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = max(0, threads)
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3  # errors only
    return so


def providers_for(device: str = "cpu") -> list[str]:
    """Execution providers to ask for, best first, among those this ONNX Runtime build has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = (
        [*GPU_PROVIDERS, "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
    )
    if device.startswith("cuda") and not any(p in available for p in GPU_PROVIDERS):
        raise ValueError(
            f"device {device!r}: this onnxruntime has no CUDA/TensorRT provider ({available}); "
            "pip install onnxruntime-gpu, or use --device cpu"
        )
    return [p for p in wanted if p in available]


def create_session(path: str | Path, threads: int = 0, device: str = "cpu", spinning: bool = False) -> Any:
    """An ``InferenceSession`` for ``path`` (see :func:`session_options` and :func:`providers_for`)."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; create it with `densemtl export`")
    return ort.InferenceSession(
        str(path), session_options(threads, spinning), providers=providers_for(device)
    )


class OnnxModel(nn.Module):
    """An exported densemtl graph behind the PyTorch model's interface.

    ``forward`` takes RGB (B, 3, H, W) in [0, 1] like ``MultiTaskNet`` and returns ``{task: raw output}`` as the
    PyTorch model does (``Task.from_onnx``). It resizes in and out when the graph has a fixed size different
    from the input's. Files from before format version 2 (ImageNet-normalised input) are refused: re-export.
    """

    def __init__(self, session: Any, metadata: dict[str, Any], path: str | Path = "the ONNX file") -> None:
        super().__init__()
        if int(metadata.get("version", 1)) < METADATA_VERSION:
            raise ValueError(
                f"{path} was exported by an older densemtl (ImageNet-normalised input, metadata version "
                f"{metadata.get('version', 1)}); re-export it from its checkpoint with "
                "`densemtl export --checkpoint CKPT --out FILE.onnx`"
            )
        unknown = [t for t in metadata.get("tasks", ()) if t not in TASKS]
        if unknown:
            raise ValueError(f"{path} has outputs of unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
        # Files from before this field have the heads of checkpoint version 4 (docs/objects.md, Distance).
        check_heads_current(int(metadata.get("checkpoint_version", 4)), metadata.get("tasks", ()), path)
        self.session = session
        self.metadata = metadata
        self.tasks = tuple(metadata.get("tasks", ()))
        shape = session.get_inputs()[0].shape  # e.g. [1, 3, 256, 512] or ['batch', 3, 'height', 'width']
        self.fixed_size = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.output_names = [o.name for o in session.get_outputs()]

    @classmethod
    def from_file(
        cls, path: str | Path, threads: int = 0, device: str = "cpu", spinning: bool = False
    ) -> OnnxModel:
        """Open an exported file with its metadata."""
        return cls(create_session(path, threads, device, spinning), read_metadata(path), path)

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses."""
        return list(self.session.get_providers())

    def run(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph as it is on its own input convention; returns every output by name."""
        outputs = self.session.run(self.output_names, {"image": to_numpy(image)})
        return {n: torch.from_numpy(v) for n, v in zip(self.output_names, outputs, strict=True)}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> ``{task: tensor}`` at (H, W)."""
        h, w = x.shape[-2:]
        if self.fixed_size is not None and self.fixed_size != (h, w):
            x = F.interpolate(x, size=self.fixed_size, mode="bilinear", align_corners=False, antialias=True)
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            parts = [self.run(xi) for xi in x.split(self.fixed_batch)]
            raw = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        else:
            raw = self.run(x)
        out = {t: TASKS[t].from_onnx(raw) for t in self.tasks}
        out = {t: TASKS[t].upsample(v, (h, w)) for t, v in out.items()}  # no-op at the graph's own size
        return {k: v.to(x.device) for k, v in out.items()}
