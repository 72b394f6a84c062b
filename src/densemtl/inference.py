"""Prediction: images in, per-task NumPy arrays out (``Predictor``), and the files ``densemtl predict`` writes.

Depth comes out in metres. A network learns depth for the focal length (in pixels) it was trained at: resizing the
input with ``size`` changes that focal length, so keep the training resolution unless you know the camera matches.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densemtl.data.images import ImageLike, as_rgb, list_images, read_rgb  # noqa: F401 (public here too)
from densemtl.fileio import atomic_write, check_output
from densemtl.runtime import forward_at_scale, resolve_device
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import (
    config_from_checkpoint,
    input_scale,
    load_checkpoint,
    model_from_checkpoint,
)

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.scene3d.bev import SceneOptions


TTA_MODES = ("none", "flip")


class Predictor:
    """A trained model ready to predict: ``Predictor.from_checkpoint(path).predict(image)``.

    ``predict`` returns ``{"semseg": uint8 (H, W) class ids, "confidence": float32 (H, W) softmax max,
    "depth": float32 (H, W) metres}`` at the input image's resolution (tasks the model lacks are absent).
    The network sees the image resized by ``scale`` (from the checkpoint: the resolution it was trained at), or
    at a fixed ``size`` when one is given.

    Epistemic uncertainty at inference, off by default (docs/uncertainty.md): ``tta="flip"`` also runs the
    mirrored image, ``mc_samples=N`` runs N passes with the heads' dropout active (a model trained with
    ``model.dropout > 0``); each task merges the passes (``Task.merge_samples``), folding their spread into its
    uncertainty outputs. The cost is :attr:`passes` forward passes per image.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        info: dict[str, Any],
        device: str | torch.device = "auto",
        size: tuple[int, int] | None = None,
        scale: float = 1.0,
        tta: str = "none",
        mc_samples: int = 0,
    ) -> None:
        if tta not in TTA_MODES:
            raise ValueError(f"tta={tta!r} is not one of {TTA_MODES} (--tta)")
        if mc_samples < 0 or mc_samples == 1:
            raise ValueError(f"mc_samples={mc_samples}: use 0 (off) or at least 2 samples (--mc-samples)")
        if mc_samples and not any(isinstance(m, torch.nn.Dropout2d) for m in getattr(model, "modules", list)()):
            raise ValueError(
                "--mc-samples needs a PyTorch model with dropout in its heads; this one has none (ONNX graphs "
                "drop it): train with --set model.dropout=0.1, or use --tta flip"
            )
        self.tta, self.mc_samples = tta, mc_samples
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.info = info
        self.class_names: list[str] = list(info.get("classes", []))
        self.palette = np.array(info.get("palette", []), dtype=np.uint8).reshape(-1, 3)
        self.size = size  # fixed network input (H, W), or None to resize by ``scale``
        self.scale = scale
        self.config: Config | None = None  # set by from_checkpoint/from_pretrained: lets save_pretrained save it

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str = "auto",
        size: tuple[int, int] | None = None,
        backend: str = "torch",
        threads: int = 0,
        *,
        engine: str | None = None,
        tta: str = "none",
        mc_samples: int = 0,
    ) -> Predictor:
        """Rebuild the checkpoint's own model (no dataset or config file needed).

        ``tta`` and ``mc_samples``: see the class docstring (MC dropout needs the PyTorch backend).

        ``backend="onnxruntime"`` exports it (parity-checked) and runs it in ONNX Runtime with ``threads``.
        ``engine`` is the deprecated name of ``backend`` ("engine" now means the training loop only).
        """
        if engine is not None:
            import warnings

            warnings.warn("engine= is deprecated, use backend=", DeprecationWarning, stacklevel=2)
            backend = engine
        ckpt = load_checkpoint(path)
        if backend == "onnxruntime":
            from densemtl.deploy.export import onnx_model_from_checkpoint

            dev = "cuda" if resolve_device(device).type == "cuda" else "cpu"
            model = onnx_model_from_checkpoint(path, threads, dev)
            return cls(model, ckpt["dataset"], "cpu", size, input_scale(ckpt), tta, mc_samples)  # CPU tensors
        if backend != "torch":
            raise ValueError(f"backend {backend!r} is not one of ('torch', 'onnxruntime')")
        model = model_from_checkpoint(ckpt, path)
        predictor = cls(model, ckpt["dataset"], device, size, input_scale(ckpt), tta, mc_samples)
        predictor.config = config_from_checkpoint(ckpt)
        return predictor

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        device: str = "auto",
        size: tuple[int, int] | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        tta: str = "none",
        mc_samples: int = 0,
    ) -> Predictor:
        """Load a pretrained folder (``densemtl save-pretrained``) or a Hugging Face Hub id ``org/name``.

        A Hub id downloads the folder's files into the Hugging Face cache (``revision``, ``cache_dir``), or uses
        the cached copy offline; without one it fails within seconds naming the local-folder alternative
        (docs/sharing.md). ``tta`` and ``mc_samples``: see the class docstring.
        """
        from densemtl.deploy.pretrained import load_pretrained

        model, info, cfg = load_pretrained(path_or_id, revision=revision, cache_dir=cache_dir)
        predictor = cls(model, info, device, size, info["input_scale"], tta, mc_samples)
        predictor.config = cfg
        return predictor

    @classmethod
    def from_onnx(
        cls, path: str | Path, size: tuple[int, int] | None = None, threads: int = 0, tta: str = "none"
    ) -> Predictor:
        """Run an exported (fp32 or INT8) file; class names, palette and input scale come from its metadata.

        A graph exported at a fixed size runs at that size unless ``size`` says otherwise.
        """
        from densemtl.deploy.ort import OnnxModel

        model = OnnxModel.from_file(path, threads)
        meta = model.metadata
        info = {**meta.get("dataset", {}), "classes": meta["classes"], "palette": meta["palette"]}
        return cls(model, info, "cpu", size or model.fixed_size, meta.get("input_scale", 1.0), tta)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the model predicts, in its output order."""
        return tuple(self.model.tasks)

    def _to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) -> (1, 3, H, W) float RGB in [0, 1], what the model (and its ONNX graph) takes."""
        x = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        return x[None].to(self.device)

    @torch.inference_mode()
    def predict(self, image: ImageLike, focal_px: float | None = None) -> dict[str, np.ndarray]:
        """Predict every task for one image; outputs are resized back to the image's size.

        Returns each task's results (``Task.outputs``), e.g. ``semseg`` uint8 (H, W) ids and ``confidence``
        float32 (H, W), ``depth`` float32 (H, W) metres, ``normals`` float32 (H, W, 3) unit vectors.
        ``focal_px``: the camera's focal length (pixels, in this image) when known; objects' distances use it
        (docs/objects.md), else they assume a 70-degree horizontal field of view.
        """
        rgb = as_rgb(image)
        return self.results(self.raw(rgb), rgb.shape[:2], focal_px)

    @torch.inference_mode()
    def raw(self, image: ImageLike) -> dict[str, torch.Tensor]:
        """Each task's raw output (batch of 1) as the model gives it at its input scale, flip-TTA and MC-dropout
        passes merged: what :meth:`predict` decodes (:meth:`results`)."""
        return self._sampled(self._to_tensor(as_rgb(image)))

    def results(
        self, out: dict[str, torch.Tensor], size: tuple[int, int], focal_px: float | None = None
    ) -> dict[str, np.ndarray]:
        """:meth:`predict`'s results from :meth:`raw`'s outputs, for an image of ``size`` (H, W)."""
        result: dict[str, np.ndarray] = {}
        for name, raw in out.items():
            task = TASKS[name]
            camera = {"focal_px": focal_px} if task.uses_focal else {}
            result.update(task.to_numpy(task.upsample(raw.float(), tuple(size)), self.info, **camera))
        return result


    @property
    def passes(self) -> int:
        """Forward passes per image: 2 with flip TTA, times the MC-dropout samples."""
        return (2 if self.tta == "flip" else 1) * max(1, self.mc_samples)

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
            return self.model(x)
        return forward_at_scale(self.model, x, self.scale)

    def _sampled(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pass, or the tasks' merge of the flip-TTA / MC-dropout passes, at the network's resolution."""
        if self.passes == 1:
            return self._forward(x)
        samples: dict[str, list[torch.Tensor]] = {}
        with mc_dropout(self.model, self.mc_samples > 0):
            for flip in (False, True) if self.tta == "flip" else (False,):
                for _ in range(max(1, self.mc_samples)):
                    out = self._forward(x.flip(-1) if flip else x)
                    for t, raw in out.items():
                        raw = raw.float()
                        samples.setdefault(t, []).append(TASKS[t].flip_output(raw) if flip else raw)
        return {t: TASKS[t].merge_samples(v) for t, v in samples.items()}


@contextmanager
def mc_dropout(model: Any, enabled: bool) -> Iterator[None]:
    """Run the model's dropout layers in training mode (and nothing else: BatchNorm stays in eval)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout2d)] if enabled else []
    for m in layers:
        m.train()
    try:
        yield
    finally:
        for m in layers:
            m.eval()


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def prediction_panel(
    rgb: np.ndarray, pred: dict[str, np.ndarray], info: dict[str, Any], tasks: tuple[str, ...]
) -> np.ndarray:
    """Side by side: RGB, then per task its picture (``Task.colorize``) and, when it predicts one, its
    uncertainty picture (``Task.uncertainty_picture``), uint8 (H, (1 + pictures) W, 3)."""
    pictures = [rgb]
    for t in tasks:
        pictures.append(TASKS[t].colorize(pred, rgb, info))
        unsure = TASKS[t].uncertainty_picture(pred, rgb, info)
        if unsure is not None:
            pictures.append(unsure)
    return np.concatenate(pictures, axis=1)


def write_prediction(
    out_dir: Path,
    stem: str,
    rgb: np.ndarray,
    pred: dict[str, np.ndarray],
    info: dict[str, Any],
    tasks: tuple[str, ...],
) -> dict[str, Path]:
    """Write every task's files for one prediction (``Task.files``: e.g. class ids, uint16 depth as the folder
    format stores it, normals) as ``<stem>_<name>.png``, its documents (``Task.documents``: the detected objects)
    as ``<stem>_<name>.json``, and the ``<stem>_panel.png`` picture."""
    arrays: dict[str, np.ndarray] = {}
    for t in tasks:
        arrays.update(TASKS[t].files(pred, rgb, info))
    arrays["panel"] = prediction_panel(rgb, pred, info, tasks)
    files: dict[str, Path] = {}
    for name, array in arrays.items():
        files[name] = out_dir / f"{stem}_{name}.png"
        atomic_write(files[name], _png(array))
    for t in tasks:
        for name, doc in TASKS[t].documents(pred, info).items():
            files[name] = out_dir / f"{stem}_{name}.json"
            atomic_write(files[name], (json.dumps(doc, indent=1) + "\n").encode())
    return files


def output_stems(paths: list[Path]) -> list[str]:
    """Where each image's outputs go under the output folder, with no two images sharing a name.

    The file's stem when every stem is distinct (``x.png`` -> ``x_semseg.png``, ...). When two differ only by
    folder (``dupA/x.png``, ``dupB/x.png``), each keeps its path relative to the images' common folder
    (``dupA/x_semseg.png``); when two differ only by extension, theirs stays in the name (``x_jpg``).
    """
    if len({p.stem for p in paths}) == len(paths):
        return [p.stem for p in paths]
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    relative = [p.relative_to(common) for p in absolute]
    stems = [r.with_suffix("").as_posix() for r in relative]
    clash = {s for s, n in Counter(stems).items() if n > 1}
    return [f"{s}_{r.suffix.lstrip('.')}" if s in clash else s for s, r in zip(stems, relative, strict=True)]


def _read_input(path: Path) -> np.ndarray:
    """``read_rgb``, with the file named when Pillow refuses a decompression bomb or memory runs out."""
    try:
        return read_rgb(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}; downscale the image (or raise PIL.Image.MAX_IMAGE_PIXELS for files "
                         "you trust)") from e  # fmt: skip
    except MemoryError as e:
        raise MemoryError(f"{path}: out of memory reading the image ({e}); downscale it") from e


def _image_focal(camera: SceneOptions | None, path: Path, size: tuple[int, int]) -> float | None:
    """The focal length (pixels) of the camera that took ``path``, or None: a broken meta JSON only stops the
    3-D outputs (which report it), not the prediction."""
    from densemtl.scene3d.scene import known_focal, sample_meta

    try:
        meta = sample_meta(path)
    except (ValueError, OSError):
        meta = {}
    return known_focal(camera, meta, size)


def predict_paths(
    checkpoint: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    device: str = "auto",
    size: tuple[int, int] | None = None,
    scene: SceneOptions | None = None,
    backend: str = "torch",
    *,
    engine: str | None = None,
    tta: str = "none",
    mc_samples: int = 0,
    camera: SceneOptions | None = None,
) -> list[dict[str, Path]]:
    """Run a checkpoint over images/folders and write per-image outputs into ``out``.

    ``tta``/``mc_samples`` add epistemic passes (see :class:`Predictor`); their cost is printed at the end.
    ``scene`` (a ``densemtl.scene3d.bev.SceneOptions``) adds the point cloud (PLY + NPZ) and/or BEV map per image.
    ``camera`` (default ``scene``): the options whose intrinsics or field of view, else the image's meta JSON,
    give objects' distances their focal length (``Predictor.predict(focal_px=...)``).
    ``backend``: "torch" or "onnxruntime" (the checkpoint exported to ONNX and run by ONNX Runtime);
    ``engine`` is its deprecated name. An image given twice is predicted once; images with the same name in
    different folders keep their folders under ``out`` (:func:`output_stems`), so no output replaces another.
    Returns one ``{name: path}`` per image written.
    """
    from tqdm.auto import tqdm

    out_dir = check_output(out, folder=True)  # a file there or a read-only place fails before the model loads
    unique: dict[str, Path] = {}
    for p in list_images(inputs):
        unique.setdefault(os.path.abspath(p), p)  # an image given twice (or via its folder) is predicted once
    paths = list(unique.values())
    predictor = Predictor.from_checkpoint(
        checkpoint, device, size, backend, engine=engine, tta=tta, mc_samples=mc_samples
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written, seconds = [], 0.0
    for path, stem in tqdm(list(zip(paths, output_stems(paths), strict=True)), desc="predict", disable=None):
        rgb = _read_input(path)
        start = time.perf_counter()
        pred = predictor.predict(rgb, focal_px=_image_focal(camera or scene, path, rgb.shape[:2]))
        seconds += time.perf_counter() - start
        files = write_prediction(out_dir, stem, rgb, pred, predictor.info, predictor.tasks)
        if scene is not None:
            from densemtl.scene3d.bev import write_scene_outputs

            files |= write_scene_outputs(out_dir, stem, path, rgb, pred, predictor.info, scene)
        written.append(files)
    if predictor.passes > 1 and written:
        print(
            f"uncertainty passes: {predictor.passes} forward passes per image (tta={predictor.tta}, "
            f"mc_samples={predictor.mc_samples}), {1000 * seconds / len(written):.0f} ms per image on average"
        )
    return written
