"""Cityscapes objects: instance masks and 2-D boxes from ``gtFine_instanceIds.png``, 3-D boxes from Cityscapes 3D.

Sources (per frame; both optional)::

    <src>/gtFine/<split>/<city>/<stem>_gtFine_instanceIds.png   16-bit ids (see below)
    <src>/gtBbox3d/<split>/<city>/<stem>_gtBbox3d.json         Cityscapes 3D (Gaehlert et al. 2020)

**instanceIds**: a pixel of an instance holds ``labelId * 1000 + k`` (k = 0, 1, ... per class and image); every
other pixel holds its plain ``labelId`` (< 1000): stuff, and *crowd* regions (a group of cars or people drawn as
one polygon). Objects are the instances of the 8 evaluated instance classes :data:`OBJECT_CLASSES`; crowd regions
and the two instance classes that Cityscapes does not evaluate (caravan, trailer) are left out (0 in our mask).
Our mask renumbers the kept instances 1..K in increasing raw id; object ``id`` k is mask value k.

**Boxes** are pixel *corners*: pixel (column c, row r) covers [c, c + 1] x [r, r + 1], so a mask box is
``[min col, min row, max col + 1, max row + 1]`` (one pixel at column 3, row 5 is [3, 5, 4, 6]). Intrinsics use
pixel *centres* (docs/geometry.md), so a point projecting to u = fx X / Z + cx lies at u + 0.5 in box
coordinates. ``truncated`` is 1.0 when the box touches the image border, else 0.0 (Cityscapes gives no
fraction); ``occluded`` is -1 (not annotated), ``visible_fraction`` None.

**Cityscapes 3D**: ``sensor`` holds fx, fy, u0, v0 and ``sensor_T_ISO_8855``, a 3x4 [R | t] taking a point of
the vehicle frame V (ISO 8855: origin on the ground below the rear axle, x forward, y left, z up) to the camera
frame C (origin at the optical centre, same axes as V): p_C = R p_V + t. Each object has ``3d.center`` (the box
centre in V, metres), ``3d.dimensions`` [length, width, height] along the box's own x (heading), y, z axes, and
``3d.rotation``, a unit quaternion [w, x, y, z] (pyquaternion order) rotating box axes into V; ``2d.modal`` and
``2d.amodal`` are [x, y, w, h]. We convert to the OpenCV camera frame S (x right, y down, z forward):
p_S = (-y_C, -z_C, x_C), i.e. p_S = M (R p_V + t) with M = [[0, -1, 0], [0, 0, -1], [1, 0, 0]]. Then the
projection is u = fx x_S / z_S + u0, v = fy y_S / z_S + v0 (cityscapesScripts ``box3dImageTransform``). The
heading h = M R R_box e_x gives the KITTI ``rotation_y`` convention yaw = atan2(-h_z, h_x) (yaw 0 faces +x,
a car driving away from the camera has yaw -pi/2); pitch and roll of the box (small) are dropped. Objects are
matched to the mask by ``instanceId``; a 3-D box without a mask instance of our classes is kept with id 0 and
its ``2d.modal`` box as [x, y, x + w, y + h] (sides clipped to W - 1 / H - 1 move to W / H; whether the files
count w with or without the last pixel is not documented, so such a box may be 1 px narrower than a mask box).
The files' ``ignore`` regions are not used, nor their ``occlusion``/``truncation`` fields (steps of 0.1 whose
meaning the format does not define, and cars cut by the border can carry truncation 0.0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from densemtl.data.format import DatasetFormatError
from densemtl.datasets.common import (  # crop/resize_objects: generic, re-exported here
    Objects,
    border_flag,
    crop_objects,  # noqa: F401
    read_raw,
    resize_objects,  # noqa: F401
)
from densemtl.datasets.labels import LABELS

OBJECT_CLASSES: tuple[str, ...] = ("person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
_LABEL_ID = {lab.name: lab.id for lab in LABELS}
CLASS_OF_LABEL_ID: dict[int, str] = {_LABEL_ID[n]: n for n in OBJECT_CLASSES}  # 24 person ... 33 bicycle
_MAX_LABEL_ID = max(lab.id for lab in LABELS)  # 33
_S_FROM_C = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # ISO 8855 axes -> OpenCV axes


def object_classes() -> list[str]:
    """The Cityscapes object classes in label-id order (dataset.json ``"object_classes"``)."""
    return list(OBJECT_CLASSES)


def make_object(
    obj_id: int,
    cls: str,
    box: list[float],
    truncated: float | None,
    occluded: int = -1,
    visible_fraction: float | None = None,
    box3d: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One object in the folder format's schema (see docs/datasets.md, "Objects")."""
    return {"id": int(obj_id), "class": cls, "box": [float(v) for v in box], "visible_fraction": visible_fraction,
            "truncated": truncated, "occluded": int(occluded), "box3d": box3d}  # fmt: skip


