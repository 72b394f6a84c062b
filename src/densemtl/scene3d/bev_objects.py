"""Detected objects in the bird's-eye view: each one's footprint from the objects task's 2-D box, distance, 3-D
size and yaw, drawn as an oriented box over the BEV picture and listed in ``<stem>_bev_objects.json``.

Units are metres and radians throughout. The geometry, step by step:

- **3-D centre** (camera frame, OpenCV: x right, y down, z forward): the ray through the 2-D box centre at the
  predicted depth Z (``objects_distance``). Boxes are pixel *edges* and intrinsics use pixel *centres*
  (docs/folder_format.md), so the centre is ``u = (x0 + x1) / 2 - 0.5``, ``v = (y0 + y1) / 2 - 0.5``, then
  ``X = (u - cx) Z / fx``, ``Y = (v - cy) Z / fy``.
- **Footprint**: the box's bottom face, ``h / 2`` below the centre (``Y + h / 2``, y points down). KITTI's
  ``rotation_y`` ``ry`` gives the heading ``(cos ry, 0, -sin ry)`` (length ``l`` along it) and the side
  ``(sin ry, 0, cos ry)`` (width ``w`` along it); corners in KITTI's order: front-left, front-right, rear-right,
  rear-left as ``(+l/2, +w/2), (+l/2, -w/2), (-l/2, -w/2), (-l/2, +w/2)`` in (heading, side).
- **Ground frame** (x right, y up, z forward, ``geometry.to_ground_frame`` with the scene's pose): the BEV uses
  x and z. The box is rigid in the camera frame, so a camera pitch or roll of a few degrees tilts it and its
  footprint shrinks by cos(tilt) along the tilt (< 0.4 % at 5 degrees, far below a 0.2 m cell). The ground
  yaw keeps the camera's convention: heading ``(cos yaw, -sin yaw)`` in ground (x, z), so a level camera has
  ``yaw = ry``.

Drawing rasterises exactly on the BEV cells: a cell belongs to an object when its centre lies inside the
footprint (plus the cell of the footprint's centre, so that an object smaller than a cell still shows), rather
than ``cv2.fillPoly``, which rounds vertices to whole pixels: one BEV pixel is a cell of 0.2 m.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemtl.fileio import atomic_write_text
from densemtl.scene3d.bev_layers import BEV_COLORS, BevGrid, mark_camera
from densemtl.scene3d.geometry import CameraPose, Intrinsics, check_intrinsics, to_ground_frame
from densemtl.tasks.objects import OBJECTS
from densemtl.viz.boxes import BOX_COLORS

# The objects task's outputs (``Objects.to_numpy``), read under the task's own name like scene.py's DEPTH_KEY.
BOXES_KEY = f"{OBJECTS.name}_boxes"  # float32 (N, 4) pixel edges x0, y0, x1, y1
SCORES_KEY = f"{OBJECTS.name}_scores"  # float32 (N,) in [0, 1]
CLASSES_KEY = f"{OBJECTS.name}_classes"  # int32 (N,) indexes info["object_classes"]
DISTANCE_KEY = f"{OBJECTS.name}_distance"  # float32 (N,) metres, depth Z of the 3-D centre
SIZE_KEY = f"{OBJECTS.name}_size3d"  # float32 (N, 3) metres: length, width, height
YAW_KEY = f"{OBJECTS.name}_yaw"  # float32 (N,) radians, KITTI rotation_y in the camera frame
REQUIRED = (BOXES_KEY, CLASSES_KEY, DISTANCE_KEY, SIZE_KEY, YAW_KEY)

FILL_ALPHA = 0.4  # footprint interior: 40 % class colour over the BEV, so occupancy still shows through
HEADING_TICK_M = 0.8  # heading tick ahead of the front edge, at least 2 cells long
LEGEND_MIN_ROWS = 64  # no legend on a BEV picture this small: the text would cover the map


def has_objects(pred: dict[str, np.ndarray]) -> bool:
    """Whether ``pred`` holds the objects task's detections (a model without that task has none)."""
    return BOXES_KEY in pred


