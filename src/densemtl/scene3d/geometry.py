"""Depth + intrinsics -> 3-D points: back-projection, a gravity-aligned frame, semantic point clouds, PLY/NPZ.

Frames (see docs/geometry.md):

- camera frame (OpenCV): x right, y down, z forward, origin at the optical centre; depth is z in metres;
- ground frame: x right, y up, z forward (the synthetic world frame with the camera's heading as z and the
  origin on the ground plane y = 0 straight below the camera). It is obtained from the camera's height above
  the ground and its pitch (> 0 looks down) and roll; yaw is unknown from one image and taken as 0.

Intrinsics are ``(fx, fy, cx, cy)`` in pixels with the pixel-centre convention: pixel (u, v) with integer u, v
looks along ``((u - cx) / fx, (v - cy) / fy, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from densemtl.fileio import atomic_write

Intrinsics = tuple[float, float, float, float]  # fx, fy, cx, cy in pixels


def check_intrinsics(intrinsics: Intrinsics) -> Intrinsics:
    """Raise ``ValueError`` unless ``intrinsics`` is four finite numbers (fx, fy, cx, cy) with fx, fy > 0.

    Why: a zero or negative focal length back-projects every pixel to infinity or behind the camera.
    """
    k = tuple(float(v) for v in np.asarray(intrinsics, dtype=np.float64).reshape(-1))
    if len(k) != 4 or not all(math.isfinite(v) for v in k) or k[0] <= 0 or k[1] <= 0:
        raise ValueError(
            f"intrinsics must be four finite numbers (fx, fy, cx, cy) in pixels with fx, fy > 0 "
            f"(--fx --fy --cx --cy), got {tuple(intrinsics)}"
        )
    return k  # type: ignore[return-value]


def intrinsics_from_fov(size: tuple[int, int], hfov_deg: float) -> Intrinsics:
    """Square pixels, principal point at the image centre, horizontal field of view ``hfov_deg``."""
    if not 0.0 < hfov_deg < 180.0:
        raise ValueError(f"horizontal field of view must be in (0, 180) degrees (--hfov), got {hfov_deg}")
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive (height, width), got {size}")
    f = (w / 2) / np.tan(np.radians(hfov_deg) / 2)
    return float(f), float(f), (w - 1) / 2, (h - 1) / 2


def backproject(depth: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """Depth (H, W) metres -> camera-frame points (H, W, 3) float32; invalid depth (0, nan) gives (0, 0, 0)."""
    fx, fy, cx, cy = check_intrinsics(intrinsics)
    d = np.asarray(depth, dtype=np.float32)
    d = np.where(np.isfinite(d) & (d > 0), d, np.float32(0))
    h, w = d.shape
    x = ((np.arange(w, dtype=np.float32) - np.float32(cx)) / np.float32(fx))[None, :]  # (1, W)
    y = ((np.arange(h, dtype=np.float32) - np.float32(cy)) / np.float32(fy))[:, None]  # (H, 1)
    return np.stack([x * d, y * d, d], axis=-1)  # (H, W, 3)


def axis_rotation(axis: int, deg: float) -> np.ndarray:
    """Rotation by ``deg`` degrees about coordinate axis 0 (x), 1 (y) or 2 (z), right-handed."""
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def gravity_rotation(pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Camera-to-ground rotation (3, 3): ground = R @ camera (the synthetic renderer's convention, yaw 0).

    ``pitch_deg`` > 0 looks down; ``roll_deg`` > 0 turns the camera's x axis towards its y axis. The y flip
    (camera y down -> ground y up) makes det(R) = -1: the ground frame is left-handed, like the scene frame.
    """
    flip = np.diag([1.0, -1.0, 1.0])
    return flip @ axis_rotation(0, -pitch_deg) @ axis_rotation(2, roll_deg)


