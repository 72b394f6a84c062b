"""The built-in synthetic street-scene dataset: exact ray-cast RGB, labels, z-depth and normals.

``render(scene, camera, size)`` turns a ``Scene`` (``scene.py``) seen from a ``Camera`` (``raycast.py``) into
numpy arrays; ``render_sample`` samples a scene and a camera from a per-sample seed and renders it
(``synth.generate.generate_dataset`` writes many of them as a dataset). Conventions:

* world frame: x right, y up, z forward along the road, ground y = 0, metres;
* camera frame (OpenCV): x right, y down, z forward; depth is the z coordinate (not the ray length), 0 where
  the ray sees the sky or the surface is farther than ``max_depth`` (80 m);
* normals are unit vectors in the camera frame, (0, 0, 0) only for sky (surfaces beyond 80 m keep theirs);
* classes (ids 0-7): road, sidewalk (incl. kerbs), building, vegetation (trees, hedges), pole (incl. sign panels
  and lamp arms), car, person, sky; every pixel is labelled, 255 never occurs;
* objects: every car and person gets an instance id; ``instances`` and ``objects`` (``synth.objects``) are
  written as ``<split>/instances/<id>.png`` and ``<split>/objects/<id>.json`` (``densemtl.data.objects``);
* sample ``i`` of split ``s`` is a pure function of (seed, s, i), so files are byte-identical for any number
  of workers.
"""

from __future__ import annotations

import zlib
from statistics import NormalDist
from typing import Any

import cv2
import numpy as np

from densemtl.synth import scene as sc
from densemtl.synth.objects import annotate
from densemtl.synth.raycast import GROUND, NOTHING, Camera, Hits, cast, gather, scatter
from densemtl.synth.scene import Scene
from densemtl.synth.shadows import sun_visibility
from densemtl.synth.streets import sample_scene

DEPTH_MAX = 80.0
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


# ------------------------------------------------------------------------------------------------ textures
def _noise(x: np.ndarray, y: np.ndarray, z: np.ndarray, cell: float) -> np.ndarray:
    """Blocky value noise in [0, 1): a hash of the integer cell of each world point."""

    def cell_id(v: np.ndarray) -> np.ndarray:  # clipped so far-away points (horizon) stay in int32 range
        return np.floor(np.clip(v * (1 / cell), -2e9, 2e9)).astype(np.int32).view(np.uint32)

    h = cell_id(x) * np.uint32(0x8DA6B343)
    h ^= cell_id(y) * np.uint32(0xD8163841)
    h ^= cell_id(z) * np.uint32(0xCB1AB31F)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1 / 2**24)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _ground(scene: Scene, p: np.ndarray) -> np.ndarray:
    """Albedo (3, K) of ground points p (3, K): asphalt with lane markings, paving beyond the road."""
    x, z = p[0], p[2]
    road = np.abs(x) <= scene.road_half_width
    grain = 0.8 + 0.25 * _noise(x, p[1], z, 0.3) + 0.15 * _noise(x, p[1], z, 2.1)
    alb = (
        np.where(
            road,
            np.asarray(scene.asphalt, np.float32)[:, None],
            np.asarray(scene.ground_paving, np.float32)[:, None],
        )
        * grain
    )
    if scene.markings:
        half_drive = scene.lanes * scene.lane_width / 2
        edge = half_drive if scene.parking_width > 0 else scene.road_half_width - 0.3
        paint = np.abs(np.abs(x) - edge) < 0.075
        for k in range(1, scene.lanes):
            xk = -half_drive + k * scene.lane_width
            line = np.abs(x - xk) < 0.075
            if 2 * k != scene.lanes:  # dashed between lanes of one direction, solid in the centre
                line &= _frac(z / 9.0) < 0.34
            paint |= line
        paint = np.flatnonzero(paint & road)  # noise only where there is paint
        xp, zp = x[paint], z[paint]
        scatter(
            alb,
            paint,
            np.broadcast_to(np.float32(0.85) * (0.75 + 0.25 * _noise(xp, 0 * xp, zp, 0.5)), (3, len(paint))),
        )
    return alb


