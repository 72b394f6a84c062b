"""Exact, vectorised ray casting of a ``Scene`` from a pinhole ``Camera`` (numpy, float32).

Camera frame (OpenCV): x right, y down, z forward. World frame: x right, y up, z forward along the road, ground
y = 0 (see ``scene.py``). The ray through pixel centre (u, v) (integer coordinates) is
``d = R @ ((u - cx) / fx, (v - cy) / fy, 1)``; its camera-frame z component is 1, so the ray parameter t of a hit
IS the hit's z-depth (not the ray length).

Speed comes from culling, not approximation: every primitive's bounding box is clipped against the near plane
and projected to a screen rectangle, and the exact intersection is evaluated only for the rays in that
rectangle. Shadows (exact shadow rays towards the sun) are in ``shadows.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densemtl.scene3d.geometry import axis_rotation
from densemtl.synth.scene import BOX, CYLINDER, ELLIPSOID, Scene

GROUND, NOTHING = -1, -2  # hit ids besides primitive indices
_EDGES = np.array(
    [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
)  # (12, 2)
_PAIRS16 = np.array([(a, b) for a in range(16) for b in range(a + 1, 16)])  # (120, 2)
_CORNERS = np.array([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=np.float64)  # (8, 3)


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics and pose in the world frame.

    ``yaw_deg`` > 0 turns towards +x (right), ``pitch_deg`` > 0 looks down, ``roll_deg`` > 0 turns the camera's
    x axis towards its y axis (clockwise seen from behind). Rotations apply as yaw (world up), then pitch, then
    roll (camera axes).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    position: tuple[float, float, float] = (0.0, 1.5, 0.0)
    yaw_deg: float = 0.0
    pitch_deg: float = 0.0
    roll_deg: float = 0.0

    @classmethod
    def from_fov(cls, size: tuple[int, int], hfov_deg: float, **pose) -> Camera:
        """Square pixels, principal point at the image centre, horizontal field of view ``hfov_deg``."""
        h, w = size
        f = (w / 2) / np.tan(np.radians(hfov_deg) / 2)
        return cls(float(f), float(f), (w - 1) / 2, (h - 1) / 2, **pose)

    @property
    def height(self) -> float:
        """Height of the optical centre above the ground plane y = 0."""
        return float(self.position[1])

    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation (3, 3): world = R @ camera."""
        flip = np.diag([1.0, -1.0, 1.0])  # camera y down -> world y up
        return (
            axis_rotation(1, self.yaw_deg)
            @ flip
            @ axis_rotation(0, -self.pitch_deg)
            @ axis_rotation(2, self.roll_deg)
        )

    def meta(self) -> dict:
        """JSON-friendly intrinsics and pose (rotation is camera-to-world)."""
        return {
            "intrinsics": [float(self.fx), float(self.fy), float(self.cx), float(self.cy)],
            "camera_height": float(self.height),
            "pitch_deg": float(self.pitch_deg),
            "roll_deg": float(self.roll_deg),
            "yaw_deg": float(self.yaw_deg),
            "camera_position": [float(v) for v in self.position],
            "camera_to_world": np.round(self.rotation(), 7).tolist(),
        }


def camera_rays(camera: Camera, size: tuple[int, int]) -> np.ndarray:
    """World-frame ray directions (3, H, W) float32 with camera-frame z = 1 for every pixel centre."""
    h, w = size
    x = ((np.arange(w) - camera.cx) / camera.fx).astype(np.float32)[None, :]
    y = ((np.arange(h) - camera.cy) / camera.fy).astype(np.float32)[:, None]
    r = camera.rotation().astype(np.float32)
    d = np.empty((3, h, w), dtype=np.float32)
    for a in range(3):
        d[a] = r[a, 0] * x + r[a, 1] * y + r[a, 2]
        np.copyto(d[a], np.float32(1e-9), where=np.abs(d[a]) < 1e-9)  # no exact zeros: 1/d stays finite
    return d


def screen_rects(
    lo: np.ndarray,
    hi: np.ndarray,
    camera: Camera,
    size: tuple[int, int],
    near: float = 0.05,
    far: float = np.inf,
    sweep: np.ndarray | None = None,
) -> np.ndarray:
    """Pixel rectangles (M, 4) = (v0, v1, u0, u1), half-open, that contain the projection of each box.

    Boxes are clipped against the near plane z = ``near`` (corners in front plus edge crossings) so boxes that
    reach behind the camera still get a correct bound; boxes farther than ``far`` get an empty rectangle.
    With ``sweep`` (M, 3) the bound is for the box swept along -sweep (the convex hull of both positions).
    """
    h, w = size
    if len(lo) == 0:
        return np.zeros((0, 4), dtype=np.int64)
    (u0, u1, v0, v1), any_ok = projected_extent(lo, hi, camera, near, sweep)
    if sweep is not None:
        lo, hi = np.minimum(lo, lo - sweep), np.maximum(hi, hi - sweep)
    rect = np.stack([np.floor(v0), np.floor(v1) + 2, np.floor(u0), np.floor(u1) + 2], 1)
    rect = np.clip(np.nan_to_num(rect, nan=0.0), 0, [h, h, w, w]).astype(np.int64)
    nearest = np.linalg.norm(
        np.clip(np.asarray(camera.position), lo, hi) - np.asarray(camera.position), axis=1
    )
    empty = ~any_ok | (rect[:, 0] >= rect[:, 1]) | (rect[:, 2] >= rect[:, 3]) | (nearest > far)
    rect[empty] = 0
    return rect