@dataclass(frozen=True)
class CameraPose:
    """Where the camera sits above a flat ground: height of the optical centre (m), pitch and roll (deg)."""

    height: float
    pitch_deg: float = 0.0
    roll_deg: float = 0.0

    def __post_init__(self) -> None:
        checks = (
            ("height", self.height, self.height > 0.0, "> 0 m (--camera-height)"),
            ("pitch", self.pitch_deg, -90.0 <= self.pitch_deg <= 90.0, "in [-90, 90] degrees (--pitch)"),
            ("roll", self.roll_deg, -180.0 <= self.roll_deg <= 180.0, "in [-180, 180] degrees (--roll)"),
        )
        for name, value, ok, want in checks:
            if not (ok and math.isfinite(value)):
                raise ValueError(f"camera {name} must be {want}, got {value}")

    def rotation(self) -> np.ndarray:
        """Camera-to-ground rotation (3, 3)."""
        return gravity_rotation(self.pitch_deg, self.roll_deg)


def to_ground_frame(points: np.ndarray, pose: CameraPose) -> np.ndarray:
    """Camera-frame points (..., 3) -> ground frame (..., 3): x right, y up (height above ground), z forward."""
    r = pose.rotation().astype(np.float32)
    out = np.asarray(points, dtype=np.float32) @ r.T
    out[..., 1] += np.float32(pose.height)
    return out