def _facade(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    """Window grid on vertical faces: floor height, column spacing, window width/height fractions."""
    prm = np.take(scene.param.T, ii, axis=1)  # (4, K)
    along = np.where(np.abs(n[0]) > 0.5, p[2], p[0])
    floor, column = p[1] / prm[0], along / prm[1]
    fy = _frac(floor)
    win = (np.abs(_frac(column) - 0.5) < prm[2] / 2) & (fy > 0.3) & (fy < 0.3 + prm[3]) & (np.abs(n[1]) < 0.5)
    win = np.flatnonzero(win & (p[1] > 0.7 * prm[0]))  # no windows in the lowest part of the ground floor
    iw = ii[win]
    cell = _noise(np.floor(column[win]), np.floor(floor[win]), iw.astype(np.float32), 1.0)  # per window
    glass = np.take(scene.color2.T, iw, axis=1) * (0.55 + 0.9 * cell)
    alb *= 0.88 + 0.2 * _noise(along, p[1], ii.astype(np.float32), 0.4)
    scatter(alb, win, glass)


def _car_glass(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    """Cabin: glass with a painted roof, sill and pillars."""
    q = (p - scene.center[ii].T) / scene.half[ii].T  # (3, K) in [-1, 1]
    side = np.abs(n[0]) > 0.5
    pillar = side & ((np.abs(q[2]) > 0.88) | (np.abs(q[2]) < 0.06))
    pillar |= ~side & (np.abs(q[0]) > 0.9)
    glass = (np.abs(n[1]) < 0.5) & (q[1] < 0.8) & (q[1] > -0.75) & ~pillar
    np.copyto(alb, scene.color2[ii].T, where=glass)


def _sign(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    """White border on the face towards -z; grey metal on the back."""
    q = (p - scene.center[ii].T) / scene.half[ii].T
    border = (np.maximum(np.abs(q[0]), np.abs(q[1])) > 0.82) & (n[2] < -0.5)
    np.copyto(alb, scene.color2[ii].T, where=border)
    np.copyto(alb, np.float32(0.45), where=n[2] > 0.5)


def _paving(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    """Square tiles with mortar joints on the sidewalk top; lighter kerb stones on the side faces."""
    tile = scene.param[ii, 0]
    joint = (_frac(p[0] / tile) < 0.05) | (_frac(p[2] / tile) < 0.05)
    alb *= 0.85 + 0.25 * _noise(p[0] / tile, 0 * tile, p[2] / tile, 1.0)  # per-tile brightness
    np.copyto(alb, scene.color2[ii].T, where=joint)
    np.copyto(alb, np.float32(0.7), where=np.abs(n[1]) < 0.5)


def _leaves(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    alb *= 0.55 + 0.45 * _noise(p[0], p[1], p[2], 0.13) + 0.3 * _noise(p[0], p[1], p[2], 0.5)


def _bark(scene: Scene, ii: np.ndarray, p: np.ndarray, n: np.ndarray, alb: np.ndarray) -> None:
    alb *= 0.7 + 0.5 * _noise(p[0] * 8, p[1], p[2] * 8, 0.25)


_TEXTURES = {
    sc.FACADE: _facade,
    sc.CAR_GLASS: _car_glass,
    sc.SIGN: _sign,
    sc.PAVING: _paving,
    sc.LEAVES: _leaves,
    sc.BARK: _bark,
}


def _albedo(scene: Scene, hits: Hits) -> np.ndarray:
    """Per-pixel albedo (3, H, W): primitive colour, ground texture, then per-material textures.

    Pixels are gathered once, sorted by material, so every texture works on one contiguous slice.
    """
    idx = hits.index.reshape(-1)
    alb = np.zeros((3, idx.size), dtype=np.float32)
    pts, nrm = hits.points.reshape(3, -1), hits.normals.reshape(3, -1)
    ground = np.flatnonzero(idx == GROUND)
    scatter(alb, ground, _ground(scene, gather(pts, ground)))
    prim = np.flatnonzero(idx >= 0)
    if len(prim):
        ii = idx[prim]
        mat = scene.material[ii]
        order = np.argsort(mat, kind="stable")
        prim, ii, mat = prim[order], ii[order], mat[order]
        edges = np.searchsorted(mat, np.arange(257))
        block = np.take(scene.color.T, ii, axis=1)  # (3, K)
        p, n = gather(pts, prim), gather(nrm, prim)
        for m, texture in _TEXTURES.items():
            s = slice(edges[m], edges[m + 1])
            if s.stop > s.start:
                texture(scene, ii[s], p[:, s], n[:, s], block[:, s])  # block[:, s] is a view: edited in place
        scatter(alb, prim, block)
    return alb.reshape(hits.points.shape)


# ------------------------------------------------------------------------------------------------ shading
def _sky(scene: Scene, rays: np.ndarray) -> np.ndarray:
    """Sky colour (3, K) for ray directions (3, K): horizon-to-zenith gradient plus a sun glow."""
    lt = scene.lighting
    unit = rays / np.linalg.norm(rays, axis=0, keepdims=True)
    w = np.sqrt(np.clip(unit[1], 0, 1))
    sky = (
        np.asarray(lt.sky_horizon, np.float32)[:, None] * (1 - w)
        + np.asarray(lt.sky_zenith, np.float32)[:, None] * w
    )
    cos = np.clip(np.asarray(lt.sun_dir, np.float32) @ unit, 0, 1)
    glow = 0.12 * cos**8
    # 0.8 cos^300 is below half an ulp of 0.12 cos^8 for cos <= 0.9 (ratio < 1e-12): adding it changes nothing
    # there, and float32 pow is slow (~100 ns), so it is evaluated near the sun only (bit-identical sky)
    hot = np.flatnonzero(cos > 0.9)
    glow[hot] += 0.8 * cos[hot] ** 300
    return sky + np.asarray(lt.sun_color, np.float32)[:, None] * glow


def _sun_cosine(scene: Scene, hits: Hits) -> np.ndarray:
    """(H, W) float32 max(0, n . sun): 0 on sky (n = 0) and on faces turned away from the sun."""
    n = hits.normals
    sun = np.asarray(scene.lighting.sun_dir, np.float32)
    return np.maximum(sun[0] * n[0] + sun[1] * n[1] + sun[2] * n[2], 0)


def _shade(scene: Scene, hits: Hits, ndl: np.ndarray, albedo: np.ndarray) -> np.ndarray:
    """Lambert sun (``ndl``, shadows applied) + hemisphere ambient, distance fog, sky; linear RGB (3, H, W)."""
    lt = scene.lighting
    n = hits.normals
    amb = np.asarray(lt.ambient, np.float32)[:, None, None] * (0.6 + 0.4 * n[1])
    rgb = np.asarray(lt.sun_color, np.float32)[:, None, None] * ndl  # in place from here: the same floats
    rgb += amb
    rgb *= albedo
    surface = hits.index != NOTHING
    d = hits.rays
    dist = np.where(surface, hits.t, 0) * np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
    trans = np.exp(dist * np.float32(-1 / lt.fog_distance))
    rgb *= trans
    rgb += np.asarray(lt.sky_horizon, np.float32)[:, None, None] * (1 - trans)
    sky = np.flatnonzero(~surface)
    scatter(rgb.reshape(3, -1), sky, _sky(scene, gather(hits.rays.reshape(3, -1), sky)))
    return rgb


# Gaussian quantiles of 256 equiprobable bins: Gaussian noise from random bytes (10x cheaper than normal()).
_GAUSS_LUT = np.array([NormalDist().inv_cdf((k + 0.5) / 256) for k in range(256)], dtype=np.float32)


def _to_uint8(
    rgb: np.ndarray, exposure: float, noise_std: float, rng: np.random.Generator | None
) -> np.ndarray:
    """(3, H, W) radiance -> (H, W, 3) uint8 with exposure, a soft shoulder and Gaussian sensor noise; ``rgb``
    is overwritten."""
    x = rgb  # edited in place
    x *= np.float32(exposure)
    shoulder = 1 + 0.25 * x  # soft highlight roll-off; albedos are display values, no gamma
    x *= 1.25 * 255
    x /= shoulder
    if rng is not None and noise_std > 0:
        noise = np.frombuffer(rng.bytes(x.size), dtype=np.uint8).reshape(-1, x.shape[-1])
        lut = _GAUSS_LUT * np.float32(noise_std * 255)  # scaling the 256 entries gives the same floats
        x += cv2.LUT(noise, lut).reshape(x.shape)  # a float32 table look-up, 3x faster than np.take
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return cv2.merge(list(x.astype(np.uint8)))  # (H, W, 3); the planes truncate to uint8 as the cast does


def render(
    scene: Scene,
    camera: Camera,
    size: tuple[int, int],
    *,
    max_depth: float = DEPTH_MAX,
    far: float = 200.0,
    shadows: bool = True,
    noise_rng: np.random.Generator | None = None,
    objects: bool = True,
) -> dict[str, Any]:
    """Ray-cast one view.

    Args:
        scene: what to render; camera: intrinsics and pose; size: (H, W).
        max_depth: depth beyond this is written as 0 (invalid); labels and normals stay.
        far: primitives farther than this are culled (fog hides them); the ground plane is never culled.
        shadows: cast exact shadow rays towards the sun.
        noise_rng: source of sensor noise; None renders without noise.
        objects: also return ``instances`` and ``objects`` (see ``densemtl.synth.objects.annotate``).

    Returns:
        ``image`` (H, W, 3) uint8, ``semseg`` (H, W) uint8, ``depth`` (H, W) float32 metres (z, 0 = invalid),
        ``normals`` (H, W, 3) float32 camera frame, ``meta`` (intrinsics, pose, road layout); with ``objects``
        also ``instances`` (H, W) uint16 (0 = no object) and ``objects`` (list of dicts, folder format).
    """
    hits = cast(scene, camera, size, far=far)
    lt = scene.lighting
    ndl = _sun_cosine(scene, hits)
    if shadows and any(lt.sun_color):  # shadow rays only where the sun term is not 0 anyway
        ndl[~sun_visibility(scene, hits, camera, lt.sun_dir, far=far, where=ndl > 0)] = 0
    image = _to_uint8(_shade(scene, hits, ndl, _albedo(scene, hits)), lt.exposure, lt.noise_std, noise_rng)
    lut = np.concatenate([np.array([sc.SKY, sc.ROAD], np.uint8), scene.label])  # by index + 2 (NOTHING = -2)
    semseg = np.take(lut, hits.index + 2)
    semseg[(hits.index == GROUND) & (np.abs(hits.points[0]) > scene.road_half_width)] = sc.SIDEWALK
    depth = np.where(hits.t <= max_depth, hits.t, np.float32(0))  # inf (sky) compares False
    r, n = camera.rotation().astype(np.float32), hits.normals
    normals = cv2.merge([r[0, k] * n[0] + r[1, k] * n[1] + r[2, k] * n[2] for k in range(3)])  # R^T world
    meta = {**camera.meta(), **scene.layout_meta()}
    out = {"image": image, "semseg": semseg, "depth": depth, "normals": normals, "meta": meta}
    if objects:
        out["instances"], out["objects"] = annotate(scene, camera, hits)
    return out


# ------------------------------------------------------------------------------------------------ dataset
def sample_camera(rng: np.random.Generator, scene: Scene, size: tuple[int, int]) -> Camera:
    """Dash-cam-like camera in the ego lane near z = 0: height 1.2-1.8 m, 55-90 deg horizontal FOV."""
    h, w = size
    hfov = np.radians(rng.uniform(55, 90))
    f = (w / 2) / np.tan(hfov / 2)
    return Camera(
        fx=float(f),
        fy=float(f * rng.uniform(0.98, 1.02)),
        cx=float((w - 1) / 2 + rng.uniform(-0.02, 0.02) * w),
        cy=float((h - 1) / 2 + rng.uniform(-0.02, 0.02) * h),
        position=(
            float(scene.ego_x + rng.uniform(-0.5, 0.5)),
            float(rng.uniform(1.2, 1.8)),
            float(rng.uniform(-2, 2)),
        ),
        yaw_deg=float(rng.uniform(-6, 6)),
        pitch_deg=float(rng.uniform(-2, 5)),
        roll_deg=float(rng.uniform(-2.5, 2.5)),
    )


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator for sample ``index`` of ``split``: same triple, same stream, in any process."""
    code = SPLIT_CODES.get(split, zlib.crc32(split.encode()))
    return np.random.default_rng(np.random.SeedSequence([seed, code, index]))


def render_sample(seed: int, split: str, index: int, size: tuple[int, int]) -> dict[str, Any]:
    """Sample a scene and a camera from (seed, split, index) and render it (see ``render``)."""
    rng = sample_rng(seed, split, index)
    scene = sample_scene(rng)
    out = render(scene, sample_camera(rng, scene, size), size, noise_rng=rng)
    out["meta"].update(seed=seed, split=split, index=index)
    return out