def instances_from_ids(raw: np.ndarray, path: Path | str = "instanceIds") -> tuple[np.ndarray, Objects, dict]:
    """Raw instanceIds (H, W) -> (mask (H, W) uint16 1..K, objects with mask boxes, {raw id: our id}).

    Raises:
        DatasetFormatError: ``raw`` is 8-bit or holds values no Cityscapes instanceIds image has.
    """
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.uint8:
        raise DatasetFormatError(
            f"{path}: instanceIds must be a 16-bit single-channel PNG, got {raw.dtype} {raw.shape}; pass the "
            "*_gtFine_instanceIds.png file (not labelIds or color)"
        )
    raw = raw.astype(np.int64)
    bad = (raw < 0) | ((raw > _MAX_LABEL_ID) & (raw < 1000)) | (raw >= (_MAX_LABEL_ID + 1) * 1000)
    if bad.any():
        raise DatasetFormatError(
            f"{path}: value {int(raw[bad][0])} is neither a label id 0..{_MAX_LABEL_ID} nor labelId * 1000 + k; "
            "is this a Cityscapes *_gtFine_instanceIds.png? restore it from gtFine_trainvaltest"
        )
    keep = (raw >= 1000) & np.isin(raw // 1000, list(CLASS_OF_LABEL_ID))
    raw_ids = np.unique(raw[keep])
    mask = np.zeros(raw.shape, np.uint16)
    mask[keep] = np.searchsorted(raw_ids, raw[keep]) + 1
    objects = [
        make_object(k, CLASS_OF_LABEL_ID[int(raw_ids[k - 1]) // 1000], box, border_flag(box, raw.shape))
        for k, box in enumerate(mask_boxes(mask), start=1)
    ]
    return mask, objects, {int(r): k for k, r in enumerate(raw_ids, start=1)}


def mask_boxes(mask: np.ndarray) -> list[list[float]]:
    """Corner boxes of ids 1..mask.max() (an id without pixels gets an empty box [0, 0, 0, 0])."""
    out = []
    for sl in ndimage.find_objects(mask.astype(np.int64)):  # (rows, cols) slices per id; None if absent
        if sl is None:
            out.append([0.0, 0.0, 0.0, 0.0])
        else:
            rows, cols = sl
            out.append([float(cols.start), float(rows.start), float(cols.stop), float(rows.stop)])
    return out


def box3d_from_cityscapes(
    center: list[float], dimensions: list[float], rotation: list[float], sensor_T_iso: np.ndarray
) -> dict[str, Any]:
    """A Cityscapes 3D box (vehicle frame V) -> our box3d in the OpenCV camera frame (see the module docstring).

    Args:
        center: box centre [x, y, z] in V (x forward, y left, z up), metres.
        dimensions: [length, width, height] in metres.
        rotation: unit quaternion [w, x, y, z] taking box axes to V.
        sensor_T_iso: (3, 4) [R | t], p_C = R p_V + t.
    """
    r_cv, t_cv = sensor_T_iso[:, :3], sensor_T_iso[:, 3]
    w, x, y, z = rotation
    r_box = Rotation.from_quat([x, y, z, w]).as_matrix()  # scipy wants scalar-last; normalises
    center_s = _S_FROM_C @ (r_cv @ np.asarray(center, np.float64) + t_cv)
    heading = _S_FROM_C @ r_cv @ r_box[:, 0]  # the box's length axis in camera axes
    yaw = math.atan2(-heading[2], heading[0])  # KITTI rotation_y: heading = (cos yaw, 0, -sin yaw)
    return {"center": [float(v) for v in center_s], "size": [float(v) for v in dimensions], "yaw": yaw}


def _numbers(value: Any, n: int, where: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{where} must be {n} finite numbers, got {value!r}")
    return out


def _sensor(data: dict[str, Any]) -> np.ndarray:
    sensor = data["sensor"]
    for key in ("fx", "fy", "u0", "v0"):
        _numbers([sensor[key]], 1, f"sensor.{key}")
    rows = sensor["sensor_T_ISO_8855"]
    m = np.array([_numbers(r, 4, "sensor.sensor_T_ISO_8855 row") for r in rows], np.float64)
    if m.shape != (3, 4):
        raise ValueError(f"sensor.sensor_T_ISO_8855 must be 3x4, got {m.shape}")
    if np.abs(m[:, :3] @ m[:, :3].T - np.eye(3)).max() > 1e-3:
        raise ValueError("sensor.sensor_T_ISO_8855 has no rotation in its left 3x3 (not orthonormal)")
    return m


def _record(obj: dict[str, Any], sensor_T_iso: np.ndarray, k: int) -> dict[str, Any]:
    where = f"objects[{k}]"
    two_d = obj["2d"]
    x, y, w, h = _numbers(two_d.get("modal", two_d["amodal"]), 4, f"{where}.2d.modal")  # modal is optional
    dims = _numbers(obj["3d"]["dimensions"], 3, f"{where}.3d.dimensions")
    quat = _numbers(obj["3d"]["rotation"], 4, f"{where}.3d.rotation")
    if min(dims) <= 0 or w < 0 or h < 0 or np.linalg.norm(quat) < 1e-6:
        raise ValueError(f"{where}: dimensions and 2-D sizes must be positive and the quaternion non-zero")
    center = _numbers(obj["3d"]["center"], 3, f"{where}.3d.center")
    return {"label": str(obj["label"]), "instance_id": int(obj.get("instanceId", 0)), "modal": [x, y, x + w, y + h],
            "box3d": box3d_from_cityscapes(center, dims, quat, sensor_T_iso)}  # fmt: skip


def read_gtbbox3d(path: str | Path) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
    """Parse a ``*_gtBbox3d.json``: ([{label, instance_id, modal (corners), box3d}], (H, W) or None).

    Raises:
        DatasetFormatError: not JSON, or a missing/malformed field (the message names the file and the field).
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(
            f"{path}: not readable JSON ({e}); restore it from gtBbox3d_trainvaltest"
        ) from e
    try:
        sensor_T_iso = _sensor(data)
        records = [_record(obj, sensor_T_iso, k) for k, obj in enumerate(data["objects"])]
        size = (int(data["imgHeight"]), int(data["imgWidth"])) if "imgHeight" in data else None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DatasetFormatError(
            f"{path}: not a Cityscapes 3D box file ({type(e).__name__}: {e}); it needs sensor.fx/fy/u0/v0/"
            "sensor_T_ISO_8855 and objects with 2d.modal, 3d.center/dimensions/rotation and label"
        ) from e
    return records, size


def cityscapes_objects(
    instance_path: str | Path | None, bbox3d_path: str | Path | None = None
) -> tuple[np.ndarray | None, Objects]:
    """Objects of one frame from its instanceIds PNG and/or gtBbox3d JSON: (mask (H, W) uint16 or None, objects).

    3-D boxes join the mask object with the same raw ``instanceId``; unmatched ones of our classes get id 0.
    """
    mask, objects, by_raw = None, [], {}
    if instance_path is not None:
        raw = read_raw(Path(instance_path), "Cityscapes instanceIds")
        mask, objects, by_raw = instances_from_ids(raw, instance_path)
    if bbox3d_path is None:
        return mask, objects
    records, size = read_gtbbox3d(bbox3d_path)
    if mask is not None and size is not None and size != mask.shape:
        raise DatasetFormatError(
            f"{bbox3d_path}: imgHeight x imgWidth {size} differs from {instance_path} {mask.shape}; "
            "both files must belong to the same frame"
        )
    for rec in records:
        k = by_raw.get(rec["instance_id"], 0)
        if k:
            objects[k - 1]["box3d"] = rec["box3d"]
        elif rec["label"] in OBJECT_CLASSES:
            box = rec["modal"] if size is None else snap_to_border(rec["modal"], size)
            trunc = border_flag(box, size) if size is not None else None
            objects.append(make_object(0, rec["label"], box, trunc, box3d=rec["box3d"]))
    return mask, objects


def snap_to_border(box: list[float], size: tuple[int, int]) -> list[float]:
    """Move sides clipped to the last pixel (Cityscapes 3D clips x + w to W - 1, y + h to H - 1) onto W / H."""
    h, w = size
    return [box[0], box[1], float(w) if box[2] >= w - 1 else box[2], float(h) if box[3] >= h - 1 else box[3]]


def load_objects(
    src: str | Path, split: str, city: str, stem: str
) -> tuple[np.ndarray | None, Objects | None]:
    """One frame's objects from the official layout; (None, None) when it has neither file."""
    inst = Path(src) / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png"
    box3d = Path(src) / "gtBbox3d" / split / city / f"{stem}_gtBbox3d.json"
    inst_path, box3d_path = (inst if inst.is_file() else None), (box3d if box3d.is_file() else None)
    if inst_path is None and box3d_path is None:
        return None, None
    return cityscapes_objects(inst_path, box3d_path)
