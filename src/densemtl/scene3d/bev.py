"""Bird's-eye view and per-image 3-D outputs: the names callers import, from where they live.

- :mod:`densemtl.scene3d.bev_layers`: the BEV grid and its layers (occupancy, class, height, drivable, free
  and, with depth uncertainty, confidence), their pictures and the PNG/NPY files;
- :mod:`densemtl.scene3d.scene`: the camera a prediction assumes, its ground-frame cloud and the files of
  ``predict --pointcloud --bev``.

Kept so that ``from densemtl.scene3d.bev import SceneOptions, write_scene_outputs`` goes on working; the two
modules are separate because the per-image part needs the BEV part and the two together pass 400 lines.
"""

from __future__ import annotations

from densemtl.scene3d.bev_layers import (
    BEV_COLORS,
    BYTES_PER_CELL,
    CONFIDENCE_LAYER,
    CONFIDENCE_TOLERANCE,
    DRIVABLE_NAMES,
    LAYERS,
    MAX_CELLS,
    UNKNOWN_CLASS,
    BevGrid,
    bev_map,
    check_positive,
    colorize_bev,
    colorize_confidence,
    depth_confidence,
    drivable_ids,
    free_space,
    save_bev,
)
from densemtl.scene3d.scene import (
    CONFIDENCE_KEY,
    DEFAULT_MAX_REL_STD,
    DEPTH_KEY,
    DEPTH_STD_KEY,
    LABEL_KEY,
    Scene,
    SceneOptions,
    known_focal,
    resolve_intrinsics,
    resolve_pose,
    sample_meta,
    scene_bev,
    scene_bev_picture,
    scene_of,
    write_scene_outputs,
)

__all__ = [
    "BEV_COLORS",
    "BYTES_PER_CELL",
    "CONFIDENCE_KEY",
    "CONFIDENCE_LAYER",
    "CONFIDENCE_TOLERANCE",
    "DEFAULT_MAX_REL_STD",
    "DEPTH_KEY",
    "DEPTH_STD_KEY",
    "DRIVABLE_NAMES",
    "LABEL_KEY",
    "LAYERS",
    "MAX_CELLS",
    "UNKNOWN_CLASS",
    "BevGrid",
    "Scene",
    "SceneOptions",
    "bev_map",
    "check_positive",
    "colorize_bev",
    "colorize_confidence",
    "depth_confidence",
    "drivable_ids",
    "free_space",
    "known_focal",
    "resolve_intrinsics",
    "resolve_pose",
    "sample_meta",
    "save_bev",
    "scene_bev",
    "scene_bev_picture",
    "scene_of",
    "write_scene_outputs",
]
