"""Per-object ground truth in the folder format: ``<split>/instances/<id>.png`` and ``<split>/objects/<id>.json``.

Both files are optional per sample (see docs/folder_format.md, "Objects"):

* ``instances/<id>.png``: uint16 single-channel PNG (mode ``I;16``) of the image's size; 0 = no object, k = the
  object whose ``"id"`` is k in the objects file.
* ``objects/<id>.json``: ``{"objects": [obj, ...]}``, each obj ``{"id", "class", "box", "visible_fraction",
  "truncated", "box3d"}`` plus an optional ``"occluded"``. Boxes are ``[x0, y0, x1, y1]`` pixel edges of the
  visible (modal) extent: a single pixel at column 3, row 5 is ``[3, 5, 4, 6]``. ``box3d`` is None or
  ``{"center": [x, y, z], "size": [l, w, h], "yaw": ry}`` in metres in the OpenCV camera frame (KITTI
  ``rotation_y``: 0 = heading along +x).
* ``dataset.json`` lists the class names an objects file may use under ``"object_classes"``.

This module is what converters write with and what readers (``densemtl data check``, the objects task) read with:
every check raises :class:`~densemtl.data.format.DatasetFormatError` naming the file, the object and the field.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.format import DEPTH_MODES, DatasetFormatError, check_size, open_image, png_bytes
from densemtl.fileio import atomic_write_text

INSTANCES_DIR = "instances"
OBJECTS_DIR = "objects"
OBJECT_CLASSES_KEY = "object_classes"
MAX_INSTANCE_ID = 65535  # uint16
BOX_SLACK = 1.0  # pixels a box may reach past the image edge (rounding in converters)
OCCLUDED_VALUES = (-1, 0, 1, 2, 3)  # KITTI: 0 fully visible, 1 partly, 2 largely occluded, 3 / -1 unknown
_REQUIRED = ("id", "class", "box", "visible_fraction", "truncated", "box3d")


def instances_path(image_path: Path) -> Path:
    """``<split>/instances/<id>.png`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / INSTANCES_DIR / f"{image_path.stem}.png"


def objects_path(image_path: Path) -> Path:
    """``<split>/objects/<id>.json`` for the sample whose image is ``image_path``."""
    return image_path.parent.parent / OBJECTS_DIR / f"{image_path.stem}.json"


def check_object_classes(value: Any, path: Path | str) -> list[str]:
    """The ``object_classes`` of dataset.json ``path``: a list of distinct non-empty strings, else raise."""
    ok = isinstance(value, list) and all(isinstance(c, str) and c for c in value)
    if not ok or len(set(value)) != len(value):
        raise DatasetFormatError(
            f"{path}: {OBJECT_CLASSES_KEY!r} must be a list of distinct non-empty class names such as "
            f'["car", "person"], got {value!r}'
        )
    return list(value)


# ------------------------------------------------------------------------------------------------ validation
def _number(value: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite real number (not a bool) within [lo, hi] as a float; ``where`` names file, object, field."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise DatasetFormatError(f"{where} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise DatasetFormatError(f"{where} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _fraction(value: Any, where: str) -> float | None:
    """None (unknown) or a number in [0, 1]."""
    return None if value is None else _number(value, where, 0.0, 1.0)


def _vector(value: Any, where: str, n: int) -> list[float]:
    if not isinstance(value, list | tuple | np.ndarray) or len(value) != n:
        raise DatasetFormatError(f"{where} must be a list of {n} numbers, got {value!r}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _box(value: Any, where: str, size: tuple[int, int] | None) -> list[float]:
    """``[x0, y0, x1, y1]`` pixel edges with x1 > x0, y1 > y0, inside the image up to ``BOX_SLACK``."""
    x0, y0, x1, y1 = _vector(value, where, 4)
    if x1 <= x0 or y1 <= y0:
        raise DatasetFormatError(
            f"{where} = {value!r} is empty: it must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0 (pixel "
            "edges: one pixel at column u, row v is [u, v, u + 1, v + 1])"
        )
    if size is not None:
        h, w = size
        s = BOX_SLACK
        if x0 < -s or y0 < -s or x1 > w + s or y1 > h + s:
            raise DatasetFormatError(
                f"{where} = {value!r} lies outside the {w}x{h} (WxH) image by more than {s:g} pixel; clip it "
                f"to [0, 0, {w}, {h}] (a box is the object's visible pixels)"
            )
    return [x0, y0, x1, y1]


def _box3d(value: Any, where: str) -> dict[str, Any] | None:
    """None or {"center": 3 numbers, "size": 3 positive numbers, "yaw": radians in [-pi, pi]}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not {"center", "size", "yaw"} <= set(value):
        raise DatasetFormatError(
            f'{where} must be null or {{"center": [x, y, z], "size": [l, w, h], "yaw": radians}}, got {value!r}'
        )
    size = _vector(value["size"], f"{where}.size", 3)
    if min(size) <= 0:
        raise DatasetFormatError(
            f"{where}.size = {value['size']!r}: length, width, height must be > 0 metres"
        )
    yaw = _number(value["yaw"], f"{where}.yaw")
    if abs(yaw) > math.pi + 1e-6:
        raise DatasetFormatError(
            f"{where}.yaw = {yaw!r} must be in [-pi, pi] radians; wrap it with math.remainder(yaw, 2 * math.pi)"
        )
    return {"center": _vector(value["center"], f"{where}.center", 3), "size": size, "yaw": yaw}


def _object(obj: Any, where: str, size: tuple[int, int] | None, classes: Sequence[str] | None) -> dict:
    """One object checked and normalised to plain Python types (``occluded`` defaults to -1)."""
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{where} must be a JSON object with keys {list(_REQUIRED)}, got {obj!r}")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise DatasetFormatError(
            f"{where}: missing field(s) {missing}; every object has {list(_REQUIRED)} (null for unknown "
            "visible_fraction, truncated and box3d)"
        )
    oid = obj["id"]
    if isinstance(oid, bool) or not isinstance(oid, Integral) or not 0 <= oid <= MAX_INSTANCE_ID:
        raise DatasetFormatError(
            f"{where}.id must be an integer 0..{MAX_INSTANCE_ID} (its value in the instance mask; 0 = not in "
            f"the mask), got {oid!r}"
        )
    cls = obj["class"]
    if not isinstance(cls, str) or not cls:
        raise DatasetFormatError(f"{where}.class must be a non-empty class name, got {cls!r}")
    if classes is not None and cls not in classes:
        raise DatasetFormatError(
            f"{where}.class {cls!r} is not one of dataset.json {OBJECT_CLASSES_KEY} {list(classes)}; map it to "
            f"one of them or add it to {OBJECT_CLASSES_KEY}"
        )
    occluded = obj.get("occluded", -1)
    if isinstance(occluded, bool) or occluded not in OCCLUDED_VALUES:
        raise DatasetFormatError(
            f"{where}.occluded must be one of {list(OCCLUDED_VALUES)} (KITTI; -1 = unknown), got {occluded!r}"
        )
    return {
        **{k: v for k, v in obj.items() if k not in (*_REQUIRED, "occluded")},  # extra keys are kept
        "id": int(oid),
        "class": cls,
        "box": _box(obj["box"], f"{where}.box", size),
        "visible_fraction": _fraction(obj["visible_fraction"], f"{where}.visible_fraction"),
        "truncated": _fraction(obj["truncated"], f"{where}.truncated"),
        "occluded": int(occluded),
        "box3d": _box3d(obj["box3d"], f"{where}.box3d"),
    }


def validate_objects(
    data: Any,
    path: Path | str,
    size: tuple[int, int] | None,
    object_classes: Sequence[str] | None,
    *,
    instances: np.ndarray | None = None,
    warn: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Check parsed objects-file content ``data`` of file ``path``; return its objects normalised.

    Args:
        data: ``{"objects": [...]}`` (parsed JSON).
        path: the file, named in every message.
        size: (H, W) of the sample's image (None: boxes are not checked against the image).
        object_classes: the dataset's ``object_classes`` (None: any non-empty name).
        instances: the sample's instance mask (H, W), when it has one: ids missing from it and boxes more than
            one pixel off their mask box become warnings.
        warn: list that collects those warnings; None issues them with ``warnings.warn``.

    Raises:
        DatasetFormatError: naming the file, the object index and the field, for anything malformed.
    """
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise DatasetFormatError(
            f'{path}: an objects file must be a JSON object {{"objects": [...]}} (a list, [] for none), got '
            f"{type(data).__name__}{'' if not isinstance(data, dict) else ' without an objects list'}"
        )
    objects = [
        _object(o, f"{path}: objects[{i}]", size, object_classes) for i, o in enumerate(data["objects"])
    ]
    seen: dict[int, int] = {}
    for i, o in enumerate(objects):
        if o["id"] > 0 and o["id"] in seen:
            raise DatasetFormatError(
                f"{path}: objects[{i}].id {o['id']} is also the id of objects[{seen[o['id']]}]; ids >= 1 name one "
                "object each in the instance mask (use 0 for objects without a mask)"
            )
        seen[o["id"]] = i
    if instances is not None:
        found = instance_warnings(objects, instances, path)
        if warn is None:
            for message in found:
                warnings.warn(message, stacklevel=2)
        else:
            warn += found
    return objects


def instance_warnings(objects: list[dict[str, Any]], instances: np.ndarray, path: Path | str) -> list[str]:
    """Disagreements between validated ``objects`` of file ``path`` and the sample's instance mask.

    An id >= 1 that the mask does not contain, a mask id that no object has, and a box more than one pixel from
    its mask pixels' box (any edge) are suspicious but loadable: warnings, not errors.
    """
    boxes = boxes_from_instances(instances)
    orphans = sorted(set(boxes) - {o["id"] for o in objects})
    found = []
    if orphans:
        found.append(
            f"{path}: instance mask ids {orphans[:10]} have no object in this file; add their objects or set those "
            "mask pixels to 0"
        )
    for i, o in enumerate(objects):
        if o["id"] == 0:
            continue
        mask_box = boxes.get(o["id"])
        if mask_box is None:
            found.append(
                f"{path}: objects[{i}].id {o['id']} does not occur in the instance mask; fix the id, or use 0 "
                "for an object without mask pixels"
            )
        elif max(abs(a - b) for a, b in zip(o["box"], mask_box, strict=True)) > 1.0:
            found.append(
                f"{path}: objects[{i}].box {o['box']} differs from its instance-mask pixels' box {mask_box} by "
                "more than 1 pixel; the box should be the modal box of the visible pixels"
            )
    return found


# ---------------------------------------------------------------------------------------------- read / write
def read_objects(
    path: Path | str,
    size: tuple[int, int] | None,
    object_classes: Sequence[str] | None,
    *,
    instances: np.ndarray | None = None,
    warn: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Read and validate ``objects/<id>.json`` (see :func:`validate_objects`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: objects file not found; restore it or remove the sample's objects")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(
            f"{path}: objects file is not valid UTF-8 JSON ({e}); fix or re-export it"
        ) from e
    return validate_objects(data, path, size, object_classes, instances=instances, warn=warn)


def _plain(value: Any) -> Any:
    """NumPy numbers and arrays (in extra keys) as plain JSON numbers and lists."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def objects_text(objects: list[dict[str, Any]], path: Path | str = "objects file") -> str:
    """The text of an objects file: one object per line (short, diffable); strict JSON (no NaN)."""
    try:
        lines = ",\n".join(f"  {json.dumps(o, allow_nan=False, default=_plain)}" for o in objects)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(
            f"{path}: objects cannot be stored as JSON ({e}); extra keys must hold numbers, strings, lists or "
            "dicts (no NaN or inf)"
        ) from e
    return '{"objects": [\n' + lines + "\n]}\n" if objects else '{"objects": []}\n'


def write_objects(
    path: Path | str,
    objects: list[dict[str, Any]] | dict[str, Any],
    *,
    size: tuple[int, int] | None = None,
    object_classes: Sequence[str] | None = None,
    fsync: bool = True,
) -> Path:
    """Validate ``objects`` (a list, or ``{"objects": [...]}``) as a reader would (:func:`validate_objects`)
    and write them atomically.

    NumPy numbers are accepted and stored as plain JSON numbers; pass the image ``size`` and the dataset's
    ``object_classes`` to check the boxes and class names too. ``fsync=False``: see
    :func:`densemtl.data.folder.write_sample`.
    """
    path = Path(path)
    data = objects if isinstance(objects, dict) else {"objects": list(objects)}
    clean = validate_objects(data, path, size, object_classes)
    return atomic_write_text(path, objects_text(clean, path), fsync=fsync)


def encode_instances(instance_ids: Any, path: Path | str = "instance mask") -> np.ndarray:
    """An instance-id array about to be written, checked: (H, W) integers 0..65535, returned as uint16."""
    arr = np.asarray(instance_ids)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or 0 in arr.shape or arr.dtype.kind not in "iu":
        raise DatasetFormatError(
            f"{path}: instance ids must be an (H, W) integer array (0 = no object), got {arr.dtype} {arr.shape}"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_INSTANCE_ID):
        raise DatasetFormatError(
            f"{path}: instance ids {int(arr.min())}..{int(arr.max())} do not fit uint16 (0..{MAX_INSTANCE_ID}); "
            "renumber the objects of the sample 1, 2, ..."
        )
    return np.ascontiguousarray(arr, dtype=np.uint16)


def instances_png_bytes(instance_ids: Any, path: Path | str = "instance mask") -> bytes:
    """``instance_ids`` (see :func:`encode_instances`) as the bytes of a 16-bit grayscale PNG (mode I;16)."""
    return png_bytes(encode_instances(instance_ids, path))


def read_instances(path: Path | str, size: tuple[int, int] | None) -> np.ndarray:
    """``instances/<id>.png`` as (H, W) uint16 ids; 16-bit (or 8-bit) single-channel PNG of the image's size."""
    path = Path(path)
    img = open_image(path, "instance mask")
    if img.format != "PNG" or img.mode not in (*DEPTH_MODES, "L"):
        raise DatasetFormatError(
            f"{path}: an instance mask must be a single-channel 16-bit PNG (mode I;16) of object ids, got "
            f"{img.format} mode {img.mode}; colour-coded instance images must be converted to ids first"
        )
    ids = np.asarray(img)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > MAX_INSTANCE_ID):
        raise DatasetFormatError(f"{path}: instance ids {int(ids.min())}..{int(ids.max())} are not 0..65535")
    if size is not None:
        check_size(ids, path, tuple(size), "instance mask")
    return ids.astype(np.uint16)


def boxes_from_instances(instance_ids: np.ndarray) -> dict[int, list[float]]:
    """Modal box ``[x0, y0, x1, y1]`` (pixel edges) of each id >= 1 in an (H, W) id map, by id (ascending).

    Linear time: ids are packed densely with a bincount, then per id the rows and columns it occupies are
    marked in two small (ids, H) and (ids, W) tables whose first and last True give the edges.
    """
    ids = np.asarray(instance_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"instance ids must be an (H, W) integer array, got {ids.dtype} {ids.shape}")
    h, w = ids.shape
    flat = ids.ravel()
    sel = np.flatnonzero(flat > 0)
    if not len(sel):
        return {}
    vals = flat[sel].astype(np.int64)
    present = np.flatnonzero(np.bincount(vals))  # (K,) ascending ids
    dense = np.zeros(int(present[-1]) + 1, dtype=np.int64)
    dense[present] = np.arange(len(present))
    k = dense[vals]
    rows, cols = np.zeros((len(present), h), bool), np.zeros((len(present), w), bool)
    rows[k, sel // w] = True
    cols[k, sel % w] = True
    y0, y1 = rows.argmax(1), h - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), w - cols[:, ::-1].argmax(1)
    return {
        int(i): [float(a), float(b), float(c), float(d)]
        for i, a, b, c, d in zip(present, x0, y0, x1, y1, strict=True)
    }
