"""Cityscapes: the official layout read directly (``CityscapesDataset``) or converted to the folder format.

Layout (as downloaded: leftImg8bit_trainvaltest, gtFine_trainvaltest, disparity_trainvaltest, camera_trainvaltest)::

    <src>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png   RGB 2048x1024
    <src>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png    uint8 label ids 0..33
    <src>/disparity/<split>/<city>/<city>_<seq>_<frame>_disparity.png       uint16, see below
    <src>/camera/<split>/<city>/<city>_<seq>_<frame>_camera.json            baseline (m), fx, fy, u0, v0 (px)

Disparity: p = 0 is invalid, else d = (p - 1) / 256 pixels; metric depth = baseline * fx / d metres (each
image's own camera JSON). Labels: the 34 label ids map to the 19 training ids (255 = ignore) of the official
label table, or to 7 categories (flat, construction, object, nature, sky, human, vehicle) as used by multi-task
benchmarks; only labels evaluated in the 19-class benchmark get a category, the rest (void, parking,
rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer) are ignored, as in the official category
evaluation. Counts: train 2975, val 500, test 1525 (test labels are not public).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from densemtl.data.format import DEPTH_MAX_ENCODABLE, DatasetFormatError, write_dataset_json
from densemtl.data.objects import OBJECT_CLASSES_KEY
from densemtl.data.progress import track
from densemtl.datasets.common import crop_fractions, read_raw, read_rgb, write_converted
from densemtl.datasets.labels import LABELS, class_names, label_lut, palette  # noqa: F401 (re-exported)
from densemtl.datasets.objects_cityscapes import load_objects, object_classes
from densemtl.tasks import IGNORE_INDEX, TASKS

SPLIT_COUNTS = {"train": 2975, "val": 500, "test": 1525}
DEPTH_MAX = 80.0  # metres: evaluation cap and dataset.json "max" (stereo depth far beyond is noise)


def read_camera(path: str | Path) -> dict[str, float]:
    """``{"baseline": m, "fx", "fy", "cx", "cy": px}`` from a Cityscapes camera JSON."""
    try:
        cam = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e}); restore it from camera_trainvaltest") from e
    try:
        ext, k = cam["extrinsic"], cam["intrinsic"]
        return {"baseline": float(ext["baseline"]), "fx": float(k["fx"]), "fy": float(k["fy"]),
                "cx": float(k["u0"]), "cy": float(k["v0"])}  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: not a Cityscapes camera file (needs extrinsic.baseline, intrinsic.fx/u0/v0)"
        ) from e


def disparity_to_depth(raw: np.ndarray, baseline: float, fx: float, max_depth: float = 250.0) -> np.ndarray:
    """uint16 disparity PNG values -> float32 metres; p = 0, p = 1 (d = 0) and depth > ``max_depth`` -> 0.

    d = (p - 1) / 256 pixels, depth = baseline * fx / d. Far depth is invalidated (not clipped) because a
    disparity of a pixel or two is within the matcher's noise and would not fit the uint16 / 256 encoding.
    """
    p = raw.astype(np.float64)
    d = (p - 1.0) / 256.0
    depth = np.zeros(raw.shape, np.float64)
    ok = (p > 0) & (d > 0)
    depth[ok] = baseline * fx / d[ok]
    depth[depth > max_depth] = 0.0
    return depth.astype(np.float32)


@dataclass(frozen=True)
class DepthPrep:
    """Opt-in clean-up of Cityscapes stereo depth; every step is off by default.

    Attributes:
        crop_top, crop_bottom, crop_left, crop_right: fractions of the frame cut off each side (image, labels
            and depth alike; intrinsics follow). ``crop_bottom=0.2`` removes the ego-vehicle bonnet,
            ``crop_left=0.05`` the stereo matcher's empty left border.
        inpaint: fill depth holes with OpenCV Navier-Stokes inpainting (sky pixels stay invalid when labels are
            available: the sky has no finite depth).
        smooth: median filter kernel (3 or 5) applied to valid depth; 0 = off.
        clip: clamp depth to this many metres; 0 = off.
        max_depth: depth beyond this is invalid (always on; must fit the uint16 / 256 encoding).
    """

    crop_top: float = 0.0
    crop_bottom: float = 0.0
    crop_left: float = 0.0
    crop_right: float = 0.0
    inpaint: bool = False
    smooth: int = 0
    clip: float = 0.0
    max_depth: float = 250.0


def prepare_depth(
    depth: np.ndarray, prep: DepthPrep, semseg: np.ndarray | None = None, sky_id: int = -1
) -> np.ndarray:
    """Apply ``prep``'s inpainting, smoothing and clipping to depth (H, W) metres (0 = invalid)."""
    import cv2

    out = depth.astype(np.float32, copy=True)
    if prep.inpaint:
        holes = out <= 0
        if holes.any() and (~holes).any():
            out = cv2.inpaint(out, holes.astype(np.uint8), 5, cv2.INPAINT_NS)
        if semseg is not None and sky_id >= 0:
            out[semseg == sky_id] = 0.0  # filled with everything else so no zeros pull the fill down
    if prep.smooth:
        if prep.smooth not in (3, 5):
            raise ValueError(f"smooth must be 0, 3 or 5 (median kernel), got {prep.smooth}")
        valid = out > 0
        out = np.where(valid, cv2.medianBlur(out, prep.smooth), 0.0).astype(np.float32)
    if prep.clip > 0:
        out = np.minimum(out, np.float32(prep.clip))
    return out


