"""ONNX export of a multi-task network with metadata and a parity guarantee against PyTorch.

The graph has one input ``image`` (B, 3, H, W) float32 RGB in [0, 1] (the model normalises it itself) and the
named outputs of each of its tasks (``Task.onnx_outputs``): e.g. ``semseg_logits`` (B, C, H, W) and optionally
``semseg`` (B, H, W) int64 class ids, ``depth`` (B, 1, H, W) metres, ``normals`` (B, 3, H, W) unit vectors.
Everything a deployment needs to read the outputs (tasks, output names, class names, palette, depth units, the
input scale the network was trained at, the input convention, the model config) is stored as JSON in the
model's ``metadata_props`` under ``"densemtl"``.

We use the TorchScript exporter (``dynamo=False``): it exports this network in ~2 s with dynamic batch and
spatial axes, while ``torch.export`` (``dynamo=True``) fails on the decoders' size-dependent resize.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densemtl.deploy.metadata import (  # noqa: F401 (public here too)
    FORMAT,
    METADATA_KEY,
    METADATA_VERSION,
    read_metadata,
    to_numpy,
)
from densemtl.deploy.ort import OnnxModel
from densemtl.deploy.progress import stage
from densemtl.fileio import atomic_write, check_output
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import CHECKPOINT_VERSION

log = logging.getLogger("densemtl")
OPSET = 18


class ExportWrapper(nn.Module):
    """Tensor in, tuple of named outputs out (ONNX needs a flat output list, not a dict).

    Args:
        model: returns ``{task: tensor}`` from an RGB (B, 3, H, W) image in [0, 1].
        class_ids: also output convenience outputs such as the argmax class ids (``Task.onnx_outputs`` extras).
    """

    def __init__(self, model: nn.Module, class_ids: bool = True) -> None:
        super().__init__()
        self.model = model
        self.tasks = tuple(model.tasks)
        self.class_ids = class_ids
        self._axes: dict[str, dict[int, str]] | None = None

    def output_axes(self) -> dict[str, dict[int, str]]:
        """Every output's dynamic axes, by name, in the order ``forward`` returns them.

        A task's outputs can depend on its head (e.g. depth adds ``depth_std`` when it predicts uncertainty), so
        they are read from one small forward pass in eval mode.
        """
        if self._axes is None:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                out = self.model(torch.rand(1, 3, 64, 64))
            self.model.train(was_training)
            self._axes = {}
            for t in self.tasks:
                self._axes.update(TASKS[t].onnx_axes(out[t], self.class_ids))
        return self._axes

    def output_names(self) -> list[str]:
        """Names of the outputs, in the order ``forward`` returns them."""
        return list(self.output_axes())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> outputs named by :meth:`output_names`."""
        out = self.model(image)
        result: list[torch.Tensor] = []
        for t in self.tasks:
            result += TASKS[t].onnx_outputs(out[t], self.class_ids).values()
        return tuple(result)


