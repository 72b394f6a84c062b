"""``densemtl data convert {cityscapes,nyuv2,kitti} SRC DST``: real datasets -> the densemtl folder format.

Each dataset module (``nyuv2``, ``cityscapes``, ``kitti``) reads its official layout and hands numpy samples to
:func:`write_converted`, which crops/resizes them consistently (image bilinear, labels and depth nearest,
intrinsics rescaled) and writes them with :func:`densemtl.data.folder.write_sample`. The helpers here know
nothing about a particular dataset; :func:`read_rgb`, :func:`read_raw` and :func:`read_npy` are how the
converters open source files, so a corrupt, pickled or oversized file is an error naming it and the fix.

A sample may also carry ``objects`` (a list in the schema of :mod:`densemtl.data.objects`: boxes are pixel
corners ``[x0, y0, x1, y1]`` of the image they belong to) and ``instances`` ((H, W) uint16 ids, 0 = none).
Crops and resizes move the boxes with the pixels (:func:`crop_objects`, :func:`resize_objects`); 3-D boxes are
metric camera-frame boxes and do not change, only the intrinsics do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densemtl.data.folder import load_image, write_sample
from densemtl.data.format import DatasetFormatError, check_name, open_image
from densemtl.data.objects import (
    INSTANCES_DIR,
    OBJECTS_DIR,
    boxes_from_instances,
    encode_instances,
    instances_png_bytes,
    write_objects,
)
from densemtl.fileio import atomic_write

Intrinsics = tuple[float, float, float, float]  # fx, fy, cx, cy in pixels
Objects = list[dict[str, Any]]


def read_rgb(path: Path) -> np.ndarray:
    """A source image as uint8 (H, W, 3) RGB (the folder format's reader: named errors, 16-bit scaled)."""
    return load_image(Path(path))


def read_raw(path: Path, what: str) -> np.ndarray:
    """A source label / depth / disparity image's values as stored (e.g. uint8 ids, uint16); errors name it."""
    return np.asarray(open_image(Path(path), what))


def read_npy(path: Path, what: str) -> np.ndarray:
    """A numeric ``.npy`` array; never unpickles (a pickled file can run code) and names the file on failure."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DatasetFormatError(
                f"{path}: this {what} .npy holds pickled Python objects, which densemtl never loads (loading "
                "could run code); re-save it as a plain numeric array: np.save(path, np.asarray(a, np.float32))"
            ) from e
        raise DatasetFormatError(f"{path}: not a readable {what} .npy array ({e}); re-export it") from e
    except (OSError, EOFError) as e:
        raise DatasetFormatError(
            f"{path}: cannot read {what} .npy ({e}); the file is truncated or not a .npy: re-export it"
        ) from e


def label_palette(n: int) -> list[list[int]]:
    """``n`` distinct RGB colours (the PASCAL VOC bit-interleaving scheme), for datasets without official ones."""
    out = []
    for i in range(n):
        c, r, g, b = i + 1, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out.append([r, g, b])
    return out


def crop_box(sample: dict[str, Any], top: int, bottom: int, left: int, right: int) -> dict[str, Any]:
    """Keep rows ``top:bottom`` and columns ``left:right`` of every array; shifts the principal point.

    ``objects`` and ``instances`` follow (:func:`crop_objects`: objects cropped away entirely are dropped).
    """
    h, w = sample["image"].shape[:2]
    if not (0 <= top < bottom <= h and 0 <= left < right <= w):
        raise ValueError(f"crop rows {top}:{bottom}, columns {left}:{right} does not fit a {h}x{w} frame")
    out = dict(sample)
    for key in ("image", "semseg", "depth", "normals"):
        if out.get(key) is not None:
            out[key] = np.ascontiguousarray(out[key][top:bottom, left:right])
    if sample.get("objects") is not None or sample.get("instances") is not None:
        objects, out["instances"] = crop_objects(
            sample.get("objects") or [], sample.get("instances"), (h, w), top, bottom, left, right
        )
        out["objects"] = objects if sample.get("objects") is not None else None
    if out.get("intrinsics") is not None:
        fx, fy, cx, cy = out["intrinsics"]
        out["intrinsics"] = (fx, fy, cx - left, cy - top)
    return out


def crop_fractions(
    sample: dict[str, Any], top: float = 0.0, bottom: float = 0.0, left: float = 0.0, right: float = 0.0
) -> dict[str, Any]:
    """Cut the given fractions of the height/width off each side (e.g. ``bottom=0.2`` drops the ego-vehicle)."""
    h, w = sample["image"].shape[:2]
    t, b = round(top * h), h - round(bottom * h)
    lft, r = round(left * w), w - round(right * w)
    if b - t < 1 or r - lft < 1:
        raise ValueError(
            f"crop fractions top={top} bottom={bottom} left={left} right={right} leave no pixels"
        )
    return crop_box(sample, t, b, lft, r)


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    h, w = size
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array).resize((w, h), resample))
    return np.stack(  # per channel so float32 multi-channel arrays (normals) work too
        [np.asarray(Image.fromarray(array[..., c]).resize((w, h), resample)) for c in range(array.shape[2])],
        -1,
    )


def resize_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Resize to ``size`` (H, W): image bilinear (antialiased), semseg/depth/normals nearest, intrinsics scaled.

    Depth stays metric: resizing changes how many pixels see a point, not how far it is, so the values are
    copied (nearest) and only the intrinsics change. Sparse depth stays sparse (some points are dropped).
    Object boxes scale with the image and the instance mask resizes by nearest (:func:`resize_objects`).
    """
    h0, w0 = sample["image"].shape[:2]
    if (h0, w0) == tuple(size):
        return sample
    out = dict(sample)
    out["image"] = np.asarray(Image.fromarray(sample["image"]).resize((size[1], size[0]), Image.BILINEAR))
    for key in ("semseg", "depth", "normals"):
        if sample.get(key) is not None:
            out[key] = _resize(sample[key], size, Image.NEAREST)
    if sample.get("objects") is not None or sample.get("instances") is not None:
        objects, out["instances"] = resize_objects(
            sample.get("objects") or [], sample.get("instances"), (h0, w0), tuple(size)
        )
        out["objects"] = objects if sample.get("objects") is not None else None
    if sample.get("intrinsics") is not None:
        sx, sy = size[1] / w0, size[0] / h0
        fx, fy, cx, cy = sample["intrinsics"]
        out["intrinsics"] = (fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5)
    return out


def write_converted(
    root: Path,
    split: str,
    sample_id: str,
    sample: dict[str, Any],
    size: tuple[int, int] | None = None,
    image_format: str = "png",
    meta: dict[str, Any] | None = None,
    object_classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Resize (when ``size`` is given) and write one sample; returns the sample as written.

    ``sample`` holds ``image`` (H, W, 3) uint8 and optionally ``semseg`` (H, W) uint8 ids, ``depth`` (H, W)
    metres (0 = invalid), ``normals`` (H, W, 3), ``intrinsics`` (fx, fy, cx, cy) in pixels, ``objects`` (list,
    written to ``<split>/objects/<id>.json``; class names checked against ``object_classes`` when given) and
    ``instances`` ((H, W) ids, written to ``<split>/instances/<id>.png``). The object files are checked and
    written before the image, which :func:`write_sample` writes last: a sample exists once its image does.
    """
    if size is not None:
        sample = resize_sample(sample, size)
    _write_object_files(root, split, sample_id, sample, object_classes)
    info = dict(meta or {})
    if sample.get("intrinsics") is not None:
        info["intrinsics"] = [round(float(v), 4) for v in sample["intrinsics"]]
    write_sample(
        root, split, sample_id, sample["image"], semseg=sample.get("semseg"), depth=sample.get("depth"),
        normals=sample.get("normals"), meta=info or None, image_format=image_format, fsync=False,
    )  # fmt: skip  (no fsync per file: the converter's closing write_dataset_json syncs them all)
    return sample


def _write_object_files(
    root: Path, split: str, sample_id: str, sample: dict[str, Any], object_classes: Sequence[str] | None
) -> None:
    """Write a sample's ``objects`` and ``instances`` (when present), each validated before anything is written."""
    base = Path(root) / check_name(split, "split")
    check_name(sample_id, "sample id")
    size = tuple(sample["image"].shape[:2])
    png = None
    if sample.get("instances") is not None:
        inst_path = base / INSTANCES_DIR / f"{sample_id}.png"
        ids = encode_instances(sample["instances"], inst_path)
        if ids.shape != size:
            raise DatasetFormatError(
                f"{inst_path}: instance mask is {ids.shape[0]}x{ids.shape[1]} but its image is {size[0]}x{size[1]}; "
                "the mask must come from the same frame as the image"
            )
        png = instances_png_bytes(ids, inst_path)
    if sample.get("objects") is not None:
        write_objects(base / OBJECTS_DIR / f"{sample_id}.json", list(sample["objects"]), size=size,
                      object_classes=object_classes, fsync=False)  # fmt: skip
    if png is not None:
        atomic_write(base / INSTANCES_DIR / f"{sample_id}.png", png, fsync=False)


# --------------------------------------------------------------------------------------------------- objects
def border_flag(box: Sequence[float], size: tuple[int, int]) -> float:
    """1.0 when ``box`` (corners) touches the border of an (H, W) image, else 0.0."""
    h, w = size
    return float(box[0] <= 0 or box[1] <= 0 or box[2] >= w or box[3] >= h)


def resize_objects(
    objects: Objects, instances: np.ndarray | None, from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[Objects, np.ndarray | None]:
    """Scale boxes from an (H, W) image to ``to_size``; the mask resizes by nearest neighbour.

    Corner boxes scale exactly (x * W'/W, y * H'/H); box3d, truncation and occlusion do not change (the camera
    frame is metric: only the intrinsics change, which ``resize_sample`` handles). A tiny object may lose all
    its mask pixels when shrinking; it keeps its (scaled) box and gets id 0 (no mask), so its id never names
    pixels the mask does not have.
    """
    sx, sy = to_size[1] / from_size[1], to_size[0] / from_size[0]
    present = None
    if instances is not None:
        instances = np.asarray(Image.fromarray(instances).resize((to_size[1], to_size[0]), Image.NEAREST))
        present = set(np.unique(instances).tolist())
    out = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        oid = obj["id"] if present is None or obj["id"] in present else 0
        out.append({**obj, "id": oid, "box": [x0 * sx, y0 * sy, x1 * sx, y1 * sy]})
    return out, instances


def crop_objects(
    objects: Objects, instances: np.ndarray | None, size: tuple[int, int], top: int, bottom: int, left: int,
    right: int,
) -> tuple[Objects, np.ndarray | None]:  # fmt: skip
    """Keep rows ``top:bottom`` and columns ``left:right`` of an (H, W) image (as ``crop_box``).

    Mask objects get their box from the cropped mask and are renumbered 1..K'; objects without a mask (id 0)
    are clipped to the window. An object left with no pixels is dropped. ``truncated`` becomes 1.0 when the new
    box touches the new border (:func:`border_flag`). box3d is unchanged (same camera, shifted principal point).
    """
    if not (0 <= top < bottom <= size[0] and 0 <= left < right <= size[1]):
        raise ValueError(
            f"crop rows {top}:{bottom}, columns {left}:{right} does not fit a {size[0]}x{size[1]} frame"
        )
    h, w = bottom - top, right - left
    lut, boxes = None, {}
    if instances is not None:
        n = max(int(instances.max(initial=0)), max((o["id"] for o in objects), default=0))
        instances = np.ascontiguousarray(instances[top:bottom, left:right])
        present = np.unique(instances[instances > 0])
        lut = np.zeros(n + 1, np.uint16)  # old id -> new id, 0 = gone
        lut[present] = np.arange(1, len(present) + 1)
        instances = lut[instances]
        boxes = boxes_from_instances(instances)
    out = []
    for obj in objects:
        if obj["id"] > 0 and lut is not None:
            new_id = int(lut[obj["id"]])
            if new_id == 0:
                continue
            box = boxes[new_id]
        else:
            new_id = obj["id"]
            x0, y0, x1, y1 = obj["box"]
            box = [max(x0 - left, 0.0), max(y0 - top, 0.0), min(x1 - left, float(w)), min(y1 - top, float(h))]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
        trunc = 1.0 if border_flag(box, (h, w)) else obj["truncated"]
        out.append({**obj, "id": new_id, "box": box, "truncated": trunc})
    return out, instances