def list_frames(src: str | Path, split: str) -> list[tuple[str, str]]:
    """``(city, stem)`` of every ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``, sorted."""
    base = Path(src) / "leftImg8bit" / split
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base} not found: expected the official layout <src>/leftImg8bit/<split>/<city>/"
        )
    suffix = "_leftImg8bit.png"
    return sorted((p.parent.name, p.name[: -len(suffix)]) for p in base.glob(f"*/*{suffix}"))


def load_frame(
    src: str | Path,
    split: str,
    city: str,
    stem: str,
    classes: int = 19,
    prep: DepthPrep | None = None,
    objects: bool = False,
) -> dict[str, Any]:
    """One frame as numpy: image, semseg (or None), depth metres (or None), intrinsics; ``prep`` applied.

    With ``objects``, also ``objects`` and ``instances`` from the frame's gtFine_instanceIds.png and gtBbox3d
    JSON (None when it has neither; see :mod:`densemtl.datasets.objects_cityscapes`), cropped like the image.
    """
    src, prep = Path(src), prep or DepthPrep()
    if prep.max_depth > DEPTH_MAX_ENCODABLE:
        raise ValueError(
            f"max_depth {prep.max_depth:g} m exceeds what uint16 / 256 stores ({DEPTH_MAX_ENCODABLE:.3f} m); "
            "lower --clip / max_depth"
        )
    rel = Path(split) / city
    image = read_rgb(src / "leftImg8bit" / rel / f"{stem}_leftImg8bit.png")
    sample: dict[str, Any] = {"image": image, "semseg": None, "depth": None, "intrinsics": None}
    label_path = src / "gtFine" / rel / f"{stem}_gtFine_labelIds.png"
    if label_path.is_file():
        sample["semseg"] = label_lut(classes)[read_raw(label_path, "Cityscapes label")]
    cam_path = src / "camera" / rel / f"{stem}_camera.json"
    cam = read_camera(cam_path) if cam_path.is_file() else None
    if cam is not None:
        sample["intrinsics"] = (cam["fx"], cam["fy"], cam["cx"], cam["cy"])
    disp_path = src / "disparity" / rel / f"{stem}_disparity.png"
    if disp_path.is_file():
        if cam is None:
            raise FileNotFoundError(
                f"{cam_path} not found: converting {disp_path.name} to metres needs its camera"
            )
        raw = read_raw(disp_path, "Cityscapes disparity")
        sample["depth"] = disparity_to_depth(raw, cam["baseline"], cam["fx"], prep.max_depth)
    if objects:
        sample["instances"], sample["objects"] = _frame_objects(src, split, city, stem, image.shape[:2])
    sample = crop_fractions(sample, prep.crop_top, prep.crop_bottom, prep.crop_left, prep.crop_right)
    if sample["depth"] is not None:
        sky = class_names(classes).index("sky")
        sample["depth"] = prepare_depth(sample["depth"], prep, sample["semseg"], sky)
    return sample


def _frame_objects(
    src: Path, split: str, city: str, stem: str, size: tuple[int, int]
) -> tuple[np.ndarray | None, list[dict[str, Any]] | None]:
    """(instances, objects) of one frame (both None without instanceIds / gtBbox3d); the mask must fit the image."""
    instances, objects = load_objects(src, split, city, stem)
    if instances is not None and instances.shape != tuple(size):
        path = src / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png"
        raise DatasetFormatError(
            f"{path}: {instances.shape[0]}x{instances.shape[1]} but its image is {size[0]}x{size[1]}; restore it "
            "from gtFine_trainvaltest (it must belong to the same frame)"
        )
    return instances, objects


