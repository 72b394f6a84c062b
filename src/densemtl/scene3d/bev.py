"""Bird's-eye-view (BEV) map from a ground-frame semantic point cloud: occupancy, class, height, drivable area,
free space; a coloured PNG and an NPY stack of the layers.

The grid lies in the ground plane (x right, z forward, metres; see ``geometry.py``). Row 0 is the far edge
(``z_range[1]``) so the picture reads like a map with the camera at the bottom looking up; column 0 is
``x_range[0]`` (left).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from densemtl.fileio import atomic_write
from densemtl.scene3d.geometry import (
    CameraPose,
    Intrinsics,
    PointCloud,
    backproject,
    check_intrinsics,
    fit_plane,
    intrinsics_from_fov,
    pose_from_ground_plane,
    save_npz,
    semantic_point_cloud,
    voxel_downsample,
    write_ply,
)
from densemtl.tasks.depth import DEPTH
from densemtl.tasks.semseg import SEMSEG

UNKNOWN_CLASS = 255
DRIVABLE_NAMES = ("road", "floor", "ground", "parking", "drivable")  # class names whose ground is drivable
LAYERS = ("occupancy", "class", "height", "drivable", "free")  # order of the NPY stack
MAX_CELLS = 2048 * 2048  # ~100 bytes of working memory per cell: at most ~400 MiB for one map
BYTES_PER_CELL = 100


@dataclass(frozen=True)
class BevGrid:
    """Grid extent and resolution (metres) plus what counts as an obstacle.

    A cell is occupied when at least ``min_points`` points lie between ``obstacle_min_height`` and
    ``obstacle_max_height`` above the ground: kerbs (~0.15 m) stay traversable, overhanging branches and
    ceilings above the vehicle do not block.
    """

    x_range: tuple[float, float] = (-20.0, 20.0)
    z_range: tuple[float, float] = (0.0, 40.0)
    cell: float = 0.2
    obstacle_min_height: float = 0.3
    obstacle_max_height: float = 2.5
    min_points: int = 2
    angle_bins: int = 1440  # rays cast from the camera for free space (0.25 deg each)

    def __post_init__(self) -> None:
        _check_positive(self.cell, "BEV cell size (--bev-cell)")
        for name, (lo, hi) in (("x_range", self.x_range), ("z_range", self.z_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"BEV {name} must be finite metres (low, high), high > low, got {(lo, hi)}")
        nz, nx = self.shape
        if nz < 1 or nx < 1:
            raise ValueError(f"a BEV grid of {nz}x{nx} cells is empty: use a cell smaller than the range")
        if nz * nx > MAX_CELLS:
            raise ValueError(
                f"a BEV grid of {nz}x{nx} = {nz * nx:,} cells (~{nz * nx * BYTES_PER_CELL / 2**30:.1f} GiB) "
                f"is over the {MAX_CELLS:,} cells a map may have: use a larger cell or a smaller range"
            )
        if (
            not self.obstacle_min_height < self.obstacle_max_height
            or min(self.min_points, self.angle_bins) < 1
        ):
            raise ValueError(f"BEV needs obstacle_min_height < obstacle_max_height, min_points and angle_bins "
                             f">= 1, got {self}")  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        """(rows along z, columns along x)."""
        nz = int(round((self.z_range[1] - self.z_range[0]) / self.cell))
        nx = int(round((self.x_range[1] - self.x_range[0]) / self.cell))
        return nz, nx

    def cell_of(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row, column and inside-mask for ground coordinates x, z (metres)."""
        nz, nx = self.shape
        col = np.floor((x - self.x_range[0]) / self.cell).astype(np.int64)
        row = nz - 1 - np.floor((z - self.z_range[0]) / self.cell).astype(np.int64)
        inside = (col >= 0) & (col < nx) & (row >= 0) & (row < nz)
        return row, col, inside

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Ground x and z (metres) of every cell centre, each (rows, cols)."""
        nz, nx = self.shape
        x = self.x_range[0] + (np.arange(nx) + 0.5) * self.cell
        z = self.z_range[0] + (nz - 1 - np.arange(nz) + 0.5) * self.cell
        return np.broadcast_to(x[None], (nz, nx)), np.broadcast_to(z[:, None], (nz, nx))


def _check_positive(value: float, what: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{what} must be a finite number > 0 m, got {value}")


def drivable_ids(class_names: Sequence[str], names: Sequence[str] = DRIVABLE_NAMES) -> tuple[int, ...]:
    """Ids of the classes whose surface a robot or car may drive on (road for streets, floor indoors)."""
    return tuple(i for i, c in enumerate(class_names) if c.lower() in names)


def _mode(cell: np.ndarray, label: np.ndarray, n_cells: int) -> np.ndarray:
    """Most frequent label per cell (n_cells,); UNKNOWN_CLASS where a cell has no labelled point."""
    out = np.full(n_cells, UNKNOWN_CLASS, np.uint8)
    keep = label != UNKNOWN_CLASS
    if not keep.any():
        return out
    cell, label = cell[keep], label[keep].astype(np.int64)
    pair, count = np.unique(cell * 256 + label, return_counts=True)
    order = np.lexsort((count, pair // 256))
    last = np.r_[np.diff(pair[order] // 256) != 0, True]
    winners = pair[order][last]
    out[winners // 256] = winners % 256
    return out


def bev_map(
    cloud: PointCloud,
    grid: BevGrid = BevGrid(),
    drivable: Sequence[int] = (),
    camera_xz: tuple[float, float] = (0.0, 0.0),
) -> dict[str, np.ndarray]:
    """Rasterise a ground-frame cloud into BEV layers, each (rows, cols).

    Returns ``occupancy`` bool (obstacle points in the cell), ``class`` uint8 (dominant class of the obstacle
    points where occupied, else of the ground points, else of all points; 255 = unseen), ``height`` float32 (highest point above the ground,
    nan = unseen), ``drivable`` bool (unoccupied and dominated by a ``drivable`` class), ``free`` bool (reached by
    a ray from the camera before the first obstacle, within the observed range), ``observed`` bool.
    """
    if cloud.frame != "ground":
        raise ValueError(
            "bev_map needs a ground-frame cloud: build it with a CameraPose (height, pitch, roll)"
        )
    nz, nx = grid.shape
    row, col, inside = grid.cell_of(cloud.xyz[:, 0], cloud.xyz[:, 2])
    cell = (row * nx + col)[inside]
    y, label = cloud.xyz[inside, 1], cloud.label[inside]
    n = nz * nx
    observed = np.bincount(cell, minlength=n) > 0
    height = np.full(n, -np.inf, np.float32)
    np.maximum.at(height, cell, y)
    height[~observed] = np.nan
    is_obstacle = (y >= grid.obstacle_min_height) & (y <= grid.obstacle_max_height)
    occupancy = np.bincount(cell[is_obstacle], minlength=n) >= grid.min_points
    is_ground = y < grid.obstacle_min_height
    ground_cls = _mode(cell[is_ground], label[is_ground], n)
    obstacle_cls = _mode(cell[is_obstacle], label[is_obstacle], n)
    cls = np.where(ground_cls != UNKNOWN_CLASS, ground_cls, _mode(cell, label, n))  # road under a canopy
    cls = np.where(occupancy & (obstacle_cls != UNKNOWN_CLASS), obstacle_cls, cls)
    is_drivable = np.isin(ground_cls, np.asarray(drivable, np.int64)) & ~occupancy
    layers = {
        "occupancy": occupancy.reshape(nz, nx),
        "class": cls.reshape(nz, nx),
        "height": height.reshape(nz, nx),
        "drivable": is_drivable.reshape(nz, nx),
        "observed": observed.reshape(nz, nx),
    }
    layers["free"] = free_space(layers["occupancy"], layers["observed"], grid, camera_xz)
    return layers


def free_space(
    occupancy: np.ndarray, observed: np.ndarray, grid: BevGrid, camera_xz: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Cells a straight ray from the camera reaches before its first occupied cell (rows, cols) bool.

    Rays are angular bins around the camera; each occupied cell blocks every bin its footprint covers (so thin
    obstacles do not leak), and a ray ends at the farthest observed cell it crosses: beyond what the camera
    saw, space is unknown, not free.
    """
    x, z = grid.centres()
    dx, dz = x - camera_xz[0], z - camera_xz[1]
    rng = np.hypot(dx, dz)  # (rows, cols)
    nb = grid.angle_bins
    ang = np.arctan2(dx, dz)  # 0 = straight ahead
    bins = np.floor((ang + np.pi) / (2 * np.pi / nb)).astype(np.int64) % nb
    occ, obs = occupancy.ravel(), observed.ravel()
    blocked = _per_bin(np.full(nb, np.inf), np.minimum, rng.ravel()[occ], ang.ravel()[occ], grid.cell, -1.0)
    seen = _per_bin(np.zeros(nb), np.maximum, rng.ravel()[obs], ang.ravel()[obs], grid.cell, 1.0)
    reach = np.minimum(blocked, seen)  # (nb,)
    return (rng <= reach[bins]) & ~occupancy


