"""INT8 post-training quantisation of an exported graph with ONNX Runtime, and its accuracy cost.

Static quantisation (QDQ format): weights int8 per output channel, activations uint8 with ranges calibrated
(min/max) on real images of the dataset, preprocessed exactly as at inference (resized by the model's input
scale, RGB in [0, 1]: the graph normalises it itself). The accuracy change is measured by evaluating
the fp32 and the int8 file with the same metric code as ``densemtl evaluate``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densemtl.data.progress import track
from densemtl.deploy.metadata import read_metadata
from densemtl.deploy.progress import stage
from densemtl.fileio import atomic_write, check_output


def calibration_batches(
    onnx_path: str | Path, root: str | Path, n: int = 64, split: str = "train"
) -> list[np.ndarray]:
    """``n`` images of ``root/split`` (evenly spread) as the graph's input, (1, 3, H, W) float32 each."""
    import torch.nn.functional as F

    from densemtl.data.images import list_images, read_rgb

    _check_count(n)
    meta = read_metadata(onnx_path)
    folder = Path(root) / split / "images"
    if not folder.is_dir():
        raise FileNotFoundError(f"no calibration images: {folder} is not a folder (pass a dataset root)")
    paths = list_images([folder])
    picks = np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int))
    size, scale = meta["input"]["size"], meta.get("input_scale", 1.0)
    batches = []
    for i in picks:
        x = torch.from_numpy(np.array(read_rgb(paths[i]))).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        h, w = x.shape[-2:]
        target = size if not meta["input"]["dynamic"] else (round(h * scale), round(w * scale))
        x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False, antialias=True)
        x = (x / 255.0).clamp(0.0, 1.0)  # interpolation may overshoot slightly
        batches.append(np.ascontiguousarray(x.numpy(), dtype=np.float32))
    return batches


def _check_count(n: int) -> None:
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"the number of calibration images must be an integer >= 1 (-n), got {n!r}")


def random_batches(onnx_path: str | Path, n: int = 8) -> list[np.ndarray]:
    """Random RGB inputs in [0, 1] of the graph's size: enough to time an INT8 graph, useless for its accuracy."""
    meta = read_metadata(onnx_path)
    gen = np.random.default_rng(0)
    shape = (1, 3, *meta["input"]["size"])
    return [gen.random(shape).astype(np.float32) for _ in range(n)]


def quantize_onnx(
    onnx_path: str | Path,
    out: str | Path,
    calib_root: str | Path | None,
    n: int = 64,
    split: str = "train",
    progress: bool = True,
) -> Path:
    """Write an INT8 copy of ``onnx_path`` to ``out``, calibrated on ``n`` images of ``calib_root/split``.

    ``calib_root=None`` calibrates on random inputs (for latency benchmarks only). ``out`` is written atomically
    (temp file + rename); ``progress`` prints the stages and each calibration image to stderr.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: list[np.ndarray]) -> None:
            # ORT asks for the next image once it has run the previous one: the count is of images done
            every = max(1, len(batches) // 10)
            shown = track(batches, "calibration image", enabled=progress, unit="image", every=every)
            self.items = ({"image": b} for b in shown)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    _check_count(n)
    out = check_output(out)  # a folder, symlink or read-only place fails now, not after calibration
    source = "random inputs" if calib_root is None else f"{Path(calib_root) / split / 'images'}"
    stage(f"reading up to {n} calibration images ({source})", progress)
    if calib_root is None:
        batches = random_batches(onnx_path, min(n, 8))
    else:
        batches = calibration_batches(onnx_path, calib_root, n, split)
    meta_props = list(onnx.load(str(onnx_path), load_external_data=False).metadata_props)
    with tempfile.TemporaryDirectory() as tmp:
        pre, quantized = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        stage(f"preparing {onnx_path} (shape inference, fusions)", progress)
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)  # shape inference + fusions
        stage(f"calibrating on {len(batches)} images, then quantising", progress)
        quantize_static(
            str(pre), str(quantized), Reader(batches),
            quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
        proto = onnx.load(str(quantized))
    del proto.metadata_props[:]
    proto.metadata_props.extend(meta_props)  # class names, palette, units travel with the int8 file too
    meta = json.loads(next(p.value for p in meta_props if p.key == "densemtl"))
    meta["quantization"] = {
        "type": "int8 static QDQ",
        "calibration": str(calib_root or "random"),
        "images": len(batches),
    }
    next(p for p in proto.metadata_props if p.key == "densemtl").value = json.dumps(meta)
    return atomic_write(out, proto.SerializeToString())


def evaluate_onnx(
    onnx_path: str | Path, data_root: str | Path, split: str = "val", max_samples: int = 0, threads: int = 0
) -> dict[str, Any]:
    """Metrics of an exported file on a dataset split (the same code as ``densemtl evaluate``)."""
    from densemtl.config import Config, from_dict, replace
    from densemtl.data.loaders import build_dataset, make_loader
    from densemtl.deploy.ort import OnnxModel
    from densemtl.evaluation import run_evaluation
    from densemtl.metrics import summarize

    model = OnnxModel.from_file(onnx_path, threads=threads)
    meta = model.metadata
    cfg = from_dict(Config, meta["config"])
    cfg = replace(cfg, data=replace(cfg.data, root=str(data_root), max_samples=max_samples, num_workers=0))
    dataset = build_dataset(cfg, split, train=False)
    loader = make_loader(dataset, 1, False, 0, 0, torch.device("cpu"))
    info = {**meta.get("dataset", {}), "classes": meta["classes"], "palette": meta["palette"]}
    result = run_evaluation(model, loader, cfg, info, torch.device("cpu"), None, meta["input_scale"])
    return summarize(result["results"])


def accuracy_change(
    fp32: str | Path, int8: str | Path, data_root: str | Path, split: str = "val", max_samples: int = 0
) -> dict[str, Any]:
    """fp32 and int8 metrics on one split and their difference (int8 - fp32) per metric."""
    if not isinstance(max_samples, int | np.integer) or max_samples < 0:
        raise ValueError(
            f"max_samples (--eval-samples) must be an integer >= 0 (0 = all), got {max_samples!r}"
        )
    a = evaluate_onnx(fp32, data_root, split, max_samples)
    b = evaluate_onnx(int8, data_root, split, max_samples)
    delta = {k: b[k] - a[k] for k in a if k in b}
    return {"split": split, "max_samples": max_samples, "fp32": a, "int8": b, "delta": delta}
