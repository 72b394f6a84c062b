"""KITTI object benchmark: 2-D and 3-D boxes from ``label_2/<id>.txt`` with ``calib/<id>.txt``, in our schema.

Layout (``data_object_image_2``, ``data_object_label_2``, ``data_object_calib`` unpacked)::

    <base>/image_2/<id>.png     left colour camera (camera 2), ~1242x375
    <base>/label_2/<id>.txt     one object per line, 15 values (16 with a detection score)
    <base>/calib/<id>.txt       P0..P3 (3x4), R0_rect (3x3), Tr_velo_to_cam, Tr_imu_to_velo (3x4), row-major

Label columns (object devkit ``readme.txt``): ``type truncated occluded alpha x1 y1 x2 y2 h w l x y z
rotation_y [score]``. ``truncated`` is 0..1, ``occluded`` 0 fully visible, 1 partly, 2 largely occluded,
3 unknown (kept as is); DontCare lines carry -1 for both (we write None and -1).

**Classes**: by default Car, Pedestrian and Cyclist are kept, named ``car``, ``pedestrian``, ``cyclist`` (lower
case, so ``car`` is the same string as in Cityscapes); Van, Truck, Person_sitting, Tram, Misc and DontCare are
dropped. Pass ``classes`` to keep others under their own lower-case name (DontCare regions then come with no
box3d: the devkit writes -1 sizes and -1000 locations for them).

**2-D boxes** are float pixel coordinates in the pixel-*centre* convention of P2 (pixel i's centre at i; the
devkit evaluation takes areas as (x2 - x1)(y2 - y1), with no +1) and are clipped by KITTI to [0, W-1] x
[0, H-1]. Our boxes use pixel *corners* (pixel i covers [i, i + 1]), so every coordinate gains 0.5, and a
coordinate clipped to the border (<= 0, >= W - 1 or H - 1) moves onto our border (0, W or H).

**3-D boxes**: ``location`` (x, y, z) is the *bottom* centre of the box in the rectified camera-0 frame (x right,
y down, z forward; the devkit's corners run from y to y - h), dimensions are (h, w, l) and ``rotation_y`` turns
the length axis about y (0 = facing +x). P2 = K [I | t] with t = K^-1 P2[:, 3] (about (0.06, 0, 0.003) m):
camera 2 shares camera 0's rectified orientation and a point p of camera 0 is at p + t in camera 2. We return
the box in camera 2's frame, the frame of the image and of the intrinsics (fx, fy, cx, cy) = K: geometric centre
(x, y - h / 2, z) + t, size [l, w, h], yaw = rotation_y (a translation does not turn the box). Projecting that
centre with K alone then equals projecting the label's centre with P2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.data.format import DatasetFormatError
from densemtl.datasets.common import Intrinsics, read_rgb
from densemtl.datasets.objects_cityscapes import Objects, make_object

KITTI_TYPES: tuple[str, ...] = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc",
                                "DontCare")  # fmt: skip
DEFAULT_CLASSES: tuple[str, ...] = ("Car", "Pedestrian", "Cyclist")
_CALIB_SIZES = {
    "P0": 12,
    "P1": 12,
    "P2": 12,
    "P3": 12,
    "R0_rect": 9,
    "Tr_velo_to_cam": 12,
    "Tr_imu_to_velo": 12,
}


def object_classes(classes: tuple[str, ...] = DEFAULT_CLASSES) -> list[str]:
    """Our class names for the kept KITTI types (dataset.json ``"object_classes"``)."""
    return [c.lower() for c in classes]


@dataclass(frozen=True)
class KittiCalib:
    """One ``calib/<id>.txt``: ``P`` {camera: (3, 4)}, R0_rect (3, 3) and Tr_velo_to_cam (3, 4) (None if absent)."""

    P: dict[int, np.ndarray]
    R0_rect: np.ndarray | None = None
    Tr_velo_to_cam: np.ndarray | None = None

    def intrinsics(self, camera: int = 2) -> Intrinsics:
        """(fx, fy, cx, cy) in pixels of rectified camera ``camera``."""
        p = self._projection(camera)
        return float(p[0, 0]), float(p[1, 1]), float(p[0, 2]), float(p[1, 2])

    def offset(self, camera: int = 2) -> np.ndarray:
        """(3,) metres t with p_camera = p_camera0 + t (rectified frames): t = K^-1 P[:, 3]."""
        p = self._projection(camera)
        return np.linalg.solve(p[:, :3], p[:, 3])

    def _projection(self, camera: int) -> np.ndarray:
        if camera not in self.P:
            raise KeyError(f"this calibration has no P{camera} (it has {sorted(self.P)})")
        return self.P[camera]


def _floats(text: str, path: Path, lineno: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split()]
    except ValueError as e:
        raise DatasetFormatError(f"{path}:{lineno}: {what} holds a non-number ({e}); restore the file") from e
    if not all(math.isfinite(v) for v in values):
        raise DatasetFormatError(f"{path}:{lineno}: {what} holds inf/nan; restore the file")
    return values


def _read_lines(path: Path, what: str, archive: str) -> list[str]:
    """The lines of a KITTI text file; an unreadable one names the file and the archive it comes from."""
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path}: unreadable {what} ({e}); restore it from {archive}") from e


def read_object_calib(path: str | Path) -> KittiCalib:
    """Parse a KITTI object ``calib/<id>.txt`` (``key: values`` lines); P0..P3 must be rectified (K [I | t]).

    Raises:
        DatasetFormatError: a malformed line (file and line number named), no P2 line, or a P whose left 3x3 is
            not an upper-triangular camera matrix.
    """
    path = Path(path)
    lines = _read_lines(path, "calibration", "data_object_calib")
    mats: dict[str, np.ndarray] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        key = key.strip()
        if not sep:
            raise DatasetFormatError(
                f"{path}:{lineno}: expected 'KEY: numbers', got {line[:60]!r}; restore the file"
            )
        if key not in _CALIB_SIZES:  # other keys (none in the object benchmark) are not needed
            continue
        values = _floats(rest, path, lineno, key)
        if len(values) != _CALIB_SIZES[key]:
            raise DatasetFormatError(
                f"{path}:{lineno}: {key} has {len(values)} numbers, expected {_CALIB_SIZES[key]}; restore the file"
            )
        mats[key] = np.array(values, np.float64).reshape(3, -1)
    if "P2" not in mats:
        raise DatasetFormatError(f"{path}: no P2 line; is this a KITTI object calib/<id>.txt?")
    P = {int(k[1]): m for k, m in mats.items() if k.startswith("P")}
    for cam, p in P.items():
        k = p[:, :3]
        if (
            abs(k[1, 0]) + abs(k[2, 0]) + abs(k[2, 1]) > 1e-9
            or abs(k[2, 2] - 1) > 1e-9
            or min(k[0, 0], k[1, 1]) <= 0
        ):
            raise DatasetFormatError(
                f"{path}: P{cam} is not a rectified projection K [I | t]; restore the file"
            )
    return KittiCalib(P, mats.get("R0_rect"), mats.get("Tr_velo_to_cam"))


@dataclass(frozen=True)
class KittiLabel:
    """One line of ``label_2/<id>.txt``, as written (KITTI conventions, camera-0 rectified frame)."""

    type: str
    truncated: float
    occluded: int
    alpha: float
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 (pixel centres)
    dimensions: tuple[float, float, float]  # h, w, l metres
    location: tuple[float, float, float]  # bottom centre x, y, z metres
    rotation_y: float
    score: float | None = None


def _label(line: str, path: Path, lineno: int) -> KittiLabel:
    fields = line.split()
    if len(fields) not in (15, 16):
        raise DatasetFormatError(
            f"{path}:{lineno}: {len(fields)} values, expected 15 (type truncated occluded alpha x1 y1 x2 y2 h w l "
            "x y z rotation_y) or 16 (with score); fix or restore the file"
        )
    v = _floats(" ".join(fields[1:]), path, lineno, "the label")
    trunc, occ, bbox = v[0], v[1], tuple(v[3:7])
    if occ not in (-1, 0, 1, 2, 3) or not (trunc == -1 or 0 <= trunc <= 1):
        raise DatasetFormatError(
            f"{path}:{lineno}: occluded must be 0..3 and truncated 0..1 (-1 for DontCare), got {occ:g} and "
            f"{trunc:g}; fix or restore the file"
        )
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise DatasetFormatError(
            f"{path}:{lineno}: box {bbox} has x2 < x1 or y2 < y1; fix or restore the file"
        )
    return KittiLabel(fields[0], trunc, int(occ), v[2], bbox, tuple(v[7:10]), tuple(v[10:13]), v[13],
                      v[14] if len(v) == 15 else None)  # fmt: skip


def read_object_labels(path: str | Path) -> list[KittiLabel]:
    """Every line of a ``label_2/<id>.txt`` (blank lines skipped; DontCare included).

    Raises:
        DatasetFormatError: a line with the wrong number of values, a non-number or an out-of-range field; the
            message names the file and the line number.
    """
    path = Path(path)
    lines = _read_lines(path, "label file", "data_object_label_2")
    return [_label(line, path, n) for n, line in enumerate(lines, start=1) if line.strip()]


def kitti_box(bbox: tuple[float, float, float, float], size: tuple[int, int] | None) -> list[float]:
    """A KITTI box (pixel centres, clipped to [0, W-1] x [0, H-1]) -> our corners (see the module docstring)."""
    box = [c + 0.5 for c in bbox]
    if size is None:
        return box
    h, w = size  # a side KITTI clipped to the first/last pixel centre goes to our border
    x0 = 0.0 if bbox[0] <= 0 else min(box[0], float(w))
    y0 = 0.0 if bbox[1] <= 0 else min(box[1], float(h))
    x1 = float(w) if bbox[2] >= w - 1 else max(box[2], 0.0)
    y1 = float(h) if bbox[3] >= h - 1 else max(box[3], 0.0)
    return [x0, y0, x1, y1]


def kitti_box3d(label: KittiLabel, offset: np.ndarray) -> dict[str, Any] | None:
    """Our box3d (camera-2 frame, geometric centre) from a label; None for DontCare-style invalid boxes."""
    h, w, length = label.dimensions
    x, y, z = label.location
    if min(h, w, length) <= 0 or z <= -999:  # devkit defaults for "no 3-D box": -1 sizes, -1000 location
        return None
    center = np.array([x, y - h / 2, z]) + offset  # y points down: the centre is h/2 above the bottom
    return {"center": [float(c) for c in center], "size": [length, w, h], "yaw": label.rotation_y}


def kitti_objects(
    labels: list[KittiLabel],
    calib: KittiCalib,
    size: tuple[int, int] | None = None,
    classes: tuple[str, ...] = DEFAULT_CLASSES,
    camera: int = 2,
) -> Objects:
    """Our objects (id 0: KITTI has no masks) for the labels of one image of (H, W) ``size``."""
    offset = calib.offset(camera)
    out = []
    for lab in labels:
        if lab.type not in classes:
            continue
        truncated = None if lab.truncated < 0 else lab.truncated
        out.append(make_object(0, lab.type.lower(), kitti_box(lab.bbox, size), truncated, lab.occluded,
                               box3d=kitti_box3d(lab, offset)))  # fmt: skip
    return out


def list_object_frames(base: str | Path) -> list[str]:
    """Ids (``000000`` ...) of every ``<base>/label_2/<id>.txt``, sorted."""
    folder = Path(base) / "label_2"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: expected the KITTI object layout <base>/{{image_2,label_2,calib}}/"
        )
    return sorted(p.stem for p in folder.glob("*.txt"))


def load_object_frame(
    base: str | Path, frame_id: str, classes: tuple[str, ...] = DEFAULT_CLASSES
) -> dict[str, Any]:
    """One KITTI object frame as a sample: image (H, W, 3) uint8, camera-2 intrinsics and objects.

    Raises:
        FileNotFoundError: the label's image or calibration file is missing (both named).
    """
    base = Path(base)
    image_path, calib_path = base / "image_2" / f"{frame_id}.png", base / "calib" / f"{frame_id}.txt"
    for path, archive in ((image_path, "data_object_image_2"), (calib_path, "data_object_calib")):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: label_2/{frame_id}.txt needs it; unpack {archive} into {base.parent}"
            )
    image = read_rgb(image_path)
    calib = read_object_calib(calib_path)
    labels = read_object_labels(base / "label_2" / f"{frame_id}.txt")
    objects = kitti_objects(labels, calib, image.shape[:2], classes)
    return {"image": image, "intrinsics": calib.intrinsics(2), "objects": objects, "instances": None}