def _detections(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The detection arrays of ``pred`` as float64/int64, checked for presence and matching lengths."""
    missing = [k for k in REQUIRED if k not in pred]
    if missing:
        raise ValueError(f"the prediction has {BOXES_KEY!r} but not {missing}: pass every output of the objects "
                         "task (Objects.to_numpy)")  # fmt: skip
    out = {k: np.asarray(pred[k], np.float64) for k in REQUIRED}
    n = len(out[BOXES_KEY])
    out[SCORES_KEY] = np.asarray(pred.get(SCORES_KEY, np.ones(n)), np.float64)
    shapes = {BOXES_KEY: (n, 4), SIZE_KEY: (n, 3)}
    for k, v in out.items():
        if v.shape != shapes.get(k, (n,)):
            raise ValueError(
                f"prediction {k!r} has shape {v.shape}, expected {shapes.get(k, (n,))} for {n} objects"
            )
    out[CLASSES_KEY] = out[CLASSES_KEY].astype(np.int64)
    return out


def object_centres_camera(pred: dict[str, np.ndarray], intrinsics: Intrinsics) -> np.ndarray:
    """3-D centres (N, 3) metres in the camera frame: the 2-D box centre's ray at the predicted depth Z."""
    fx, fy, cx, cy = check_intrinsics(intrinsics)
    det = _detections(pred)
    boxes, z = det[BOXES_KEY], det[DISTANCE_KEY]  # (N, 4) pixel edges, (N,) metres
    u = (boxes[:, 0] + boxes[:, 2]) / 2 - 0.5  # pixel edges -> the intrinsics' pixel-centre convention
    v = (boxes[:, 1] + boxes[:, 3]) / 2 - 0.5
    return np.stack([(u - cx) * z / fx, (v - cy) * z / fy, z], axis=1)


def object_corners_camera(pred: dict[str, np.ndarray], intrinsics: Intrinsics) -> np.ndarray:
    """Footprint corners (N, 4, 3) metres in the camera frame: the bottom face of each 3-D box, in the order
    front-left, front-right, rear-right, rear-left (front = along the heading ``(cos ry, 0, -sin ry)``)."""
    det = _detections(pred)
    centre = object_centres_camera(pred, intrinsics)  # (N, 3)
    length, width, height = det[SIZE_KEY].T  # (N,) each, metres
    ry = det[YAW_KEY]
    zero = np.zeros_like(ry)
    heading = np.stack([np.cos(ry), zero, -np.sin(ry)], axis=1)  # (N, 3) unit
    side = np.stack([np.sin(ry), zero, np.cos(ry)], axis=1)  # (N, 3) unit, across the heading
    bottom = centre + np.stack([zero, height / 2, zero], axis=1)  # y down: the bottom face is h / 2 lower
    signs = np.array([(1, 1), (1, -1), (-1, -1), (-1, 1)], np.float64)  # (4, 2) in (heading, side)
    along = signs[None, :, 0:1] * (length / 2)[:, None, None] * heading[:, None]  # (N, 4, 3)
    across = signs[None, :, 1:2] * (width / 2)[:, None, None] * side[:, None]
    return bottom[:, None] + along + across


def corners_to_ground(corners: np.ndarray, pose: CameraPose) -> np.ndarray:
    """Camera-frame points (..., 3) -> ground frame (..., 3) float64: x right, y up, z forward (metres)."""
    return to_ground_frame(np.asarray(corners, np.float64), pose).astype(np.float64)


def ground_yaw(yaw: np.ndarray, pose: CameraPose) -> np.ndarray:
    """Camera ``rotation_y`` (N,) -> yaw (N,) radians in the ground frame, heading ``(cos, -sin)`` in (x, z)."""
    ry = np.asarray(yaw, np.float64)
    heading = np.stack([np.cos(ry), np.zeros_like(ry), -np.sin(ry)], axis=-1) @ pose.rotation().T  # (N, 3)
    return np.arctan2(-heading[:, 2], heading[:, 0])


@dataclass(frozen=True)
class BevObjects:
    """Detections in the ground frame (metres, radians): class ids (N,), scores (N,), 3-D centre x/z (N, 2),
    yaw (N,) (heading ``(cos, -sin)`` in (x, z)), size (N, 3) length/width/height, footprint corners (N, 4, 2)
    (x, z) front-left, front-right, rear-right, rear-left; ``class_names`` name the ids."""

    classes: np.ndarray
    scores: np.ndarray
    centre_xz: np.ndarray
    yaw: np.ndarray
    size: np.ndarray
    corners_xz: np.ndarray
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.classes)


