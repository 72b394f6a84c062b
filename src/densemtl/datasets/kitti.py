"""KITTI: sparse LiDAR depth (depth completion / Eigen-style) and the semantic benchmark, to the folder format.

Layouts read under ``<src>`` (any subset)::

    data_depth_annotated/<train|val>/<drive>/proj_depth/groundtruth/image_0{2,3}/<frame>.png   uint16 depth
    raw/<date>/<drive>/image_0{2,3}/data/<frame>.png                                           RGB
    raw/<date>/calib_cam_to_cam.txt                                         P_rect_02 / P_rect_03 intrinsics
    depth_selection/val_selection_cropped/{image,groundtruth_depth,intrinsics}/  1000 cropped val frames
    data_semantics/training/{image_2,semantic}/<id>_10.png            200 frames, Cityscapes label ids
    data_object/training/{image_2,label_2,calib}/<id>.{png,txt}       object benchmark (``objects=True``)
    data_object/ImageSets/val.txt                                      optional: object frame ids for ``val``

Depth PNGs: metres = value / 256, 0 = no LiDAR return. Depth stays sparse (about 5 % of pixels after
projection); nothing is interpolated, and metrics only count valid pixels up to the standard 80 m cap
(``data.eval_depth_max``). The Garg or Eigen evaluation crop can be baked into validation depth
(``eval_crop``): pixels outside the crop become invalid so every metric is computed inside it.
Semantic frames carry no depth and are written as segmentation-only samples of ``train`` (ids ``sem_*``):
an asymmetric dataset, which training supports. Object-benchmark frames (opt-in) likewise become samples
``obj_<id>`` with only boxes (``objects/``, no instance masks: KITTI has none) and camera-2 intrinsics, in
``train``, or in ``val`` when ``data_object/ImageSets/val.txt`` lists them (the common 3712 / 3769 split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.format import DatasetFormatError, write_dataset_json
from densemtl.data.objects import OBJECT_CLASSES_KEY
from densemtl.data.progress import track
from densemtl.datasets.common import Intrinsics, read_raw, read_rgb, write_converted
from densemtl.datasets.labels import class_names, label_lut, palette
from densemtl.datasets.objects_kitti import (
    DEFAULT_CLASSES,
    list_object_frames,
    load_object_frame,
    object_classes,
)

DEPTH_MAX = 80.0  # metres, the standard evaluation cap
# Evaluation crops as fractions (top, bottom, left, right) of the frame (Garg et al. 2016; Eigen et al. 2014).
EVAL_CROPS = {
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),
    "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),
}


def eval_crop_mask(h: int, w: int, kind: str) -> np.ndarray:
    """(H, W) bool, True inside the Garg or Eigen evaluation crop ("none" = everything)."""
    mask = np.ones((h, w), bool)
    if kind == "none":
        return mask
    if kind not in EVAL_CROPS:
        raise ValueError(f"eval_crop must be one of {['none', *EVAL_CROPS]}, got {kind!r}")
    t, b, lft, r = (int(f * s) for f, s in zip(EVAL_CROPS[kind], (h, h, w, w), strict=True))
    mask[:] = False
    mask[t:b, lft:r] = True
    return mask


def read_depth_png(path: str | Path) -> np.ndarray:
    """KITTI uint16 depth PNG -> float32 metres (0 = no measurement)."""
    raw = read_raw(Path(path), "KITTI depth")
    if raw.dtype != np.uint16 and raw.dtype != np.int32:
        raise DatasetFormatError(
            f"{path}: KITTI depth must be a 16-bit PNG, got {raw.dtype}; use the data_depth_annotated files"
        )
    return raw.astype(np.float32) / 256.0


def read_calib(path: str | Path, camera: str = "02") -> Intrinsics:
    """(fx, fy, cx, cy) of the rectified camera ``camera`` from ``calib_cam_to_cam.txt`` (``P_rect_0X``)."""
    try:
        for line in Path(path).read_text().splitlines():
            key, _, values = line.partition(":")
            if key.strip() == f"P_rect_{camera}":
                p = np.array(values.split(), dtype=np.float64).reshape(3, 4)
                return float(p[0, 0]), float(p[1, 1]), float(p[0, 2]), float(p[1, 2])
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: unreadable calibration ({e}); restore calib_cam_to_cam.txt from the KITTI raw data"
        ) from e
    raise DatasetFormatError(f"{path}: no P_rect_{camera} line; is this a KITTI calib_cam_to_cam.txt?")


def _read_k(path: Path) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) from a depth-selection ``intrinsics/<id>.txt`` (a row-major 3x3 K)."""
    try:
        k = np.loadtxt(path).ravel()
        if k.size != 9:
            raise ValueError(f"{k.size} numbers, not 9")
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: not a 3x3 camera matrix ({e}); restore it from depth_selection/val_selection_cropped"
        ) from e
    return float(k[0]), float(k[4]), float(k[2]), float(k[5])


