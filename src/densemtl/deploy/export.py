"""ONNX export of a multi-task network with metadata and a parity guarantee against PyTorch.

The graph has one input ``image`` (B, 3, H, W) float32 RGB and named outputs ``semseg_logits`` (B, C, H, W),
optionally ``semseg`` (B, H, W) int64 class ids, and ``depth`` (B, 1, H, W) metres. With
``bake_normalization`` the input is raw pixel values in 0..255 and the ImageNet normalisation is part of the
graph; otherwise the input is ImageNet-normalised like the PyTorch model's. Everything a deployment needs to
read the outputs (class names, palette, depth units, the input scale the network was trained at, the input
convention, the model config) is stored as JSON in the model's ``metadata_props`` under ``"densemtl"``.

We use the TorchScript exporter (``dynamo=False``): it exports this network in ~2 s with dynamic batch and
spatial axes, while ``torch.export`` (``dynamo=True``) fails on the decoders' size-dependent resize.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densemtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from densemtl.deploy.metadata import FORMAT, METADATA_KEY, read_metadata, to_numpy  # noqa: F401 (public here too)
from densemtl.deploy.ort import OnnxModel

OPSET = 18
DEPTH_TOLERANCE_M = 1e-3  # parity: max abs depth error, metres
CLASS_AGREEMENT = 0.999  # parity: fraction of pixels with the same class id


class ExportWrapper(nn.Module):
    """Tensor in, tuple of named outputs out (ONNX needs a flat output list, not a dict).

    Args:
        model: returns ``{task: tensor}`` from an ImageNet-normalised (B, 3, H, W) image.
        class_ids: also output the argmax class ids ``semseg`` (B, H, W) int64.
        bake_normalization: the graph takes 0..255 RGB and normalises it itself.
    """

    def __init__(self, model: nn.Module, class_ids: bool = True, bake_normalization: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tasks = tuple(model.tasks)
        self.class_ids = class_ids and "semseg" in self.tasks
        self.bake_normalization = bake_normalization
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def output_names(self) -> list[str]:
        """Names of the outputs, in the order ``forward`` returns them."""
        names = []
        if "semseg" in self.tasks:
            names += ["semseg_logits"] + (["semseg"] if self.class_ids else [])
        return names + (["depth"] if "depth" in self.tasks else [])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> outputs named by :meth:`output_names`."""
        x = (image - self.mean) / self.std if self.bake_normalization else image
        out = self.model(x)
        result = []
        if "semseg" in out:
            result.append(out["semseg"])  # (B, C, H, W)
            if self.class_ids:
                result.append(out["semseg"].argmax(dim=1))  # (B, H, W) int64
        if "depth" in out:
            result.append(out["depth"])  # (B, 1, H, W) metres
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
    baked = wrapper.bake_normalization
    return {
        "format": FORMAT,
        "version": 1,
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
            "normalization": "baked" if baked else "external",
            "range": "0..255 (raw pixels)" if baked else "ImageNet-normalised: (rgb/255 - mean) / std",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
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
    """
    import onnx

    wrapper = ExportWrapper(model, class_ids, bake_normalization).eval()  # eval: never update BN stats
    x = torch.rand(1, 3, *size) * (255.0 if bake_normalization else 1.0)
    names = wrapper.output_names()
    axes = None
    if dynamic:
        axes = {"image": {0: "batch", 2: "height", 3: "width"}}
        for n in names:
            axes[n] = (
                {0: "batch", 1: "height", 2: "width"}
                if n == "semseg"
                else {0: "batch", 2: "height", 3: "width"}
            )
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    return out


@torch.no_grad()
def check_parity(
    model: nn.Module, onnx_path: str | Path, images: torch.Tensor, threads: int = 0
) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch on ``images`` (N, 3, H, W) ImageNet-normalised, one at a time.

    Returns the max abs depth error (metres), the fraction of pixels with equal class ids, and ``passed``
    (depth error <= 1e-3 m and class agreement >= 99.9%).
    """
    model = model.eval()
    ort_model = OnnxModel.from_file(onnx_path, threads=threads)
    depth_err, same, total = 0.0, 0, 0
    for x in images.split(1):
        ref, got = model(x), ort_model(x)
        if "depth" in ref:
            depth_err = max(depth_err, float((ref["depth"] - got["depth"]).abs().max()))
        if "semseg" in ref:
            same += int((ref["semseg"].argmax(1) == got["semseg"].argmax(1)).sum())
            total += ref["semseg"][:, 0].numel()
    agreement = same / total if total else 1.0
    return {
        "images": int(images.shape[0]),
        "depth_max_abs_err_m": depth_err,
        "class_agreement": agreement,
        "passed": depth_err <= DEPTH_TOLERANCE_M and agreement >= CLASS_AGREEMENT,
    }


def parity_images(
    data_root: str | Path | None, size: tuple[int, int], n: int = 4
) -> tuple[torch.Tensor, str]:
    """``n`` real validation images resized to ``size`` and normalised, or random ones when there is no data."""
    from densemtl.data.images import list_images, read_rgb
    from densemtl.data.transforms import normalize

    root = Path(data_root) if data_root else None
    for split in ("val", "train"):
        if root is not None and (root / split / "images").is_dir():
            paths = list_images([root / split / "images"])[:n]
            x = torch.stack(
                [torch.from_numpy(np.array(read_rgb(p))).permute(2, 0, 1).float() / 255 for p in paths]
            )
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            return normalize(x), f"{root / split}"
    gen = torch.Generator().manual_seed(0)
    return normalize(torch.rand(n, 3, *size, generator=gen)), "random"


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
) -> dict[str, Any]:
    """Export a checkpoint to ONNX and check parity with PyTorch on real images of its dataset.

    Raises ``ValueError`` when parity fails (the file is kept for inspection). Returns a report dict.
    """
    from densemtl.train.checkpoint import (
        config_from_checkpoint,
        input_scale,
        load_checkpoint,
        model_from_checkpoint,
    )

    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, checkpoint).eval()
    root = data_root if data_root is not None else config_from_checkpoint(ckpt).data.root
    size = size or default_size(ckpt, root)
    wrapper = ExportWrapper(model, class_ids, bake_normalization)
    meta = build_metadata(wrapper, size, dynamic, ckpt.get("dataset"), input_scale(ckpt), ckpt["config"])
    path = export_model(model, out, size, dynamic, bake_normalization, class_ids, meta)
    report: dict[str, Any] = {"onnx": str(path), "size": list(size), "dynamic": dynamic, "metadata": meta}
    report["file_mb"] = path.stat().st_size / 2**20
    if parity:
        images, source = parity_images(root, size)
        report["parity"] = {**check_parity(model, path, images), "inputs": source}
        if not report["parity"]["passed"]:
            raise ValueError(f"{path}: ONNX Runtime does not match PyTorch: {report['parity']}")
    return report


def onnx_model_from_checkpoint(path: str | Path, threads: int = 0, device: str = "cpu") -> OnnxModel:
    """Export a checkpoint (dynamic axes, parity-checked) to a temporary file and open it in ONNX Runtime."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_checkpoint(path, onnx_path, dynamic=True, class_ids=False)
        return OnnxModel.from_file(onnx_path, threads, device)  # the session holds the graph in memory