def camera_depth(
    points: np.ndarray, pose: CameraPose | None, camera_xz: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Camera z-depth (...,) metres of points (..., 3): their z in the camera frame (``pose`` None), else the
    inverse of ``to_ground_frame`` for a camera at ground (``camera_xz[0]``, ``pose.height``, ``camera_xz[1]``).

    Why: a relative depth std needs the depth, which a ground-frame point no longer shows.
    """
    p = np.asarray(points, dtype=np.float64)
    if pose is None:
        return p[..., 2]
    centre = np.array([camera_xz[0], pose.height, camera_xz[1]])
    return (p - centre) @ pose.rotation()[:, 2]  # row 2 of R^T (g - t): camera = R^T (ground - centre)


def fit_plane(points: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Least-squares plane through points (N, 3): unit normal n, offset d (n . p = d), residuals (N,) metres."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) < 3:
        raise ValueError(f"a plane needs at least 3 points, got {len(p)}")
    centre = p.mean(axis=0)
    _, _, vt = np.linalg.svd(p - centre, full_matrices=False)
    n = vt[-1]
    d = float(n @ centre)
    return n, d, p @ n - d


def pose_from_ground_plane(normal: np.ndarray, offset: float) -> CameraPose:
    """Camera pose from the ground plane n . p = d fitted in the camera frame (e.g. to road/floor points).

    Why: a monocular image has no pose; the predicted drivable pixels give the ground, hence height/pitch/roll.
    """
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    if n[1] > 0:  # make n point up (camera y is down), so d < 0 and the height is -d
        n, offset = -n, -offset
    # the ground's up axis in camera coordinates is row 1 of R: -(cos p sin r, cos p cos r, sin p)
    roll = np.degrees(np.arctan2(-n[0], -n[1]))
    pitch = np.degrees(np.arctan2(-n[2], np.hypot(n[0], n[1])))
    return CameraPose(height=float(-offset), pitch_deg=float(pitch), roll_deg=float(roll))


def drop_uncertain_depth(depth: np.ndarray, depth_std: np.ndarray, max_rel_std: float) -> np.ndarray:
    """Depth (H, W) float32 with 0 (invalid) where the relative std ``depth_std / depth`` exceeds
    ``max_rel_std``; ``max_rel_std`` 0 keeps every pixel.

    ``depth_std`` (H, W) is the predicted std of the depth in metres. A valid depth whose std is not a finite
    number >= 0 counts as unknown and is dropped by any limit: an unknown error is not a small one.
    """
    if not (max_rel_std >= 0 and math.isfinite(max_rel_std)):
        raise ValueError(
            f"max_rel_std must be a finite number >= 0 (--max-rel-std; 0 keeps every point), got {max_rel_std}"
        )
    d = np.asarray(depth, dtype=np.float32)
    std = np.asarray(depth_std, dtype=np.float32)
    if std.shape != d.shape:
        raise ValueError(f"depth_std {std.shape} must have the shape of the depth map {d.shape}")
    if max_rel_std == 0:
        return d
    valid = np.isfinite(d) & (d > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        confident = (std >= 0) & (std / np.where(valid, d, np.float32(1)) <= np.float32(max_rel_std))
    return np.where(valid & confident, d, np.float32(0))


@dataclass(frozen=True)
class PointCloud:
    """A semantic point cloud: xyz (N, 3) float32 metres, rgb (N, 3) uint8, label (N,) uint8 (255 = none),
    confidence (N,) float32 or None (the class's softmax maximum); ``frame`` is "camera" or "ground";
    depth_std (N,) float32 metres or None: the predicted std of each point's depth, for models with
    depth uncertainty."""

    xyz: np.ndarray
    rgb: np.ndarray
    label: np.ndarray
    confidence: np.ndarray | None = None
    frame: str = "camera"
    depth_std: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xyz)

    def select(self, keep: np.ndarray) -> PointCloud:
        """The points where ``keep`` (boolean (N,) or indices) holds."""
        conf = None if self.confidence is None else self.confidence[keep]
        std = None if self.depth_std is None else self.depth_std[keep]
        return replace(
            self,
            xyz=self.xyz[keep],
            rgb=self.rgb[keep],
            label=self.label[keep],
            confidence=conf,
            depth_std=std,
        )


def semantic_point_cloud(
    depth: np.ndarray,
    intrinsics: Intrinsics,
    rgb: np.ndarray | None = None,
    semseg: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
    pose: CameraPose | None = None,
    max_range: float | None = None,
    voxel: float | None = None,
    depth_std: np.ndarray | None = None,
    max_rel_std: float = 0.0,
) -> PointCloud:
    """Valid-depth pixels -> a PointCloud (in the ground frame when ``pose`` is given, else camera frame).

    ``max_range`` drops points farther than this from the camera (Euclidean, metres): far predicted depth is
    the least reliable. ``voxel`` (metres) averages the points of each cubic cell (see ``voxel_downsample``).
    ``depth_std`` (H, W) metres, the predicted depth std, is carried per point; with it, ``max_rel_std`` > 0
    drops the points whose relative std exceeds it (``drop_uncertain_depth``).
    """
    if max_range is not None and not (max_range > 0 and math.isfinite(max_range)):
        raise ValueError(f"max_range must be a finite distance > 0 m (--max-range), got {max_range}")
    if depth_std is not None:
        depth = drop_uncertain_depth(depth, depth_std, max_rel_std)
    pts = backproject(depth, intrinsics).reshape(-1, 3)  # (HW, 3) camera frame
    valid = pts[:, 2] > 0
    if max_range is not None:
        valid &= np.einsum("nc,nc->n", pts, pts) <= np.float32(max_range) ** 2
    idx = np.flatnonzero(valid)
    colors = np.zeros((len(idx), 3), np.uint8) if rgb is None else np.asarray(rgb).reshape(-1, 3)[idx]
    labels = np.full(len(idx), 255, np.uint8) if semseg is None else np.asarray(semseg).reshape(-1)[idx]
    conf = None if confidence is None else np.asarray(confidence, np.float32).reshape(-1)[idx]
    std = None if depth_std is None else np.asarray(depth_std, np.float32).reshape(-1)[idx]
    xyz = pts[idx]
    frame = "camera"
    if pose is not None:
        xyz, frame = to_ground_frame(xyz, pose), "ground"
    cloud = PointCloud(xyz, colors.astype(np.uint8), labels.astype(np.uint8), conf, frame, std)
    return voxel_downsample(cloud, voxel) if voxel else cloud


def voxel_downsample(cloud: PointCloud, voxel: float) -> PointCloud:
    """One point per occupied cubic cell of side ``voxel``: mean xyz/rgb/confidence, most frequent label, and
    the root-mean-square of the depth stds.

    Why RMS: it is the std of a point drawn at random from the voxel and is never below the mean std, so one
    bad point is not hidden. It is not the std of the averaged position (``sqrt(sum s^2) / n``): neighbouring
    pixels share most of their error (one network, one image region), so averaging them removes little of it.
    """
    if not (voxel > 0 and math.isfinite(voxel)):
        raise ValueError(f"voxel size must be a finite size > 0 m (--voxel), got {voxel}")
    if len(cloud) == 0:
        return cloud
    keys = np.floor(cloud.xyz / np.float32(voxel)).astype(np.int64)  # (N, 3)
    _, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    n = len(counts)

    def mean(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n, values.shape[1]), np.float64)
        np.add.at(out, inv, values)
        return out / counts[:, None]

    xyz = mean(cloud.xyz.astype(np.float64)).astype(np.float32)
    rgb = np.round(mean(cloud.rgb.astype(np.float64))).astype(np.uint8)
    conf = None if cloud.confidence is None else mean(cloud.confidence[:, None])[:, 0].astype(np.float32)
    std = None
    if cloud.depth_std is not None:
        std = np.sqrt(mean(np.square(cloud.depth_std.astype(np.float64))[:, None])[:, 0]).astype(np.float32)
    # majority label: count (voxel, label) pairs, then keep the largest count per voxel
    pair, pair_count = np.unique(inv * 256 + cloud.label.astype(np.int64), return_counts=True)
    order = np.lexsort((pair_count, pair // 256))  # by voxel, then count ascending
    last = np.r_[np.diff(pair[order] // 256) != 0, True]  # last (largest) entry of each voxel
    label = (pair[order][last] % 256).astype(np.uint8)
    return PointCloud(xyz, rgb, label, conf, cloud.frame, std)


_PLY_FIELDS = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
_PLY_TYPES = {"f4": "float", "u1": "uchar", "i4": "int", "u2": "ushort", "f8": "double"}
_PLY_DTYPES = {v: k for k, v in _PLY_TYPES.items()} | {"float32": "f4", "uint8": "u1", "int32": "i4"}


def write_ply(path: str | Path, cloud: PointCloud) -> Path:
    """Binary little-endian PLY (Open3D, MeshLab, CloudCompare): x y z, red green blue, label[, confidence]
    [, depth_std] (metres)."""
    fields = [*_PLY_FIELDS, ("label", "u1")]
    optional = {"confidence": cloud.confidence, "depth_std": cloud.depth_std}
    fields += [(name, "f4") for name, v in optional.items() if v is not None]
    data = np.empty(len(cloud), dtype=[(name, "<" + t) for name, t in fields])
    for k, name in enumerate("xyz"):
        data[name] = cloud.xyz[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        data[name] = cloud.rgb[:, k]
    data["label"] = cloud.label
    for name, values in optional.items():
        if values is not None:
            data[name] = values
    header = [
        "ply",
        "format binary_little_endian 1.0",
        f"comment densemtl semantic point cloud, frame={cloud.frame}, metres",
        f"element vertex {len(cloud)}",
        *(f"property {_PLY_TYPES[t]} {name}" for name, t in fields),
        "end_header",
    ]
    return atomic_write(path, ("\n".join(header) + "\n").encode("ascii") + data.tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian PLY vertex element into ``{property: (N,) array}`` (for tests and tools)."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path} is not a PLY file")
    lines = raw[:end].decode("ascii").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise ValueError(f"{path}: only binary_little_endian PLY is supported")
    count, fields = 0, []
    for line in lines:
        parts = line.split()
        if parts[:2] == ["element", "vertex"]:
            count = int(parts[2])
        elif parts[:1] == ["property"]:
            fields.append((parts[2], "<" + _PLY_DTYPES[parts[1]]))
    data = np.frombuffer(raw, dtype=fields, count=count, offset=end + len(b"end_header\n"))
    return {name: data[name].copy() for name, _ in fields}


def save_npz(path: str | Path, cloud: PointCloud, **extra: np.ndarray | float | str) -> Path:
    """Compressed NPZ with xyz, rgb, label[, confidence][, depth_std], frame and any ``extra`` arrays (e.g.
    intrinsics)."""
    arrays = {"xyz": cloud.xyz, "rgb": cloud.rgb, "label": cloud.label, "frame": np.array(cloud.frame)}
    for name, values in (("confidence", cloud.confidence), ("depth_std", cloud.depth_std)):
        if values is not None:
            arrays[name] = values
    extra_arrays = {k: np.asarray(v) for k, v in extra.items()}
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays, **extra_arrays))