def _annotated(src: Path, split: str, max_n: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, sample loader args) pairs of the depth-completion ground truth with their raw RGB frames."""
    base = src / "data_depth_annotated" / split
    out = []
    for depth_path in sorted(base.glob("*/proj_depth/groundtruth/image_0[23]/*.png")):
        drive, cam = depth_path.parents[3].name, depth_path.parent.name
        rgb_path = src / "raw" / drive[:10] / drive / cam / "data" / depth_path.name
        if not rgb_path.is_file():
            raise FileNotFoundError(
                f"{rgb_path} not found: {depth_path} needs its raw RGB frame (KITTI raw data)"
            )
        sid = f"{drive}_{cam}_{depth_path.stem}"
        out.append(
            (sid, {"rgb": rgb_path, "depth": depth_path, "calib": (src / "raw" / drive[:10], cam[-2:])})
        )
        if max_n and len(out) >= max_n:
            break
    return out


def _load(entry: dict[str, Any], crop_mask_kind: str) -> dict[str, Any]:
    image = read_rgb(entry["rgb"])
    depth = read_depth_png(entry["depth"])
    if depth.shape != image.shape[:2]:
        raise ValueError(f"{entry['depth']}: depth is {depth.shape} but its image is {image.shape[:2]}")
    depth[~eval_crop_mask(*depth.shape, crop_mask_kind)] = 0.0
    k = entry.get("intrinsics")
    if k is None and entry.get("calib") is not None:
        calib_dir, cam = entry["calib"]
        calib = calib_dir / "calib_cam_to_cam.txt"
        k = read_calib(calib, cam) if calib.is_file() else None
    return {"image": image, "depth": depth, "intrinsics": k}


def _selection(src: Path, max_n: int) -> list[tuple[str, dict[str, Any]]]:
    """The 1000 cropped validation frames of ``depth_selection/val_selection_cropped``."""
    base = src / "depth_selection" / "val_selection_cropped"
    out = []
    for rgb_path in sorted((base / "image").glob("*.png")):
        gt = base / "groundtruth_depth" / rgb_path.name.replace("_image_", "_groundtruth_depth_", 1)
        if not gt.is_file():
            continue
        k_path = base / "intrinsics" / f"{rgb_path.stem}.txt"
        entry = {"rgb": rgb_path, "depth": gt, "intrinsics": _read_k(k_path) if k_path.is_file() else None}
        out.append((rgb_path.stem.replace("_image_", "_", 1), entry))
        if max_n and len(out) >= max_n:
            break
    return out


def _convert_semantics(
    src: Path, dst: Path, size: tuple[int, int] | None, image_format: str, max_n: int, progress: bool
) -> int:
    """Write the semantic benchmark's frames as segmentation-only ``train`` samples ``sem_<id>``; their count."""
    sem_dir = src / "data_semantics" / "training"
    labels = sorted((sem_dir / "semantic").glob("*.png"))[: max_n or None]
    lut = label_lut(19)
    for path in track(labels, "convert kitti semantics", enabled=progress, unit="frame"):
        sample = {
            "image": read_rgb(sem_dir / "image_2" / path.name),
            "semseg": lut[read_raw(path, "KITTI semantic label")],
        }
        write_converted(dst, "train", f"sem_{path.stem}", sample, size, image_format)
    return len(labels)