def bev_objects(
    pred: dict[str, np.ndarray], intrinsics: Intrinsics, pose: CameraPose, class_names: Sequence[str] = ()
) -> BevObjects | None:
    """The detections of ``pred`` in the BEV's ground frame, or None when the model has no objects task.

    Detections with a non-finite number, a depth <= 0 or a size <= 0 are left out: they have no footprint.
    """
    if not has_objects(pred):
        return None
    det = _detections(pred)
    ok = np.all([np.isfinite(v).all(axis=tuple(range(1, v.ndim))) for v in det.values()], axis=0)  # (N,)
    ok &= (det[DISTANCE_KEY] > 0) & (det[SIZE_KEY] > 0).all(axis=1)
    kept = {k: v[ok] for k, v in det.items()}
    centre = corners_to_ground(object_centres_camera(kept, intrinsics), pose)  # (N, 3)
    corners = corners_to_ground(object_corners_camera(kept, intrinsics), pose)  # (N, 4, 3)
    return BevObjects(
        classes=kept[CLASSES_KEY],
        scores=kept[SCORES_KEY],
        centre_xz=centre[:, [0, 2]],
        yaw=ground_yaw(kept[YAW_KEY], pose),
        size=kept[SIZE_KEY],
        corners_xz=corners[..., [0, 2]],
        class_names=tuple(class_names),
    )


def class_color(class_id: int) -> tuple[int, int, int]:
    """RGB colour of an object class, the same as its 2-D boxes' (``viz.boxes.BOX_COLORS``)."""
    return BOX_COLORS[int(class_id) % len(BOX_COLORS)]


def footprint_cells(corners_xz: np.ndarray, grid: BevGrid) -> np.ndarray:
    """Cells (rows, cols) bool whose centre lies inside the footprint polygon ``corners_xz`` (4, 2) metres, plus
    the cell holding the footprint's centre (an object smaller than a cell still covers one)."""
    from matplotlib.path import Path as Polygon

    x, z = grid.centres()  # (rows, cols) each
    centres = np.stack([x.ravel(), z.ravel()], axis=1)
    mask = Polygon(corners_xz).contains_points(centres).reshape(grid.shape)
    mid = corners_xz.mean(axis=0)
    row, col, inside = grid.cell_of(mid[None, 0], mid[None, 1])
    if inside[0]:
        mask[row[0], col[0]] = True
    return mask


def heading_cells(corners_xz: np.ndarray, grid: BevGrid) -> np.ndarray:
    """Cells (rows, cols) bool of the heading tick: from the front edge's midpoint outwards along the heading,
    ``max(HEADING_TICK_M, 2 cells)`` long, sampled every quarter cell."""
    front = (corners_xz[0] + corners_xz[1]) / 2  # (2,) midpoint of the front edge
    heading = front - (corners_xz[2] + corners_xz[3]) / 2
    norm = float(np.hypot(*heading))
    mask = np.zeros(grid.shape, bool)
    if norm == 0:
        return mask
    length = max(HEADING_TICK_M, 2 * grid.cell)
    steps = max(1, math.ceil(length / (grid.cell / 4)))
    # (steps,) metres: sub-step midpoints, so the front edge itself (a cell boundary, maybe) is not sampled
    t = (np.arange(steps) + 0.5) * (length / steps)
    points = front[None] + t[:, None] * (heading / norm)[None]
    row, col, inside = grid.cell_of(points[:, 0], points[:, 1])
    mask[row[inside], col[inside]] = True
    return mask


