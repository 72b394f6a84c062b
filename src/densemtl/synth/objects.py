"""Per-object ground truth of a rendered view: instance mask and the objects list of the folder format.

Every car and person of a ``Scene`` is one object (its primitives share ``Scene.instance``). For a view:

* ``instances`` (H, W) uint16: the object each pixel's ray hits first, 0 elsewhere; the objects with at least one
  visible pixel are numbered 1..K in scene order (their order of sampling);
* per object (see ``densemtl.data.objects``): ``class`` ("car" or "person"); ``box``, the modal box of its mask
  pixels; ``visible_fraction``, its visible pixels over the pixels it covers when ray-cast alone (every other
  primitive removed) inside the image: exact, no approximation; ``truncated``, the share of the bounding
  rectangle of its projected 3-D box that lies outside the image (the 3-D box is clipped at the near plane
  z = 0.05 m first): an approximation, a car's silhouette does not fill its projected box;
* ``occluded`` is left unknown (-1 once written): ``visible_fraction`` says more;
* ``box3d``: the object's exact world box (the union of its primitives' boxes: cars and people stand upright,
  aligned with the road) in the OpenCV camera frame: ``center`` = R^T (c - camera position) exactly, ``size`` =
  (length along the road z, width along x, height along y), ``yaw`` = KITTI ``rotation_y`` of the heading
  (cos ry, 0, -sin ry). The scene's cars and people are front-back symmetric, so the heading is a convention:
  +z (away from a camera looking down the road) right of the road centre x = 0, -z left of it, as right-hand
  traffic drives. The camera's pitch and roll (a few degrees) tilt the upright box in the camera frame, which
  (center, size, yaw) cannot express: with ``meta["camera_to_world"]`` the exact corners are recoverable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from densemtl.data.objects import boxes_from_instances
from densemtl.synth import scene as sc
from densemtl.synth.raycast import Camera, Hits, projected_extent
from densemtl.synth.scene import Scene

OBJECT_CLASSES = ("car", "person")
_CLASS_OF_LABEL = {sc.CAR: "car", sc.PERSON: "person"}


def world_boxes(scene: Scene, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World boxes lo, hi (K, 3) float64 and semantic labels (K,) of the objects ``ids`` (K,) of ``scene``."""
    lo, hi = scene.bounds()
    slot = np.full(int(scene.instance.max(initial=0)) + 1, -1)
    slot[ids] = np.arange(len(ids))
    k = slot[scene.instance]  # (M,) object of each primitive, -1 for the others
    prim = np.flatnonzero(k >= 0)
    k = k[prim]
    out_lo, out_hi = np.full((len(ids), 3), np.inf), np.full((len(ids), 3), -np.inf)
    np.minimum.at(out_lo, k, lo[prim].astype(np.float64))
    np.maximum.at(out_hi, k, hi[prim].astype(np.float64))
    labels = np.zeros(len(ids), dtype=np.uint8)
    labels[k] = scene.label[prim]
    return out_lo, out_hi, labels


def camera_boxes(lo: np.ndarray, hi: np.ndarray, camera: Camera) -> list[dict[str, Any]]:
    """Upright world boxes lo..hi (K, 3) as ``box3d`` dicts in the camera frame (see the module docstring)."""
    r = camera.rotation()  # camera -> world; camera = R^T world
    centre = ((lo + hi) / 2 - np.asarray(camera.position)) @ r  # (K, 3)
    ext = hi - lo
    heading = np.where((lo[:, 0] + hi[:, 0]) / 2 >= 0, 1.0, -1.0)[:, None] * r[2]  # (K, 3) R^T (0, 0, +-1)
    yaw = np.arctan2(-heading[:, 2], heading[:, 0])
    return [
        {
            "center": [round(float(v), 5) for v in c],
            "size": [round(float(e[2]), 5), round(float(e[0]), 5), round(float(e[1]), 5)],
            "yaw": round(float(y), 6),
        }
        for c, e, y in zip(centre, ext, yaw, strict=True)
    ]