def _object_splits(src: Path, max_n: int) -> dict[str, list[str]]:
    """Object-benchmark frame ids by split: those ``data_object/ImageSets/val.txt`` lists go to val."""
    base = src / "data_object" / "training"
    if not (base / "label_2").is_dir():
        raise FileNotFoundError(
            f"{base / 'label_2'} not found: KITTI objects are read from SRC/data_object/training/{{image_2,"
            "label_2,calib}/ (data_object_image_2, data_object_label_2 and data_object_calib unpacked there)"
        )
    ids = list_object_frames(base)
    val_file = src / "data_object" / "ImageSets" / "val.txt"
    try:
        val = set(val_file.read_text().split()) if val_file.is_file() else set()
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{val_file}: not a text list of frame ids ({e}); fix or remove it") from e
    unknown = sorted(val - set(ids))
    if unknown:
        raise DatasetFormatError(
            f"{val_file}: ids {unknown[:5]} have no {base / 'label_2'}/<id>.txt; list only labelled training frames"
        )
    splits = {"train": [i for i in ids if i not in val], "val": [i for i in ids if i in val]}
    return {split: frames[: max_n or None] for split, frames in splits.items() if frames}


def _convert_objects(
    src: Path, dst: Path, size: tuple[int, int] | None, image_format: str, max_n: int, progress: bool,
    types: tuple[str, ...],
) -> dict[str, int]:  # fmt: skip
    """Write the object benchmark's frames as ``obj_<id>`` samples; returns ``{"<split>_object": count}``."""
    base, classes, counts = src / "data_object" / "training", object_classes(types), {}
    for split, ids in _object_splits(src, max_n).items():
        for fid in track(ids, f"convert kitti objects {split}", enabled=progress, unit="frame"):
            sample = load_object_frame(base, fid, types)
            write_converted(dst, split, f"obj_{fid}", sample, size, image_format, object_classes=classes)
        counts[f"{split}_object"] = len(ids)
    return counts


def convert_kitti(
    src: str | Path,
    dst: str | Path,
    size: tuple[int, int] | None = None,
    eval_crop: str = "none",
    semantics: bool = True,
    image_format: str = "png",
    max_per_split: int = 0,
    progress: bool = False,
    objects: bool = False,
    object_types: tuple[str, ...] = DEFAULT_CLASSES,
) -> dict[str, Any]:
    """Write every KITTI layout found under ``src`` to the folder format (19 Cityscapes classes).

    Args:
        eval_crop: "none", "garg" or "eigen": depth outside the crop is invalidated in validation splits
            (``val``, ``val_selection``) so evaluation covers only the crop; training depth is untouched.
        semantics: also write the semantic benchmark frames as segmentation-only ``train`` samples.
        max_per_split: at most N samples per source split (0 = all).
        progress: report the frames written on stderr.
        objects: also write the object benchmark ``data_object/training`` as box-only samples ``obj_<id>``
            (dataset.json gets ``object_classes``); it must exist then.
        object_types: the KITTI types kept as objects (default Car, Pedestrian, Cyclist; lower-cased).
    """
    src, dst = Path(src), Path(dst)
    eval_crop_mask(1, 1, eval_crop)  # validate early
    counts: dict[str, int] = {}
    sources = {split: _annotated(src, split, max_per_split) for split in ("train", "val")}
    sources["val_selection"] = _selection(src, max_per_split)
    for split, entries in sources.items():
        crop = eval_crop if split != "train" else "none"
        for sid, entry in track(entries, f"convert kitti {split}", enabled=progress, unit="frame"):
            write_converted(dst, split, sid, _load(entry, crop), size, image_format)
        if entries:
            counts[split] = len(entries)
    if semantics and (src / "data_semantics" / "training" / "semantic").is_dir():
        counts["train_semantic"] = _convert_semantics(src, dst, size, image_format, max_per_split, progress)
    if objects:
        counts.update(_convert_objects(src, dst, size, image_format, max_per_split, progress, object_types))
    if not counts:
        raise FileNotFoundError(
            f"{src}: no KITTI data found (data_depth_annotated/, depth_selection/val_selection_cropped/ "
            "or data_semantics/training/); see docs/datasets.md"
        )
    splits = sorted({s.removesuffix("_semantic").removesuffix("_object") for s in counts})
    extra = {"source": "kitti", "depth_sparse": True, "eval_crop": eval_crop}
    if objects:
        extra[OBJECT_CLASSES_KEY] = object_classes(object_types)
    write_dataset_json(
        dst, name="kitti", tasks=["semseg", "depth"], classes=class_names(19), palette=palette(19),
        splits=splits, depth_max=DEPTH_MAX, extra=extra,
    )  # fmt: skip
    return {"name": "kitti", "root": str(dst), "counts": counts}
