"""One prediction in 3-D: the camera it assumes, its ground-frame cloud and the per-image files that
``predict --pointcloud --bev`` writes (PLY, NPZ, BEV PNG/NPY).

With depth uncertainty (a ``depth_std`` output) the points whose relative depth std exceeds
``SceneOptions.max_rel_std`` are dropped before anything else, the ground-plane fit of the pose included:
a plane fitted to confident road points is not pulled by the blurred depth at object edges and far away.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemtl.scene3d.bev_layers import BevGrid, bev_map, check_positive, colorize_bev, drivable_ids, save_bev
from densemtl.scene3d.bev_objects import BevObjects, bev_objects, draw_bev_objects, save_bev_objects
from densemtl.scene3d.defaults import DEFAULT_MAX_REL_STD
from densemtl.scene3d.geometry import (
    CameraPose,
    Intrinsics,
    PointCloud,
    backproject,
    check_intrinsics,
    drop_uncertain_depth,
    fit_plane,
    intrinsics_from_fov,
    pose_from_ground_plane,
    save_npz,
    semantic_point_cloud,
    voxel_downsample,
    write_ply,
)
from densemtl.tasks.depth import DEPTH
from densemtl.tasks.objects import object_classes
from densemtl.tasks.semseg import SEMSEG

log = logging.getLogger("densemtl")


@dataclass(frozen=True)
class SceneOptions:
    """What ``predict --pointcloud --bev`` writes and the camera it assumes.

    Intrinsics come from ``intrinsics`` (fx, fy, cx, cy), else the sample's meta JSON (folder format), else
    ``hfov_deg``. The pose (height, pitch, roll) comes from ``pose``, else the meta JSON, else a plane fitted to
    the pixels predicted as a drivable class (road/floor). ``max_rel_std``: relative depth std
    (``depth_std / depth``) above which a point is dropped, for models with depth uncertainty; 0 keeps every
    point (``DEFAULT_MAX_REL_STD`` is provisional, to be chosen on the synthetic validation data).
    """

    pointcloud: bool = False
    bev: bool = False
    intrinsics: tuple[float, float, float, float] | None = None
    hfov_deg: float | None = None
    pose: CameraPose | None = None
    max_range: float = 40.0
    voxel: float | None = 0.05
    grid: BevGrid = BevGrid()
    max_rel_std: float = DEFAULT_MAX_REL_STD

    def __post_init__(self) -> None:
        if self.intrinsics is not None:
            check_intrinsics(self.intrinsics)
        if self.hfov_deg is not None and not 0.0 < self.hfov_deg < 180.0:
            raise ValueError(
                f"horizontal field of view must be in (0, 180) degrees (--hfov), got {self.hfov_deg}"
            )
        check_positive(self.max_range, "max_range (--max-range)")
        if self.voxel is not None:
            check_positive(self.voxel, "voxel size (None keeps all points)")
        if not (self.max_rel_std >= 0 and math.isfinite(self.max_rel_std)):
            raise ValueError(f"the relative depth std limit (--max-rel-std) must be a finite fraction of the depth "
                             f">= 0 (e.g. 0.15 = 15 %; 0 keeps every point), got {self.max_rel_std}")  # fmt: skip


def sample_meta(image_path: str | Path) -> dict:
    """The folder-format meta JSON of an image (``<split>/meta/<id>.json`` next to ``<split>/images``), or {}."""
    import json

    path = Path(image_path)
    meta = path.parent.parent / "meta" / f"{path.stem}.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def resolve_intrinsics(opts: SceneOptions, meta: dict, size: tuple[int, int]) -> Intrinsics:
    """Intrinsics from the options, the meta JSON or a field of view; a clear error when none is known."""
    if opts.intrinsics is not None:
        return opts.intrinsics
    if "intrinsics" in meta:
        return tuple(float(v) for v in meta["intrinsics"])  # type: ignore[return-value]
    if opts.hfov_deg is not None:
        return intrinsics_from_fov(size, opts.hfov_deg)
    raise ValueError("no camera intrinsics for this image: pass --fx --fy --cx --cy or --hfov DEGREES")


def known_focal(opts: SceneOptions | None, meta: dict, size: tuple[int, int]) -> float | None:
    """The camera's focal length fx (pixels) as :func:`resolve_intrinsics` finds it, or None when nothing says
    (what objects' distances need: ``Predictor.predict(focal_px=...)``)."""
    try:
        return float(resolve_intrinsics(opts or SceneOptions(), meta, size)[0])
    except ValueError:
        return None


def resolve_pose(
    opts: SceneOptions, meta: dict, points_cam: np.ndarray, semseg: np.ndarray | None, drivable: Sequence[int]
) -> CameraPose:
    """Camera pose from the options, the meta JSON, or a plane fitted to the predicted drivable pixels."""
    if opts.pose is not None:
        return opts.pose
    if "camera_height" in meta:
        return CameraPose(meta["camera_height"], meta.get("pitch_deg", 0.0), meta.get("roll_deg", 0.0))
    mask = points_cam[..., 2] > 0
    if semseg is not None:
        mask &= np.isin(semseg, np.asarray(drivable, np.int64))
    if semseg is None or mask.sum() < 50:
        raise ValueError(
            "no camera pose: pass --camera-height (and --pitch/--roll), or predict a road/floor class (at least "
            "50 of its pixels with valid depth, after --max-rel-std with depth uncertainty)"
        )
    normal, offset, _ = fit_plane(points_cam[mask][:: max(1, int(mask.sum()) // 20000)])
    try:
        return pose_from_ground_plane(normal, offset)
    except ValueError as e:  # e.g. the fitted "ground" passes above the camera
        raise ValueError(f"no usable camera pose from the predicted ground ({e}): pass --camera-height "
                         "(and --pitch/--roll)") from e  # fmt: skip


# The 3-D code genuinely needs one task's output: a point cloud is back-projected metric depth. Class ids and
# their confidence, when the model predicts them, label the points and find the drivable ground for the pose.
# These roles are read from a prediction here and nowhere else, under the task modules' own names (the keys of
# ``Depth.to_numpy`` and ``Semseg.to_numpy``), so that the rest of the package stays free of task names.
DEPTH_KEY = DEPTH.name  # float32 (H, W) metres
LABEL_KEY = SEMSEG.name  # uint8 (H, W) class ids
CONFIDENCE_KEY = "confidence"  # float32 (H, W) softmax maximum of the class ids
DEPTH_STD_KEY = "depth_std"  # float32 (H, W) metres, predicted depth std (``Depth.to_numpy``), optional


@dataclass(frozen=True)
class Scene:
    """One prediction in 3-D: its ground-frame cloud, the camera it assumed and the drivable class ids."""

    cloud: PointCloud
    intrinsics: Intrinsics
    pose: CameraPose
    drivable: tuple[int, ...]


def scene_of(
    rgb: np.ndarray, pred: dict[str, np.ndarray], info: dict, opts: SceneOptions, meta: dict
) -> Scene | None:
    """The ground-frame semantic cloud of one prediction, or None when the model predicts no depth.

    ``info`` is the dataset dict (``classes`` name the drivable ids); ``meta`` the sample's camera, or {}. With
    ``depth_std`` in ``pred``, pixels over ``opts.max_rel_std`` are dropped first (pose fit included) and the
    cloud carries each point's depth std.
    """
    if DEPTH_KEY not in pred:
        return None
    depth, labels, std = pred[DEPTH_KEY], pred.get(LABEL_KEY), pred.get(DEPTH_STD_KEY)
    if std is not None:
        before = int((depth > 0).sum())
        depth = drop_uncertain_depth(depth, std, opts.max_rel_std)  # dropped pixels: depth 0 = invalid
        if before and (depth > 0).sum() < 0.1 * before:
            log.warning(
                "--max-rel-std %g dropped %.0f%% of the depth pixels (the model is unsure: a short training run?); "
                "raise it, or 0 keeps every point", opts.max_rel_std, 100 * (1 - (depth > 0).sum() / before),
            )  # fmt: skip
    k = resolve_intrinsics(opts, meta, depth.shape)
    drivable = drivable_ids(info.get("classes", []))
    pose = resolve_pose(opts, meta, backproject(depth, k), labels, drivable)
    conf = pred.get(CONFIDENCE_KEY)
    cloud = semantic_point_cloud(depth, k, rgb, labels, conf, pose, opts.max_range, depth_std=std)
    return Scene(cloud, k, pose, drivable)


def scene_bev(scene: Scene, grid: BevGrid) -> dict[str, np.ndarray]:
    """The BEV layers of a scene (``bev_map`` with its drivable ids and pose: ``confidence`` with uncertainty)."""
    return bev_map(scene.cloud, grid, scene.drivable, pose=scene.pose)


def scene_bev_picture(
    scene: Scene, bev: dict[str, np.ndarray], pred: dict[str, np.ndarray], info: dict, grid: BevGrid
) -> np.ndarray:
    """The BEV picture uint8 (rows, cols, 3) of a scene: ``colorize_bev`` plus, when ``pred`` has the objects
    task's detections, their oriented footprints (``bev_objects.draw_bev_objects``); without them the plain map.
    """
    return _bev_picture(
        bev, info, grid, bev_objects(pred, scene.intrinsics, scene.pose, object_classes(info))
    )


def _bev_picture(
    bev: dict[str, np.ndarray], info: dict, grid: BevGrid, objects: BevObjects | None
) -> np.ndarray:
    """``colorize_bev`` with ``objects``' footprints drawn over it when there are detections (not None)."""
    picture = colorize_bev(bev, info.get("palette", []), grid)
    if objects is None:
        return picture
    return draw_bev_objects(picture, objects.corners_xz, objects.classes, grid, objects.class_names)


def write_scene_outputs(
    out_dir: Path,
    stem: str,
    image_path: str | Path | None,
    rgb: np.ndarray,
    pred: dict[str, np.ndarray],
    info: dict,
    opts: SceneOptions,
) -> dict[str, Path]:
    """Write ``<stem>.ply`` + ``<stem>_cloud.npz`` and/or ``<stem>_bev.png`` + ``.npy`` for one prediction.

    ``info`` is the dataset dict (``classes``, ``palette``: ``Predictor.info``); nothing is written when the
    model predicts no depth. With depth uncertainty the PLY and NPZ carry ``depth_std`` (the NPZ also the
    ``max_rel_std`` used) and the BEV adds ``<stem>_bev_confidence.png`` and a 6th NPY layer (``save_bev``).
    With the objects task's detections in ``pred`` the BEV PNG shows their footprints and
    ``<stem>_bev_objects.json`` lists them in the ground frame (``scene3d.bev_objects``).
    """
    if not (opts.pointcloud or opts.bev):
        return {}
    meta = sample_meta(image_path) if image_path is not None else {}
    scene = scene_of(rgb, pred, info, opts, meta)
    if scene is None:
        return {}
    files: dict[str, Path] = {}
    if opts.pointcloud:
        small = voxel_downsample(scene.cloud, opts.voxel) if opts.voxel else scene.cloud
        files["ply"] = write_ply(out_dir / f"{stem}.ply", small)
        pose = scene.pose
        extra = {} if small.depth_std is None else {"max_rel_std": opts.max_rel_std}
        files["npz"] = save_npz(
            out_dir / f"{stem}_cloud.npz",
            small,
            intrinsics=np.array(scene.intrinsics),
            camera_height=pose.height,
            pitch_deg=pose.pitch_deg,
            roll_deg=pose.roll_deg,
            **extra,
        )
    if opts.bev:
        bev = scene_bev(scene, opts.grid)
        objects = bev_objects(pred, scene.intrinsics, scene.pose, object_classes(info))
        picture = _bev_picture(bev, info, opts.grid, objects)
        if objects is not None:
            files["bev_objects"] = save_bev_objects(out_dir / f"{stem}_bev_objects.json", objects, opts.grid)
        files.update(save_bev(out_dir / stem, bev, info.get("palette", []), opts.grid, picture=picture))
    return files
