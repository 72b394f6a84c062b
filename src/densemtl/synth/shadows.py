"""Exact shadows for a cast view: which hit pixels see the sun (numpy, float32).

Shadow rays towards the sun are cast only from pixels that face it; casters are culled per 8 x 8 pixel tile by
an exact interval slab test against the box of the tile's ray origins (and first per block of 4 x 4 tiles), and
the survivors are intersected exactly (``raycast._INTERSECT``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from densemtl.synth.raycast import _INTERSECT, Camera, Hits
from densemtl.synth.scene import BOX, CYLINDER, ELLIPSOID, Scene

SHADOW_TILE, SHADOW_BLOCK = 8, 4  # shadow casters are culled per block of 4 x 4 tiles, then per 8 x 8 tile
SHADOW_LEVELS = 2  # block levels above the tiles: blocks of 4 x 4 tiles, then of 4 x 4 blocks


@lru_cache(maxsize=8)
def _tile_pixels(size: tuple[int, int], tile: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Flat pixel index of each tile slot (T, tile * tile), -1 past the image edge, and the tile grid."""
    h, w = size
    ny, nx = -(-h // tile), -(-w // tile)
    v, u = np.arange(ny * tile)[:, None], np.arange(nx * tile)[None, :]
    flat = np.where((v < h) & (u < w), v * w + u, -1)
    return flat.reshape(ny, tile, nx, tile).transpose(0, 2, 1, 3).reshape(ny * nx, tile * tile), (ny, nx)


def _to_tiles(planes: np.ndarray, tile: int) -> np.ndarray:
    """(C, H, W) -> (C, T, tile * tile) in ``_tile_pixels`` order, padded with NaN past the image edge."""
    c, h, w = planes.shape
    ny, nx = -(-h // tile), -(-w // tile)
    if (ny * tile, nx * tile) != (h, w):
        padded = np.full((c, ny * tile, nx * tile), np.nan, planes.dtype)
        padded[:, :h, :w] = planes
        planes = padded
    return planes.reshape(c, ny, tile, nx, tile).transpose(0, 1, 3, 2, 4).reshape(c, ny * nx, tile * tile)


def _slab(planes: tuple, inv: list, origins: tuple, ci: np.ndarray, oi: np.ndarray) -> np.ndarray:
    """Shadow-ray slab test of boxes ``ci`` against origins ``oi``: True where tn <= tf and tf > 0.

    planes = (entry, exit) (3, C) float32: per axis the slab plane crossed first/last along the shared
    direction (1/direction ``inv``); origins = (for entry, for exit) (3, N, ...) float32: the same array for
    rays (NaN never hits), the favourable corners of boxes of origins for culling. Same float32 arithmetic as
    ``_box``.
    """
    tn = tf = None
    extra = (slice(None),) + (None,) * (origins[0].ndim - 2)  # broadcast planes over trailing origin axes
    for a in range(3):
        oa = origins[0][a][oi]
        n = (planes[0][a][ci][extra] - oa) * inv[a]
        f = (planes[1][a][ci][extra] - (oa if origins[1] is origins[0] else origins[1][a][oi])) * inv[a]
        tn = n if tn is None else np.maximum(tn, n, out=tn)
        tf = f if tf is None else np.minimum(tf, f, out=tf)
    np.maximum(tn, np.float32(1e-45), out=tn)  # tn <= tf now also says tf >= smallest float32 > 0
    return tn <= tf


def _cull(planes: tuple, inv: list, lo: np.ndarray, hi: np.ndarray, ci: np.ndarray, ti: np.ndarray):
    """Interval slab test of boxes ``ci`` against boxes of origins ``ti`` (NaN = empty): exact for a box."""
    near = np.stack([(hi if v > 0 else lo)[a] for a, v in enumerate(inv)])  # origin corner nearest the entry
    far = np.stack([(lo if v > 0 else hi)[a] for a, v in enumerate(inv)])
    keep = _slab(planes, inv, (near, far), ci, ti)
    return ci[keep], ti[keep]


def _coarser(lo: np.ndarray, hi: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Origin bounds (3, ny, nx) of cells -> bounds of blocks of b x b cells (3, ceil(ny / b), ceil(nx / b))."""
    _, ny, nx = lo.shape
    by, bx = -(-ny // b), -(-nx // b)
    pad = ((0, 0), (0, by * b - ny), (0, bx * b - nx))
    blo = np.pad(lo, pad, constant_values=np.nan).reshape(3, by, b, bx, b)
    bhi = np.pad(hi, pad, constant_values=np.nan).reshape(3, by, b, bx, b)
    return np.fmin.reduce(blo, axis=(2, 4)), np.fmax.reduce(bhi, axis=(2, 4))


def _refine(ci: np.ndarray, bi: np.ndarray, coarse: tuple[int, int], fine: tuple[int, int], b: int):
    """Pairs (caster, block of the coarse grid) -> pairs (caster, each of the block's cells in the fine grid)."""
    dy, dx = np.divmod(np.arange(b * b), b)
    ty, tx = (bi // coarse[1] * b)[:, None] + dy, (bi % coarse[1] * b)[:, None] + dx  # (P, b * b)
    ok = (ty < fine[0]) & (tx < fine[1])
    return np.broadcast_to(ci[:, None], ok.shape)[ok], (ty * fine[1] + tx)[ok]


def _shadow_pairs(planes: tuple, inv: list, o: np.ndarray, grid: tuple[int, int]):
    """(caster, tile) pairs that survive culling, coarse to fine: blocks of b x b tiles, blocks of b x b of
    those, ... (``SHADOW_LEVELS`` levels above the tiles); o (3, T, S).

    Each test is exact for its box of origins, and a block's box holds its cells' boxes, so the pairs that
    reach the tiles are the same whatever the number of levels; coarse levels only make the culling cheaper.
    """
    b = SHADOW_BLOCK
    lo, hi = np.fmin.reduce(o, axis=2), np.fmax.reduce(o, axis=2)  # (3, T) NaN for tiles without origins
    pyramid = [(lo.reshape(3, *grid), hi.reshape(3, *grid))]
    for _ in range(SHADOW_LEVELS):
        pyramid.append(_coarser(*pyramid[-1], b))
    top_lo, top_hi = pyramid[-1]
    ci, bi = (
        g.ravel()
        for g in np.meshgrid(np.arange(planes[0].shape[1]), np.arange(top_lo[0].size), indexing="ij")
    )
    ci, bi = _cull(planes, inv, top_lo.reshape(3, -1), top_hi.reshape(3, -1), ci, bi)
    for (clo, _), (flo, fhi) in zip(pyramid[:0:-1], pyramid[-2::-1], strict=True):
        ci, bi = _refine(ci, bi, clo.shape[1:], flo.shape[1:], b)
        ci, bi = _cull(planes, inv, flo.reshape(3, -1), fhi.reshape(3, -1), ci, bi)
    return ci, bi


def sun_visibility(
    scene: Scene,
    hits: Hits,
    camera: Camera,
    sun_dir: tuple[float, float, float],
    far: float = 200.0,
    where: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W) bool: True where the shadow ray from the hit point towards the sun reaches the sky.

    Only pixels in ``where`` (default: all) are tested, the others are reported lit. Casters are culled per
    8 x 8 pixel tile by the interval version of the slab test on the box of the tile's ray origins (exact for
    that box), then each surviving (caster, tile) pair tests the tile's rays.
    """
    s = np.asarray(sun_dir, dtype=np.float64)
    s = s / np.linalg.norm(s)
    size = hits.t.shape
    if s[1] <= 1e-3:  # sun at or below the horizon: nothing is sunlit
        return np.zeros(size, dtype=bool)
    lit = np.ones(size, dtype=bool)
    casters = np.flatnonzero(scene.casts_shadow)
    lo, hi = scene.center[casters] - scene.half[casters], scene.center[casters] + scene.half[casters]
    # casters whose shadow volume (box swept away from the sun to the ground) is beyond ``far`` are culled
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    reach = (hi64[:, 1:2] / s[1]) * s
    cam = np.asarray(camera.position, dtype=np.float64)
    box = np.clip(cam, np.minimum(lo64, lo64 - reach), np.maximum(hi64, hi64 - reach))
    keep = np.linalg.norm(box - cam, axis=1) <= far
    casters, lo, hi = casters[keep], lo[keep], hi[keep]
    if len(casters) == 0 or (where is not None and not where.any()):
        return lit
    sd = tuple(float(v) for v in s)
    inv64 = tuple(1.0 / v if abs(v) > 1e-9 else 1e9 for v in sd)
    inv = [np.float32(v) for v in inv64]
    planes = tuple(
        np.stack([(x if v > 0 else y)[:, a] for a, v in enumerate(inv)]) for x, y in ((lo, hi), (hi, lo))
    )
    origin = np.float32(2e-3) * hits.normals  # step off the surface to avoid self-shadowing
    origin += hits.points
    if where is not None:
        np.copyto(origin, np.nan, where=~where)  # NaN origins never hit and never widen a tile's box
    o = _to_tiles(origin, SHADOW_TILE)  # (3, T, 64)
    pix, grid = _tile_pixels(size, SHADOW_TILE)
    ci, ti = _shadow_pairs(planes, inv, o, grid)
    kind = scene.kind[casters][ci]
    box = kind == BOX
    shadowed = [pix[ti[box]][_slab(planes, inv, (o, o), ci[box], ti[box])]]
    for kd in (CYLINDER, ELLIPSOID):  # same arithmetic as the camera rays' batches
        sel = np.flatnonzero(kind == kd)
        if len(sel):
            prim, tk = casters[ci[sel]], ti[sel]
            c, h = (
                np.take(scene.center.T, prim, axis=1)[..., None],
                np.take(scene.half.T, prim, axis=1)[..., None],
            )
            with np.errstate(invalid="ignore"):  # NaN where a ray misses
                tn, tf = _INTERSECT[kd](c, h, tuple(x[tk] for x in o), sd, inv64)
            shadowed.append(pix[tk][(tn <= tf) & (tf > 0)])
    lit.reshape(-1)[np.concatenate(shadowed)] = False
    return lit