def build_metadata(
    wrapper: ExportWrapper,
    size: tuple[int, int],
    dynamic: bool,
    info: dict[str, Any] | None = None,
    input_scale: float = 1.0,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON stored in the ONNX file: how to feed the graph and read its outputs."""
    info = info or {}
    return {
        "format": FORMAT,
        "version": METADATA_VERSION,
        "checkpoint_version": CHECKPOINT_VERSION,  # what its heads' outputs mean (train.checkpoint)
        "tasks": list(wrapper.tasks),
        "outputs": wrapper.output_names(),
        "classes": list(info.get("classes", [])),
        "palette": [list(map(int, c)) for c in info.get("palette", [])],
        "depth_units": "metres",
        "input": {
            "name": "image",
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "normalization": "in-model",
            "range": "RGB in [0, 1] (pixel / 255); the graph normalises it itself",
            "size": list(size),
            "dynamic": dynamic,
        },
        "input_scale": float(input_scale),
        "dataset": info,
        "config": config or {},
    }


def export_model(
    model: nn.Module,
    out: str | Path,
    size: tuple[int, int],
    dynamic: bool = False,
    bake_normalization: bool = False,
    class_ids: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` to ``out`` (ONNX, opset 18), attach ``metadata`` and run ``onnx.checker``.

    ``size`` (H, W) is the traced input size; with ``dynamic`` the batch, height and width axes are free.
    ``bake_normalization`` is accepted for old scripts and does nothing: every graph now normalises its input.
    The file is written atomically (temp file + rename): an existing ``out`` is replaced whole or not at all.
    """
    import onnx

    check_size(size)
    out = check_output(out)  # a folder, symlink or read-only place fails now, not after the trace
    if bake_normalization:
        log.warning(
            "bake_normalization is no longer needed: the model normalises its [0, 1] RGB input itself"
        )
    wrapper = ExportWrapper(model, class_ids).eval()  # eval: never update BN stats
    x = torch.rand(1, 3, *size)
    axes_by_name = wrapper.output_axes()
    names = list(axes_by_name)
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, **axes_by_name} if dynamic else None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TorchScript exporter deprecation and tracer warnings
        torch.onnx.export(
            wrapper, (x,), buf, dynamo=False, opset_version=OPSET, input_names=["image"],
            output_names=names, dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    meta = metadata or build_metadata(wrapper, size, dynamic)
    entries = {METADATA_KEY: json.dumps(meta), "classes": json.dumps(meta.get("classes", []))}
    entries.update(palette=json.dumps(meta.get("palette", [])), depth_units="metres")
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "densemtl"
    onnx.checker.check_model(proto, full_check=True)
    return atomic_write(out, proto.SerializeToString())


def check_size(size: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless ``size`` is a (height, width) pair of positive integers."""
    ok = len(size) == 2 and all(isinstance(v, int | np.integer) and v > 0 for v in size)
    if not ok:
        raise ValueError(f"input size must be (height, width) in pixels, both > 0, got {size!r}")


@torch.no_grad()
def check_parity(
    model: nn.Module, onnx_path: str | Path, images: torch.Tensor, threads: int = 0
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``images`` (N, 3, H, W) RGB in [0, 1], one at a time.

    Every task compares its own outputs (``Task.parity``: e.g. the fraction of pixels with equal class ids
    >= 99.9%, the max abs depth error <= 1 mm, normals within 0.5 degrees on >= 99.9% of pixels); ``passed``
    is True when every task passes.
    """
    model = model.eval()
    ort_model = OnnxModel.from_file(onnx_path, threads=threads)
    refs: dict[str, list[torch.Tensor]] = {t: [] for t in model.tasks}
    gots: dict[str, list[torch.Tensor]] = {t: [] for t in model.tasks}
    for x in images.split(1):
        ref, got = model(x), ort_model(x)
        for t in model.tasks:
            refs[t].append(ref[t].float())
            gots[t].append(got[t].float())
    report: dict[str, Any] = {"images": int(images.shape[0])}
    passed = True
    for t in model.tasks:
        figures, ok = TASKS[t].parity(torch.cat(refs[t]), torch.cat(gots[t]))
        report.update(figures)
        passed = passed and ok
    report["passed"] = passed
    return report


def parity_images(
    data_root: str | Path | None, size: tuple[int, int], n: int = 4
) -> tuple[torch.Tensor, str]:
    """``n`` real validation images resized to ``size`` as RGB in [0, 1], or random ones without data."""
    from densemtl.data.images import list_images, read_rgb

    root = Path(data_root) if data_root else None
    for split in ("val", "train"):
        if root is not None and (root / split / "images").is_dir():
            paths = list_images([root / split / "images"])[:n]
            x = torch.stack(
                [torch.from_numpy(np.array(read_rgb(p))).permute(2, 0, 1).float() / 255 for p in paths]
            )
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            return x.clamp(0.0, 1.0), f"{root / split}"
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, *size, generator=gen), "random"


def default_size(ckpt: dict[str, Any], data_root: str | Path | None) -> tuple[int, int]:
    """Network input size: a dataset image (or the training crop) scaled by the checkpoint's input scale."""
    from densemtl.data.images import list_images, read_rgb
    from densemtl.train.checkpoint import config_from_checkpoint, input_scale

    cfg = config_from_checkpoint(ckpt)
    h, w = cfg.data.crop
    images = Path(data_root) / "val" / "images" if data_root else None
    if images is not None and images.is_dir():
        h, w = read_rgb(list_images([images])[0]).shape[:2]
    s = input_scale(ckpt)
    return max(1, round(h * s)), max(1, round(w * s))


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    size: tuple[int, int] | None = None,
    dynamic: bool = False,
    bake_normalization: bool = False,
    class_ids: bool = True,
    data_root: str | Path | None = None,
    parity: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX and check parity with PyTorch on real images of its dataset.

    Raises ``ValueError`` when parity fails (the file is kept for inspection). Returns a report dict.
    ``progress`` prints each stage to stderr.
    """
    from densemtl.train.checkpoint import (
        config_from_checkpoint,
        input_scale,
        load_checkpoint,
        model_from_checkpoint,
    )

    check_output(out)
    if data_root is not None and not Path(data_root).is_dir():
        raise FileNotFoundError(f"dataset root {data_root} for the parity images is not a folder: fix --data")
    stage(f"loading {checkpoint}", progress)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    root = data_root if data_root is not None else config_from_checkpoint(ckpt).data.root
    size = size or default_size(ckpt, root)
    wrapper = ExportWrapper(model, class_ids)
    meta = build_metadata(wrapper, size, dynamic, ckpt.get("dataset"), input_scale(ckpt), ckpt["config"])
    stage(f"exporting to ONNX at {size[0]}x{size[1]} (opset {OPSET}) and checking the graph", progress)
    path = export_model(model, out, size, dynamic, bake_normalization, class_ids, meta)
    report: dict[str, Any] = {"onnx": str(path), "size": list(size), "dynamic": dynamic, "metadata": meta}
    report["file_mb"] = path.stat().st_size / 2**20
    if parity:
        images, source = parity_images(root, size)
        stage(f"checking ONNX Runtime against PyTorch on {len(images)} images ({source})", progress)
        report["parity"] = {**check_parity(model, path, images), "inputs": source}
        if not report["parity"]["passed"]:
            raise ValueError(f"{path}: ONNX Runtime does not match PyTorch: {report['parity']}")
    return report


def onnx_model_from_checkpoint(path: str | Path, threads: int = 0, device: str = "cpu") -> OnnxModel:
    """Export a checkpoint (dynamic axes, parity-checked) to a temporary file and open it in ONNX Runtime."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_checkpoint(path, onnx_path, dynamic=True, class_ids=False, progress=False)
        return OnnxModel.from_file(onnx_path, threads, device)  # the session holds the graph in memory