def draw_bev_objects(
    bev_rgb: np.ndarray,
    corners_xz: np.ndarray,
    classes: np.ndarray,
    grid: BevGrid,
    class_names: Sequence[str] = (),
) -> np.ndarray:
    """A copy of the BEV picture ``bev_rgb`` uint8 (rows, cols, 3) with each footprint (N, 4, 2) metres drawn.

    Each object gets its class colour (``class_color``): the interior blended at ``FILL_ALPHA``, its border
    cells and a heading tick ahead of the front edge in full colour. Objects are drawn in the given order (the
    last on top). With ``class_names``, a legend (the names of the classes drawn) goes at the top left; the
    camera's red mark is drawn again last so that no object hides it.
    """
    from scipy.ndimage import binary_erosion

    out = np.array(bev_rgb, dtype=np.uint8, copy=True)
    if out.shape[:2] != grid.shape:
        raise ValueError(
            f"the BEV picture is {out.shape[:2]} but the grid has {grid.shape} cells (rows, cols)"
        )
    corners_xz = np.asarray(corners_xz, np.float64).reshape(-1, 4, 2)
    classes = np.asarray(classes).reshape(-1)
    for corners, c in zip(corners_xz, classes, strict=True):
        color = np.array(class_color(c), np.float32)
        cells = footprint_cells(corners, grid)
        border = cells & ~binary_erosion(cells, border_value=0)
        inner = cells & ~border
        out[inner] = np.round((1 - FILL_ALPHA) * out[inner] + FILL_ALPHA * color).astype(np.uint8)
        out[border | heading_cells(corners, grid)] = color.astype(np.uint8)
    if class_names and len(classes) and out.shape[0] >= LEGEND_MIN_ROWS:
        _legend(out, sorted({int(c) for c in classes}), class_names)
    return mark_camera(out, grid)


def _legend(out: np.ndarray, ids: list[int], class_names: Sequence[str]) -> None:
    """Write the class names in their colours on a dark patch at the top left of ``out`` (rows, cols, 3), in
    place (dark: the class colours are bright, and the map there is often light free space)."""
    import cv2

    names = [class_names[c] if c < len(class_names) else str(c) for c in ids]
    width = max(cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, 0.3, 1)[0][0] for n in names)
    out[: 10 * len(ids) + 3, : width + 6] = BEV_COLORS["unknown"]
    for k, (c, name) in enumerate(zip(ids, names, strict=True)):
        cv2.putText(
            out, name, (3, 10 + 10 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.3, class_color(c), 1, cv2.LINE_AA
        )


def bev_objects_document(objects: BevObjects, grid: BevGrid) -> dict:
    """The JSON of ``<stem>_bev_objects.json``: per object class, score, ground-frame centre, yaw, size and
    footprint, plus the frame, the units and whether the centre lies inside the BEV grid."""
    items = []
    for i in range(len(objects)):
        c = int(objects.classes[i])
        x, z = (float(v) for v in objects.centre_xz[i])
        _, _, inside = grid.cell_of(np.array([x]), np.array([z]))
        items.append(
            {
                "class": objects.class_names[c] if c < len(objects.class_names) else str(c),
                "score": round(float(objects.scores[i]), 4),
                "centre_x_m": round(x, 3),
                "centre_z_m": round(z, 3),
                "yaw_rad": round(float(objects.yaw[i]), 4),
                "size_m": [round(float(v), 3) for v in objects.size[i]],
                "footprint_xz_m": [
                    [round(float(a), 3), round(float(b), 3)] for a, b in objects.corners_xz[i]
                ],
                "in_grid": bool(inside[0]),
            }
        )
    return {
        "frame": "ground: x right, y up, z forward, origin on the ground below the camera",
        "units": "metres, radians; yaw: heading (cos yaw, -sin yaw) in (x, z); size: length, width, height",
        "footprint_order": "front-left, front-right, rear-right, rear-left",
        "objects": items,
    }


def save_bev_objects(path: str | Path, objects: BevObjects, grid: BevGrid) -> Path:
    """Write ``bev_objects_document`` to ``path`` (``<stem>_bev_objects.json``) atomically."""
    return atomic_write_text(path, json.dumps(bev_objects_document(objects, grid), indent=1) + "\n")