def projected_extent(
    lo: np.ndarray, hi: np.ndarray, camera: Camera, near: float = 0.05, sweep: np.ndarray | None = None
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Continuous image extent (u0, u1, v0, v1), each (M,), pixel-centre coordinates, of boxes lo..hi (M, 3).

    The part of each box in front of the near plane z = ``near`` is projected (corners in front plus edge
    crossings), so a box reaching behind the camera gets a correct (large) bound; also returns (M,) bool: True
    where some of the box lies in front of the plane (the extent is 0 elsewhere). ``sweep``: see
    :func:`screen_rects`.
    """
    r = camera.rotation()
    corners = lo[:, None].astype(np.float64) + _CORNERS[None] * (hi - lo)[:, None]  # (M, 8, 3) world
    edges = _EDGES
    if sweep is not None:  # hull of 16 corners; every hull edge is one of the 120 corner pairs
        corners = np.concatenate([corners, corners - sweep[:, None]], axis=1)
        edges = _PAIRS16
    pc = (corners - np.asarray(camera.position)) @ r  # (M, P, 3) camera frame
    a, b = pc[:, edges[:, 0]], pc[:, edges[:, 1]]  # (M, E, 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (near - a[..., 2]) / (b[..., 2] - a[..., 2])
    cross = (s > 0) & (s < 1)
    pts = np.concatenate([pc, a + np.where(cross, s, 0)[..., None] * (b - a)], axis=1)  # (M, P + E, 3)
    ok = np.concatenate([pc[..., 2] >= near, cross], axis=1)
    z = np.where(ok, pts[..., 2], 1.0)
    u = np.where(ok, camera.fx * pts[..., 0] / z + camera.cx, np.nan)
    v = np.where(ok, camera.fy * pts[..., 1] / z + camera.cy, np.nan)
    any_ok = ok.any(axis=1)
    with np.errstate(all="ignore"):
        u0, u1 = np.nanmin(np.where(any_ok[:, None], u, 0), 1), np.nanmax(np.where(any_ok[:, None], u, 0), 1)
        v0, v1 = np.nanmin(np.where(any_ok[:, None], v, 0), 1), np.nanmax(np.where(any_ok[:, None], v, 0), 1)
    return (u0, u1, v0, v1), any_ok


# ------------------------------------------------------------------------------------------ intersections
# Each function takes ray origins ``o`` and directions ``d`` (and 1/d) as 3-sequences whose items are floats
# or arrays of one shape (numpy broadcasting: camera rays share the origin, shadow rays share the direction)
# and returns the entry and exit parameters (tn, tf); a ray hits where tn <= tf (NaN compares false).


def _box(c: np.ndarray, h: np.ndarray, o, d, inv) -> tuple[np.ndarray, np.ndarray]:
    """Slab test; axes where a shared origin lies outside the slab need no min/max."""
    tn = tf = None
    for a in range(3):
        t0, t1 = (c[a] - h[a] - o[a]) * inv[a], (c[a] + h[a] - o[a]) * inv[a]
        scalar = np.ndim(o[a]) == 0 and np.ndim(c[a]) == 0
        if scalar and o[a] <= c[a] - h[a]:
            n, f = t0, t1
        elif scalar and o[a] >= c[a] + h[a]:
            n, f = t1, t0
        else:
            n, f = np.minimum(t0, t1), np.maximum(t0, t1)
        tn = n if tn is None else np.maximum(tn, n)
        tf = f if tf is None else np.minimum(tf, f)
    return tn, tf


def _cylinder(c: np.ndarray, h: np.ndarray, o, d, inv, dxz2=None) -> tuple[np.ndarray, np.ndarray]:
    """Vertical capped cylinder: infinite-cylinder interval intersected with the slab y0 <= y <= y1."""
    a, b = o[0] - c[0], o[2] - c[2]
    big_a = d[0] * d[0] + d[2] * d[2] if dxz2 is None else dxz2
    big_b = a * d[0] + b * d[2]
    disc = np.sqrt(big_b * big_b - big_a * (a * a + b * b - h[0] * h[0]))  # NaN where the ray misses
    t1, t2 = (-big_b - disc) / big_a, (disc - big_b) / big_a
    y0, y1 = (c[1] - h[1] - o[1]) * inv[1], (c[1] + h[1] - o[1]) * inv[1]
    return np.maximum(t1, np.minimum(y0, y1)), np.minimum(t2, np.maximum(y0, y1))


def _ellipsoid(c: np.ndarray, h: np.ndarray, o, d, inv) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned ellipsoid scaled to the unit sphere."""
    oc = [(o[a] - c[a]) / h[a] for a in range(3)]
    dd = [d[a] / h[a] for a in range(3)]
    big_a = dd[0] * dd[0] + dd[1] * dd[1] + dd[2] * dd[2]
    big_b = oc[0] * dd[0] + oc[1] * dd[1] + oc[2] * dd[2]
    disc = np.sqrt(big_b * big_b - big_a * (oc[0] * oc[0] + oc[1] * oc[1] + oc[2] * oc[2] - 1))
    return (-big_b - disc) / big_a, (disc - big_b) / big_a


_INTERSECT = {BOX: _box, CYLINDER: _cylinder, ELLIPSOID: _ellipsoid}


@dataclass
class Hits:
    """Nearest hit per pixel. ``t`` is the z-depth (inf where the ray escapes to the sky)."""

    t: np.ndarray  # (H, W) float32
    index: np.ndarray  # (H, W) int32: primitive index, GROUND or NOTHING
    rays: np.ndarray  # (3, H, W) float32 world directions
    points: np.ndarray  # (3, H, W) float32 world hit points (the camera position where nothing is hit)
    normals: np.ndarray  # (3, H, W) float32 world unit normals, 0 where nothing is hit
    rects: np.ndarray  # (M, 4) int64 each primitive's screen rectangle (v0, v1, u0, u1), see ``screen_rects``
    # (primitive, flat pixel) pairs (P,), (P,) int64 where a ray enters an object's primitive (instance > 0) at
    # t > 0, in front of other surfaces or not: what each object would cover alone (``objects.coverage``)
    entered: tuple[np.ndarray, np.ndarray]


SMALL_RECT = 1024  # primitives covering fewer pixels are intersected together, one batch per kind


def rect_pixels(rects: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """All (row of ``rects``, flat pixel index) pairs covered by the rectangles (P, 4) = (v0, v1, u0, u1).

    Rectangle by rectangle, row-major; built from the rectangles' pixel rows (no integer division per pixel).
    """
    v0, v1, u0, u1 = rects.T
    height, wid = v1 - v0, u1 - u0
    line = np.repeat(np.arange(len(rects)), height)  # the rectangle of each pixel row
    start = (v0[line] + np.arange(len(line)) - (np.cumsum(height) - height)[line]) * width + u0[line]
    lw = wid[line]
    return np.repeat(line, lw), np.repeat(start - (np.cumsum(lw) - lw), lw) + np.arange(lw.sum())


def _batches(scene: Scene, ids: np.ndarray, rects: np.ndarray, width: int):
    """Yield (kind, primitive per pair, centre (3, P), half (3, P), flat pixel per pair) for small rects."""
    kind = scene.kind[ids]
    for k in (BOX, CYLINDER, ELLIPSOID):
        row, pix = rect_pixels(rects[kind == k], width)
        if len(pix):
            p = ids[kind == k][row]
            yield k, p, np.take(scene.center.T, p, axis=1), np.take(scene.half.T, p, axis=1), pix


def cast(scene: Scene, camera: Camera, size: tuple[int, int], far: float = 200.0) -> Hits:
    """Nearest hit of every pixel ray against the ground plane and all primitives closer than ``far``."""
    o = tuple(float(v) for v in camera.position)
    d = camera_rays(camera, size)
    inv = 1.0 / d
    t = np.full(size, np.inf, dtype=np.float32)
    index = np.full(size, NOTHING, dtype=np.int32)
    record, entered = scene.instance > 0, [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if o[1] > 0:
            tg = -o[1] * inv[1]
            np.copyto(t, tg, where=tg > 0)
            index[tg > 0] = GROUND
        rects = screen_rects(*scene.bounds(), camera, size, far=far)
        area = (rects[:, 1] - rects[:, 0]) * (rects[:, 3] - rects[:, 2])
        for i in np.flatnonzero(area >= SMALL_RECT):
            v0, v1, u0, u1 = rects[i]
            db, ib = tuple(x[v0:v1, u0:u1] for x in d), tuple(x[v0:v1, u0:u1] for x in inv)
            tn, tf = _INTERSECT[scene.kind[i]](scene.center[i], scene.half[i], o, db, ib)
            tb = t[v0:v1, u0:u1]
            hit = (tn <= tf) & (tn > 0)
            if record[i]:
                r = np.flatnonzero(hit)
                entered.append((np.full(len(r), i), (v0 + r // (u1 - u0)) * size[1] + u0 + r % (u1 - u0)))
            hit &= tn < tb
            np.copyto(tb, tn, where=hit)
            np.copyto(index[v0:v1, u0:u1], i, where=hit)
        small = np.flatnonzero((area > 0) & (area < SMALL_RECT))
        entered += _cast_small(scene, small, rects[small], o, d, inv, t, index, record)
    points = np.where(np.isfinite(t), t, np.float32(0)) * d
    points += np.asarray(o, dtype=np.float32)[:, None, None]
    pairs = tuple(np.concatenate(x) for x in zip(*entered, strict=True))
    return Hits(t, index, d, points, surface_normals(scene, index, points), rects, pairs)


def _cast_small(
    scene: Scene,
    ids: np.ndarray,
    rects: np.ndarray,
    o: tuple,
    d: np.ndarray,
    inv: np.ndarray,
    t: np.ndarray,
    index: np.ndarray,
    record: np.ndarray,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Nearest hits of many small primitives at once on (primitive, pixel) pairs; updates t and index.

    Returns the (primitive, pixel) pairs where a ray enters a primitive in ``record`` (M,) bool at t > 0.
    """
    tflat, iflat = t.reshape(-1), index.reshape(-1)
    found, entered = [], []
    for kind, prim, c, h, pix in _batches(scene, ids, rects, t.shape[1]):
        db, ib = tuple(x.reshape(-1)[pix] for x in d), tuple(x.reshape(-1)[pix] for x in inv)
        tn, tf = _INTERSECT[kind](c, h, o, db, ib)
        ok = (tn <= tf) & (tn > 0)
        rec = np.flatnonzero(ok & record[prim])
        entered.append((prim[rec], pix[rec]))
        ok &= tn < tflat[pix]
        np.minimum.at(tflat, pix[ok], tn[ok])
        found.append((prim[ok], pix[ok], tn[ok]))
    for prim, pix, tn in found:  # the pair that set a pixel's minimum owns it
        win = tn == tflat[pix]
        iflat[pix[win]] = prim[win]
    return entered


def gather(planes: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``planes[:, index]`` (3, K) for (3, N) arrays and flat indices, plane by plane (faster than numpy's)."""
    out = np.empty((len(planes), len(index)), dtype=planes.dtype)
    for p, o in zip(planes, out, strict=True):
        np.take(p, index, out=o)
    return out


def scatter(planes: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """In place ``planes[:, index] = values`` for (3, N) arrays, flat indices and (3, K) values."""
    for p, v in zip(planes, values, strict=True):
        p[index] = v


def surface_normals(scene: Scene, index: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World unit normals (3, H, W) at hit ``points`` from the primitive geometry; 0 where nothing is hit."""
    n = np.zeros_like(points)
    np.equal(index, GROUND, out=n[1], casting="unsafe")  # 1.0 on the ground
    sel = np.flatnonzero(index.reshape(-1) >= 0)
    if not len(sel):
        return n
    ii = index.reshape(-1)[sel]
    kind = scene.kind[ii]
    h = np.take(scene.half.T, ii, axis=1)  # (3, K)
    q = gather(points.reshape(3, -1), sel)
    q -= np.take(scene.center.T, ii, axis=1)
    q /= h  # (3, K) local coords, |q| <= 1 inside
    gap = (1.0 - np.abs(q)) * h  # metric distance to each pair of box faces
    fx = (gap[0] <= gap[1]) & (gap[0] <= gap[2])
    fy = ~fx & (gap[1] <= gap[2])
    out = np.sign(q)
    out[0] *= fx
    out[1] *= fy
    out[2] *= ~(fx | fy)
    cyl = np.flatnonzero(kind == CYLINDER)
    if len(cyl):
        qc, hc = gather(q, cyl), gather(h, cyl)
        radial = np.sqrt(qc[0] ** 2 + qc[2] ** 2)
        cap = (1.0 - np.abs(qc[1])) * hc[1] < (1.0 - radial) * hc[0]
        side = qc * (np.array([[1], [0], [1]], np.float32) / np.maximum(radial, 1e-6))
        scatter(out, cyl, np.where(cap, np.stack([0 * radial, np.sign(qc[1]), 0 * radial]), side))
    ell = np.flatnonzero(kind == ELLIPSOID)
    if len(ell):
        g = gather(q, ell) / gather(h, ell)
        scatter(out, ell, g / np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]))
    scatter(n.reshape(3, -1), sel, out)
    return n
