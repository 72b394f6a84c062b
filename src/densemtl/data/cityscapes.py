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
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from densemtl.data.convert import crop_fractions, write_converted
from densemtl.data.format import DEPTH_MAX_ENCODABLE, write_dataset_json
from densemtl.tasks import IGNORE_INDEX


class Label(NamedTuple):
    """One row of the official Cityscapes label table (cityscapesScripts ``labels.py``)."""

    name: str
    id: int
    train_id: int  # 255 = not evaluated
    category: str
    cat_id: int  # 0 = void
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", 0, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", 0, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", 0, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", 0, (0, 0, 0)),
    Label("static", 4, 255, "void", 0, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", 0, (111, 74, 0)),
    Label("ground", 6, 255, "void", 0, (81, 0, 81)),
    Label("road", 7, 0, "flat", 1, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", 1, (244, 35, 232)),
    Label("parking", 9, 255, "flat", 1, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", 1, (230, 150, 140)),
    Label("building", 11, 2, "construction", 2, (70, 70, 70)),
    Label("wall", 12, 3, "construction", 2, (102, 102, 156)),
    Label("fence", 13, 4, "construction", 2, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", 2, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", 2, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", 2, (150, 120, 90)),
    Label("pole", 17, 5, "object", 3, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", 3, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", 3, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", 3, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", 4, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", 4, (152, 251, 152)),
    Label("sky", 23, 10, "sky", 5, (70, 130, 180)),
    Label("person", 24, 11, "human", 6, (220, 20, 60)),
    Label("rider", 25, 12, "human", 6, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", 7, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", 7, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", 7, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", 7, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", 7, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", 7, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", 7, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", 7, (119, 11, 32)),
)
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
CATEGORY_COLORS = [[128, 64, 128], [70, 70, 70], [153, 153, 153], [107, 142, 35], [70, 130, 180],
                   [220, 20, 60], [0, 0, 142]]  # fmt: skip
SPLIT_COUNTS = {"train": 2975, "val": 500, "test": 1525}
DEPTH_MAX = 80.0  # metres: evaluation cap and dataset.json "max" (stereo depth far beyond is noise)


def class_names(classes: int = 19) -> list[str]:
    """Names of the 19 training classes or the 7 categories, in id order."""
    if classes == 7:
        return list(CATEGORIES)
    return [lab.name for lab in sorted((x for x in LABELS if x.train_id != 255), key=lambda x: x.train_id)]


def palette(classes: int = 19) -> list[list[int]]:
    """Official colours of the 19 training classes (or one colour per category)."""
    if classes == 7:
        return [list(c) for c in CATEGORY_COLORS]
    return [
        list(lab.color) for lab in sorted((x for x in LABELS if x.train_id != 255), key=lambda x: x.train_id)
    ]


def label_lut(classes: int = 19) -> np.ndarray:
    """(256,) uint8 lookup: label id -> training id (19) or category 0..6 (7); everything else 255."""
    if classes not in (19, 7):
        raise ValueError(f"Cityscapes classes must be 19 or 7, got {classes}")
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for lab in LABELS:
        if lab.train_id != 255:
            lut[lab.id] = lab.train_id if classes == 19 else lab.cat_id - 1
    return lut


def read_camera(path: str | Path) -> dict[str, float]:
    """``{"baseline": m, "fx", "fy", "cx", "cy": px}`` from a Cityscapes camera JSON."""
    cam = json.loads(Path(path).read_text())
    try:
        ext, k = cam["extrinsic"], cam["intrinsic"]
        return {"baseline": float(ext["baseline"]), "fx": float(k["fx"]), "fy": float(k["fy"]),
                "cx": float(k["u0"]), "cy": float(k["v0"])}  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(
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
    src: str | Path, split: str, city: str, stem: str, classes: int = 19, prep: DepthPrep | None = None
) -> dict[str, Any]:
    """One frame as numpy: image, semseg (or None), depth metres (or None), intrinsics; ``prep`` applied."""
    src, prep = Path(src), prep or DepthPrep()
    if prep.max_depth > DEPTH_MAX_ENCODABLE:
        raise ValueError(
            f"max_depth {prep.max_depth} m exceeds what uint16 / 256 stores ({DEPTH_MAX_ENCODABLE:.1f})"
        )
    rel = Path(split) / city
    image = np.asarray(Image.open(src / "leftImg8bit" / rel / f"{stem}_leftImg8bit.png").convert("RGB"))
    sample: dict[str, Any] = {"image": image, "semseg": None, "depth": None, "intrinsics": None}
    label_path = src / "gtFine" / rel / f"{stem}_gtFine_labelIds.png"
    if label_path.is_file():
        sample["semseg"] = label_lut(classes)[np.asarray(Image.open(label_path))]
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
        raw = np.asarray(Image.open(disp_path))
        sample["depth"] = disparity_to_depth(raw, cam["baseline"], cam["fx"], prep.max_depth)
    sample = crop_fractions(sample, prep.crop_top, prep.crop_bottom, prep.crop_left, prep.crop_right)
    if sample["depth"] is not None:
        sky = class_names(classes).index("sky")
        sample["depth"] = prepare_depth(sample["depth"], prep, sample["semseg"], sky)
    return sample


def to_tensors(sample: dict[str, Any], tasks: tuple[str, ...], sample_id: str) -> dict[str, Any]:
    """Numpy sample -> the dict ``FolderDataset`` returns (image (3, H, W) in [0, 1], targets, valid_tasks)."""
    h, w = sample["image"].shape[:2]
    image = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float().div_(255.0)
    out: dict[str, Any] = {"image": tv_tensors.Image(image)}
    valid: dict[str, bool] = {}
    for task in tasks:
        arr = sample.get(task)
        valid[task] = arr is not None
        if task == "semseg":
            t = (
                torch.from_numpy(arr.astype(np.int64))
                if arr is not None
                else torch.full((h, w), IGNORE_INDEX)
            )
        else:
            t = (
                torch.from_numpy(np.array(arr))[None] if arr is not None else torch.zeros(1, h, w)
            )  # (1, H, W) metres
        out[task] = tv_tensors.Mask(t.contiguous())
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
) -> dict[str, Any]:
    """Official layout -> folder format (ids ``<city>_<seq>_<frame>``); returns per-split counts.

    Frames without a label or disparity file are written without that task (the folder format allows it).
    """
    dst, prep = Path(dst), prep or DepthPrep()
    counts: dict[str, int] = {}
    for split in splits:
        frames = list_frames(src, split)
        frames = frames[:max_per_split] if max_per_split > 0 else frames
        for city, stem in frames:
            sample = load_frame(src, split, city, stem, classes, prep)
            write_converted(dst, split, stem, sample, size, image_format, {"city": city})
        counts[split] = len(frames)
    write_dataset_json(
        dst, name=f"cityscapes{classes}", tasks=["semseg", "depth"], classes=class_names(classes),
        palette=palette(classes), splits=list(splits), depth_max=DEPTH_MAX,
        extra={"source": "cityscapes", "depth_source": "stereo disparity: baseline * fx / ((p - 1) / 256)",
               "depth_prep": {k: v for k, v in vars(prep).items()}},
    )  # fmt: skip
    return {"name": f"cityscapes{classes}", "root": str(dst), "counts": counts}