def to_tensors(sample: dict[str, Any], tasks: tuple[str, ...], sample_id: str) -> dict[str, Any]:
    """Numpy sample -> the dict ``FolderDataset`` returns (image (3, H, W) in [0, 1], targets, valid_tasks)."""
    h, w = sample["image"].shape[:2]
    image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float().div_(255.0)
    out: dict[str, Any] = {"image": tv_tensors.Image(image)}
    valid: dict[str, bool] = {}
    for task in tasks:
        arr = sample.get(task)
        valid[task] = arr is not None
        out[task] = tv_tensors.Mask(TASKS[task].to_tensor(arr, (h, w)).contiguous())  # as FolderDataset
    out["valid_tasks"] = valid
    k = sample.get("intrinsics")
    out["intrinsics"] = torch.tensor(k, dtype=torch.float32) if k is not None else torch.zeros(4)
    out["has_intrinsics"] = k is not None
    out["id"] = sample_id
    return out


class CityscapesDataset(Dataset):
    """Cityscapes read straight from the official layout (slower than the converted folder format).

    Returns the same sample dicts as ``FolderDataset``, so the transforms and the training loop accept it.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        tasks: tuple[str, ...] = ("semseg", "depth"),
        classes: int = 19,
        prep: DepthPrep | None = None,
    ) -> None:
        self.root, self.split, self.transform = Path(root), split, transform
        self.tasks, self.classes, self.prep = tuple(tasks), classes, prep or DepthPrep()
        self.frames = list_frames(self.root, split)
        self.info = {
            "classes": class_names(classes),
            "palette": palette(classes),
            "ignore_index": IGNORE_INDEX,
        }

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict[str, Any]:
        city, stem = self.frames[index]
        raw = load_frame(self.root, self.split, city, stem, self.classes, self.prep)
        sample = to_tensors(raw, self.tasks, stem)
        return self.transform(sample) if self.transform is not None else sample


def convert_cityscapes(
    src: str | Path,
    dst: str | Path,
    size: tuple[int, int] | None = None,
    classes: int = 19,
    splits: tuple[str, ...] = ("train", "val"),
    prep: DepthPrep | None = None,
    image_format: str = "png",
    max_per_split: int = 0,
    progress: bool = False,
    objects: bool = False,
) -> dict[str, Any]:
    """Official layout -> folder format (ids ``<city>_<seq>_<frame>``); returns per-split counts.

    Frames without a label or disparity file are written without that task (the folder format allows it).
    ``progress`` reports the frames written on stderr. ``objects`` also writes ``objects/`` boxes and
    ``instances/`` masks of the 8 instance classes (``object_frames`` in the result counts the frames that had
    an instanceIds or gtBbox3d file) and lists the classes in dataset.json ``object_classes``.
    """
    dst, prep = Path(dst), prep or DepthPrep()
    counts: dict[str, int] = {}
    object_frames: dict[str, int] = {}
    obj_classes = object_classes() if objects else None
    for split in splits:
        frames = list_frames(src, split)
        frames = frames[:max_per_split] if max_per_split > 0 else frames
        object_frames[split] = 0
        for city, stem in track(frames, f"convert cityscapes {split}", enabled=progress, unit="frame"):
            sample = load_frame(src, split, city, stem, classes, prep, objects)
            write_converted(dst, split, stem, sample, size, image_format, {"city": city}, obj_classes)
            object_frames[split] += sample.get("objects") is not None
        counts[split] = len(frames)
    extra_objects = {OBJECT_CLASSES_KEY: obj_classes} if objects and any(object_frames.values()) else {}
    write_dataset_json(
        dst, name=f"cityscapes{classes}", tasks=["semseg", "depth"], classes=class_names(classes),
        palette=palette(classes), splits=list(splits), depth_max=DEPTH_MAX,
        extra={"source": "cityscapes", "depth_source": "stereo disparity: baseline * fx / ((p - 1) / 256)",
               "depth_prep": {k: v for k, v in vars(prep).items()}, **extra_objects},
    )  # fmt: skip
    result = {"name": f"cityscapes{classes}", "root": str(dst), "counts": counts}
    return {**result, "object_frames": object_frames} if objects else result