def _per_bin(
    out: np.ndarray, reduce: np.ufunc, rng: np.ndarray, ang: np.ndarray, cell: float, edge: float
) -> np.ndarray:
    """Reduce (min/max) each cell's range into every angular bin its square footprint spans.

    ``edge`` -1 uses the cell's near edge (an obstacle blocks from there), +1 its far edge (seen up to there).
    """
    if len(rng) == 0:
        return out
    nb = len(out)
    width = 2 * np.pi / nb
    radius = cell * np.sqrt(0.5)
    half = np.arctan2(radius, np.maximum(rng, 1e-6))
    first = np.floor((ang - half + np.pi) / width).astype(np.int64)
    last = np.floor((ang + half + np.pi) / width).astype(np.int64)
    value = np.maximum(rng + edge * radius, 0.0)
    for k in range(int((last - first).max()) + 1):
        sel = first + k <= last
        reduce.at(out, (first[sel] + k) % nb, value[sel])
    return out


BEV_COLORS = {
    "unknown": (40, 40, 40),
    "free": (200, 200, 200),
    "drivable": (120, 200, 120),
    "camera": (255, 0, 0),
}


def colorize_bev(
    bev: dict[str, np.ndarray], palette: np.ndarray | Sequence[Sequence[int]], grid: BevGrid = BevGrid()
) -> np.ndarray:
    """BEV layers -> uint8 (rows, cols, 3): unknown dark, free light grey, drivable green, obstacles in their
    class colour, other seen ground dimmed class colour, camera as a red dot at the bottom centre."""
    from densemtl.viz.colors import colorize_labels

    cls_rgb = colorize_labels(bev["class"], palette).astype(np.float32)
    out = np.empty((*bev["class"].shape, 3), np.float32)
    out[:] = BEV_COLORS["unknown"]
    seen = bev["observed"]
    out[seen] = 0.5 * cls_rgb[seen] + 0.5 * np.float32(BEV_COLORS["unknown"])
    out[bev["free"]] = BEV_COLORS["free"]
    both = bev["free"] & bev["drivable"]
    out[both] = BEV_COLORS["drivable"]
    out[bev["occupancy"]] = cls_rgb[bev["occupancy"]]
    out = out.astype(np.uint8)
    row, col, inside = grid.cell_of(np.array([0.0]), np.array([grid.z_range[0] + 0.5 * grid.cell]))
    if inside[0]:
        r, c = int(row[0]), int(col[0])
        out[max(r - 2, 0) : r + 1, max(c - 2, 0) : c + 3] = BEV_COLORS["camera"]
    return out