def truncation(lo: np.ndarray, hi: np.ndarray, camera: Camera, size: tuple[int, int]) -> np.ndarray:
    """(K,) share of each box's projected bounding rectangle outside the image (1 for a box behind the camera)."""
    h, w = size
    (u0, u1, v0, v1), ok = projected_extent(lo, hi, camera)
    area = (u1 - u0) * (v1 - v0)
    inside = np.clip(np.minimum(u1, w - 0.5) - np.maximum(u0, -0.5), 0, None) * np.clip(
        np.minimum(v1, h - 0.5) - np.maximum(v0, -0.5), 0, None
    )  # the image spans -0.5..W-0.5 in pixel-centre coordinates
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(ok & (area > 0), 1 - inside / area, 1.0)
    return np.clip(share, 0.0, 1.0)


def coverage(scene: Scene, hits: Hits, group: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups,) int64: how many pixels each group of object primitives would cover if nothing else were there.

    ``group`` (M,) gives each primitive's group 0..n_groups-1, or -1 to leave it out; only object primitives
    (``Scene.instance`` > 0) can be in a group. A pixel is covered where its ray enters a primitive of the
    group in front of the camera (t > 0): ``cast`` records those pixels (``hits.entered``) with the arithmetic
    that decides which primitive a pixel shows, so every pixel that ``hits`` gives to a primitive counts as
    covered by its group. Each group's pixels are marked in a buffer the size of the union of its rectangles.
    """
    if (group[scene.instance <= 0] >= 0).any():
        raise ValueError("coverage: only object primitives (instance > 0) can be in a group")
    h, w = hits.t.shape
    prims = np.flatnonzero(group >= 0)
    rects, g = hits.rects[prims], group[prims]  # (P, 4) v0, v1, u0, u1
    area = (rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])
    box = np.tile(np.array([h, 0, w, 0]), (n_groups, 1))  # (G, 4) union of each group's rectangles
    for c, op in enumerate((np.minimum, np.maximum, np.minimum, np.maximum)):
        op.at(box[:, c], g[area > 0], rects[area > 0, c])
    gh, gw = np.maximum(box[:, 1] - box[:, 0], 0), np.maximum(box[:, 3] - box[:, 2], 0)
    start = np.concatenate([[0], np.cumsum(gh * gw)])  # each group's mask in one flat buffer
    covered = np.zeros(start[-1], dtype=bool)
    prim, pix = hits.entered
    k = group[prim]
    pix, k = pix[k >= 0], k[k >= 0]
    covered[start[k] + (pix // w - box[k, 0]) * gw[k] + pix % w - box[k, 2]] = True
    total = np.concatenate([[0], np.cumsum(covered, dtype=np.int64)])
    return total[start[1:]] - total[start[:-1]]


def annotate(scene: Scene, camera: Camera, hits: Hits) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The instance mask (H, W) uint16 and the objects list (folder format) of a cast view ``hits``.

    Per-pixel work is one bincount and one table look-up of the hit primitive indices (plus the boxes); the
    rest is per primitive or per object.
    """
    shifted = hits.index + 2  # (H, W) primitive index + 2 >= 0 (NOTHING = -2, GROUND = -1)
    prim_pixels = np.bincount(shifted.ravel(), minlength=len(scene) + 2)[2:]  # (M,) visible pixels
    per_object = np.bincount(scene.instance, weights=prim_pixels, minlength=1)  # by scene object id
    ids = np.flatnonzero(per_object[1:]) + 1  # (K,) objects with visible pixels, ascending
    renumber = np.zeros(len(per_object), np.uint16)
    renumber[ids] = np.arange(1, len(ids) + 1)
    lut = np.concatenate([np.zeros(2, np.uint16), renumber[scene.instance]])  # by primitive index + 2
    instances = np.take(lut, shifted)  # (H, W) uint16
    if not len(ids):
        return instances, []
    group = renumber[scene.instance].astype(np.int64) - 1  # (M,) object 0..K-1; -1: no object or hidden
    # cast's pixels are a subset of each group's coverage (same arithmetic); max() only guards that promise
    covered = np.maximum(coverage(scene, hits, group, len(ids)), per_object[ids])
    lo, hi, labels = world_boxes(scene, ids)
    cut = truncation(lo, hi, camera, hits.t.shape)
    boxes = boxes_from_instances(instances)
    box3d = camera_boxes(lo, hi, camera)
    return instances, [
        {
            "id": k + 1,
            "class": _CLASS_OF_LABEL[int(labels[k])],
            "box": boxes[k + 1],
            "visible_fraction": round(float(per_object[ids[k]] / covered[k]), 6),
            "truncated": round(float(cut[k]), 6),
            "box3d": box3d[k],
        }
        for k in range(len(ids))
    ]
