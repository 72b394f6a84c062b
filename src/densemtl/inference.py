"""Prediction: images in, per-task NumPy arrays out (``Predictor``), and the files ``densemtl predict`` writes.

Depth comes out in metres. A network learns depth for the focal length (in pixels) it was trained at: resizing the
input with ``size`` changes that focal length, so keep the training resolution unless you know the camera matches.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densemtl.data.format import atomic_write_bytes, encode_depth
from densemtl.data.images import ImageLike, as_rgb, list_images, read_rgb  # noqa: F401 (public here too)
from densemtl.runtime import forward_at_scale, resolve_device
from densemtl.train.checkpoint import input_scale, load_checkpoint, model_from_checkpoint

if TYPE_CHECKING:
    from densemtl.scene3d.bev import SceneOptions

class Predictor:
    """A trained model ready to predict: ``Predictor.from_checkpoint(path).predict(image)``.

    ``predict`` returns ``{"semseg": uint8 (H, W) class ids, "confidence": float32 (H, W) softmax max,
    "depth": float32 (H, W) metres}`` at the input image's resolution (tasks the model lacks are absent).
    The network sees the image resized by ``scale`` (from the checkpoint: the resolution it was trained at), or
    at a fixed ``size`` when one is given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: dict[str, Any],
        device: str | torch.device = "auto",
        size: tuple[int, int] | None = None,
        scale: float = 1.0,
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.info = info
        self.class_names: list[str] = list(info.get("classes", []))
        self.palette = np.array(info.get("palette", []), dtype=np.uint8).reshape(-1, 3)
        self.size = size  # fixed network input (H, W), or None to resize by ``scale``
        self.scale = scale

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        size: tuple[int, int] | None = None,
        engine: str = "torch",
        threads: int = 0,
    ) -> Predictor:
        """Rebuild the checkpoint's own model (no dataset or config file needed).

        ``engine="onnxruntime"`` exports it (parity-checked) and runs it in ONNX Runtime with ``threads``.
        """
        ckpt = load_checkpoint(path)
        if engine == "onnxruntime":
            from densemtl.deploy.export import onnx_model_from_checkpoint

            dev = "cuda" if resolve_device(device).type == "cuda" else "cpu"
            model = onnx_model_from_checkpoint(path, threads, dev)
            return cls(model, ckpt["dataset"], "cpu", size, input_scale(ckpt))  # ORT returns CPU tensors
        if engine != "torch":
            raise ValueError(f"engine {engine!r} is not one of ('torch', 'onnxruntime')")
        return cls(model_from_checkpoint(ckpt, path), ckpt["dataset"], device, size, input_scale(ckpt))

    @classmethod
    def from_onnx(cls, path: str | Path, size: tuple[int, int] | None = None, threads: int = 0) -> Predictor:
        """Run an exported (fp32 or INT8) file; class names, palette and input scale come from its metadata.

        A graph exported at a fixed size runs at that size unless ``size`` says otherwise.
        """
        from densemtl.deploy.ort import OnnxModel

        model = OnnxModel.from_file(path, threads)
        meta = model.metadata
        info = {**meta.get("dataset", {}), "classes": meta["classes"], "palette": meta["palette"]}
        return cls(model, info, "cpu", size or model.fixed_size, meta.get("input_scale", 1.0))

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        from densemtl.data.transforms import normalize

        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return normalize(x)[None].to(self.device)  # (1, 3, H, W)

    @torch.inference_mode()
    def predict(self, image: ImageLike) -> dict[str, np.ndarray]:
        """Predict every task for one image; outputs are resized back to the image's size."""
        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        x = self._to_tensor(rgb)
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            out = self.model(x)
        else:
            out = forward_at_scale(self.model, x, self.scale)
        result: dict[str, np.ndarray] = {}
        if "semseg" in out:
            logits = out["semseg"].float()
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            prob = logits.softmax(dim=1)[0]
            conf, ids = prob.max(dim=0)
            result["semseg"] = ids.to(torch.uint8).cpu().numpy()
            result["confidence"] = conf.cpu().numpy().astype(np.float32)
        if "depth" in out:
            depth = out["depth"].float()
            if depth.shape[-2:] != (h, w):
                depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=False)
            result["depth"] = depth[0, 0].cpu().numpy().astype(np.float32)
        return result


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def prediction_panel(
    rgb: np.ndarray, pred: dict[str, np.ndarray], palette: np.ndarray, max_depth: float | None = None
) -> np.ndarray:
    """Side-by-side RGB | segmentation overlay | coloured depth (uint8 (H, 3W, 3) or fewer panels)."""
    from densemtl.viz.colors import colorize_depth, colorize_labels, overlay

    panels = [rgb]
    if "semseg" in pred:
        panels.append(overlay(rgb, colorize_labels(pred["semseg"], palette), alpha=0.6))
    if "depth" in pred:
        panels.append(colorize_depth(pred["depth"], vmin=1.0, vmax=max_depth, log=True))
    return np.concatenate(panels, axis=1)


def write_prediction(
    out_dir: Path,
    stem: str,
    rgb: np.ndarray,
    pred: dict[str, np.ndarray],
    palette: np.ndarray,
    max_depth: float | None = None,
) -> dict[str, Path]:
    """Write the files for one prediction; depth PNG = uint16 metres * 256 (0 invalid), as the folder format."""
    from densemtl.viz.colors import colorize_depth, colorize_labels, overlay

    files: dict[str, Path] = {}

    def put(name: str, array: np.ndarray) -> None:
        files[name] = out_dir / f"{stem}_{name}.png"
        atomic_write_bytes(files[name], _png(array))

    if "semseg" in pred:
        colors = colorize_labels(pred["semseg"], palette)
        put("semseg", pred["semseg"])
        put("semseg_color", colors)
        put("overlay", overlay(rgb, colors, alpha=0.6))
    if "depth" in pred:
        put("depth", encode_depth(np.minimum(pred["depth"], 255.0)))
        put("depth_color", colorize_depth(pred["depth"], vmin=1.0, vmax=max_depth, log=True))
    put("panel", prediction_panel(rgb, pred, palette, max_depth))
    return files


def predict_paths(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    device: str = "auto",
    size: tuple[int, int] | None = None,
    scene: SceneOptions | None = None,
    engine: str = "torch",
) -> list[dict[str, Path]]:
    """Run a checkpoint over images/folders and write per-image outputs into ``out``.

    ``scene`` (a ``densemtl.scene3d.bev.SceneOptions``) adds the point cloud (PLY + NPZ) and/or BEV map per image.
    ``engine``: "torch" or "onnxruntime" (the checkpoint exported to ONNX and run by ONNX Runtime).
    """
    from tqdm.auto import tqdm

    predictor = Predictor.from_checkpoint(checkpoint, device=device, size=size, engine=engine)
    max_depth = float(predictor.info.get("depth", {}).get("max", 80.0))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(list_images(inputs), desc="predict", disable=None):
        rgb = read_rgb(path)
        pred = predictor.predict(rgb)
        files = write_prediction(out_dir, path.stem, rgb, pred, predictor.palette, max_depth)
        if scene is not None:
            from densemtl.scene3d.bev import write_scene_outputs

            files |= write_scene_outputs(
                out_dir, path.stem, path, rgb, pred, predictor.palette, predictor.class_names, scene
            )
        written.append(files)
    return written