def save_bev(
    stem: str | Path, bev: dict[str, np.ndarray], palette: np.ndarray | Sequence[Sequence[int]], grid: BevGrid
) -> dict[str, Path]:
    """Write ``<stem>_bev.png`` (colour map) and ``<stem>_bev.npy`` (float32 (5, rows, cols), ``LAYERS`` order)."""
    from densemtl.data.format import png_bytes

    stem = Path(stem)
    stack = np.stack([bev[k].astype(np.float32) for k in LAYERS])  # class 255 = unseen, height nan = unseen
    npy = atomic_write(stem.with_name(stem.name + "_bev.npy"), lambda f: np.save(f, stack))
    png = atomic_write(stem.with_name(stem.name + "_bev.png"), png_bytes(colorize_bev(bev, palette, grid)))
    return {"bev": png, "bev_npy": npy}


# ------------------------------------------------------------------------------------------- per-image outputs
@dataclass(frozen=True)
class SceneOptions:
    """What ``predict --pointcloud --bev`` writes and the camera it assumes.

    Intrinsics come from ``intrinsics`` (fx, fy, cx, cy), else the sample's meta JSON (folder format), else
    ``hfov_deg``. The pose (height, pitch, roll) comes from ``pose``, else the meta JSON, else a plane fitted to
    the pixels predicted as a drivable class (road/floor).
    """

    pointcloud: bool = False
    bev: bool = False
    intrinsics: tuple[float, float, float, float] | None = None
    hfov_deg: float | None = None
    pose: CameraPose | None = None
    max_range: float = 40.0
    voxel: float | None = 0.05
    grid: BevGrid = BevGrid()

    def __post_init__(self) -> None:
        if self.intrinsics is not None:
            check_intrinsics(self.intrinsics)
        if self.hfov_deg is not None and not 0.0 < self.hfov_deg < 180.0:
            raise ValueError(
                f"horizontal field of view must be in (0, 180) degrees (--hfov), got {self.hfov_deg}"
            )
        _check_positive(self.max_range, "max_range (--max-range)")
        if self.voxel is not None:
            _check_positive(self.voxel, "voxel size (None keeps all points)")


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
            "no camera pose: pass --camera-height (and --pitch/--roll), or predict a road/floor class"
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

    ``info`` is the dataset dict (``classes`` name the drivable ids); ``meta`` the sample's camera, or {}.
    """
    if DEPTH_KEY not in pred:
        return None
    depth, labels = pred[DEPTH_KEY], pred.get(LABEL_KEY)
    k = resolve_intrinsics(opts, meta, depth.shape)
    drivable = drivable_ids(info.get("classes", []))
    pose = resolve_pose(opts, meta, backproject(depth, k), labels, drivable)
    cloud = semantic_point_cloud(depth, k, rgb, labels, pred.get(CONFIDENCE_KEY), pose, opts.max_range)
    return Scene(cloud, k, pose, drivable)


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
    model predicts no depth.
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
        files["npz"] = save_npz(
            out_dir / f"{stem}_cloud.npz",
            small,
            intrinsics=np.array(scene.intrinsics),
            camera_height=scene.pose.height,
            pitch_deg=scene.pose.pitch_deg,
            roll_deg=scene.pose.roll_deg,
        )
    if opts.bev:
        bev = bev_map(scene.cloud, opts.grid, scene.drivable)
        files.update(save_bev(out_dir / stem, bev, info.get("palette", []), opts.grid))
    return files
