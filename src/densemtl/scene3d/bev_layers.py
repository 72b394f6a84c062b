"""Bird's-eye-view (BEV) map from a ground-frame semantic point cloud: occupancy, class, height, drivable area,
free space and, for models with depth uncertainty, depth confidence; coloured PNGs and an NPY stack of the layers.

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
from densemtl.scene3d.geometry import CameraPose, PointCloud, camera_depth

UNKNOWN_CLASS = 255
DRIVABLE_NAMES = ("road", "floor", "ground", "parking", "drivable")  # class names whose ground is drivable
LAYERS = ("occupancy", "class", "height", "drivable", "free")  # order of the NPY stack
CONFIDENCE_LAYER = "confidence"  # depth confidence, only with depth uncertainty: the NPY stack's 6th layer
CONFIDENCE_TOLERANCE = 0.1  # depth confidence = P(true depth within 10 % of the prediction)
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
        check_positive(self.cell, "BEV cell size (--bev-cell)")
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


def check_positive(value: float, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is a finite length > 0 m."""
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
    pose: CameraPose | None = None,
) -> dict[str, np.ndarray]:
    """Rasterise a ground-frame cloud into BEV layers, each (rows, cols).

    Returns ``occupancy`` bool (obstacle points in the cell), ``class`` uint8 (dominant class of the obstacle
    points where occupied, else of the ground points, else of all points; 255 = unseen), ``height`` float32
    (highest point above the ground, nan = unseen), ``drivable`` bool (unoccupied and dominated by a
    ``drivable`` class), ``free`` bool (reached by a ray from the camera before the first obstacle, within the
    observed range), ``observed`` bool. When the cloud carries ``depth_std`` also ``confidence`` float32: the
    mean ``depth_confidence`` of the cell's points (nan = no point); it needs ``pose``, the pose the cloud was
    built with, to recover each point's depth.
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
    if cloud.depth_std is not None:
        layers[CONFIDENCE_LAYER] = _cell_confidence(cloud, inside, cell, grid, pose, camera_xz)
    return layers


def depth_confidence(rel_std: np.ndarray, tolerance: float = CONFIDENCE_TOLERANCE) -> np.ndarray:
    """Probability (float32, same shape) that the true depth lies within ``tolerance`` of the predicted one.

    With ``s = depth_std / depth`` (``rel_std``) the model's std of ln depth and ln(true depth) ~ N(ln d, s^2),
    ``p = P(|ln D - ln d| <= ln(1 + tolerance)) = erf(ln(1 + tolerance) / (s sqrt 2))``: for 10 %, the true
    depth is in [d / 1.1, 1.1 d]. Why log depth: the model predicts the std of ln depth (``depth_std = depth *
    s`` is its first-order conversion), so its Gaussian lives there; and a probability in [0, 1] reads the
    same near and far, unlike a std in metres that grows with distance. s = 0 gives 1; s < 0 or nan gives nan.
    """
    from scipy.special import erf

    s = np.asarray(rel_std, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = erf(math.log1p(tolerance) / (s * math.sqrt(2.0)))
    return np.where(s >= 0, p, np.nan).astype(np.float32)


def _cell_confidence(
    cloud: PointCloud,
    inside: np.ndarray,
    cell: np.ndarray,
    grid: BevGrid,
    pose: CameraPose | None,
    camera_xz: tuple[float, float],
) -> np.ndarray:
    """Mean ``depth_confidence`` of the points of each cell (rows, cols) float32; nan where no point has one."""
    if pose is None:
        raise ValueError(
            "bev_map: this cloud carries depth_std, whose relative std needs each point's depth: pass "
            "pose= (the CameraPose the cloud was built with), or drop it with replace(cloud, depth_std=None)"
        )
    depth = camera_depth(cloud.xyz[inside], pose, camera_xz)  # (M,) metres
    with np.errstate(divide="ignore", invalid="ignore"):
        p = depth_confidence(cloud.depth_std[inside] / depth).astype(np.float64)
    ok = np.isfinite(p)
    nz, nx = grid.shape
    total = np.bincount(cell[ok], weights=p[ok], minlength=nz * nx)
    count = np.bincount(cell[ok], minlength=nz * nx)
    with np.errstate(invalid="ignore"):
        return (total / count).astype(np.float32).reshape(nz, nx)  # 0 / 0 = nan: no point


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
    return mark_camera(out.astype(np.uint8), grid)


def colorize_confidence(confidence: np.ndarray, grid: BevGrid = BevGrid()) -> np.ndarray:
    """Depth confidence (rows, cols) in [0, 1] -> uint8 (rows, cols, 3): viridis (dark purple 0 .. yellow 1),
    cells without points in the BEV's dark "unknown" grey, camera as the red dot.

    A separate picture rather than a dimmed BEV: the BEV already uses dimmed class colours for "seen ground".
    """
    import matplotlib

    conf = np.asarray(confidence, dtype=np.float64)
    out = np.empty((*conf.shape, 3), np.uint8)
    out[:] = BEV_COLORS["unknown"]
    seen = np.isfinite(conf)
    rgba = matplotlib.colormaps["viridis"](np.clip(conf[seen], 0.0, 1.0))  # (M, 4) in [0, 1]
    out[seen] = np.round(rgba[:, :3] * 255).astype(np.uint8)
    return mark_camera(out, grid)


def mark_camera(out: np.ndarray, grid: BevGrid) -> np.ndarray:
    """Draw the camera as a small red square at the bottom centre of a BEV picture (rows, cols, 3), in place."""
    row, col, inside = grid.cell_of(np.array([0.0]), np.array([grid.z_range[0] + 0.5 * grid.cell]))
    if inside[0]:
        r, c = int(row[0]), int(col[0])
        out[max(r - 2, 0) : r + 1, max(c - 2, 0) : c + 3] = BEV_COLORS["camera"]
    return out


def save_bev(
    stem: str | Path,
    bev: dict[str, np.ndarray],
    palette: np.ndarray | Sequence[Sequence[int]],
    grid: BevGrid,
    picture: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write ``<stem>_bev.png`` (colour map) and ``<stem>_bev.npy``; with a ``confidence`` layer also
    ``<stem>_bev_confidence.png`` (``colorize_confidence``).

    ``picture`` uint8 (rows, cols, 3) is the PNG to write, default ``colorize_bev(bev, palette, grid)``: callers
    that draw more on the map (detected objects, ``scene3d.bev_objects``) pass theirs.

    The NPY is float32 (5, rows, cols) in ``LAYERS`` order, or (6, rows, cols) with ``confidence`` (nan = no
    point) appended as the last layer when the map has it (models with depth uncertainty).
    """
    from densemtl.data.format import png_bytes

    stem = Path(stem)
    names = (*LAYERS, CONFIDENCE_LAYER) if CONFIDENCE_LAYER in bev else LAYERS
    stack = np.stack([bev[k].astype(np.float32) for k in names])  # class 255 = unseen, height nan = unseen
    npy = atomic_write(stem.with_name(stem.name + "_bev.npy"), lambda f: np.save(f, stack))
    if picture is None:
        picture = colorize_bev(bev, palette, grid)
    elif picture.shape != (*grid.shape, 3):
        raise ValueError(f"save_bev: the BEV picture is {picture.shape}, the grid needs {(*grid.shape, 3)}")
    png = atomic_write(stem.with_name(stem.name + "_bev.png"), png_bytes(picture))
    files = {"bev": png, "bev_npy": npy}
    if CONFIDENCE_LAYER in bev:
        confidence_png = png_bytes(colorize_confidence(bev[CONFIDENCE_LAYER], grid))
        files["bev_confidence"] = atomic_write(
            stem.with_name(stem.name + "_bev_confidence.png"), confidence_png
        )
    return files
