"""Procedural street sampling: random road layouts, facades, trees, poles, cars, people and lighting.

Everything is drawn from one ``numpy.random.Generator`` so a scene is a pure function of its seed. Layout (world
frame of ``scene.py``): the road is |x| <= road_half_width (driving lanes plus optional parking strips), raised
sidewalks follow outside it, facades stand behind the sidewalks with gaps, setbacks and hedges, trees and poles
line the kerb, cars park along the kerb and drive in the lanes, people walk on the sidewalks and sometimes cross
the road. Every car and person gets the next object id of the scene (``Primitive.instance``), drawn from a counter
that consumes no random numbers, so the scene's geometry does not depend on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import numpy as np

from densemtl.synth.scene import (
    BARK,
    BUILDING,
    CAR,
    CAR_BODY,
    CAR_GLASS,
    FACADE,
    LEAVES,
    PAVING,
    PERSON,
    POLE,
    SIDEWALK,
    SIGN,
    SIGN_LABEL,
    VEGETATION,
    Lighting,
    Primitive,
    Scene,
    Vec3,
    box,
    cylinder,
    ellipsoid,
)

# Palettes overlap on purpose (grey cars, grey facades, grey asphalt; green facades and green cars) so that
# a model has to use shape and context, not colour alone.
_FACADE = (
    (0.55, 0.55, 0.55),
    (0.75, 0.7, 0.6),
    (0.55, 0.32, 0.24),
    (0.85, 0.84, 0.8),
    (0.4, 0.42, 0.45),
    (0.72, 0.6, 0.48),
    (0.45, 0.55, 0.45),
    (0.65, 0.55, 0.62),
    (0.3, 0.3, 0.32),
)
_GLASS = ((0.12, 0.15, 0.2), (0.3, 0.38, 0.45), (0.55, 0.62, 0.7), (0.2, 0.2, 0.18))
_LEAF = ((0.22, 0.38, 0.12), (0.3, 0.45, 0.18), (0.16, 0.3, 0.14), (0.45, 0.5, 0.2), (0.55, 0.42, 0.15))
_CAR = (
    (0.9, 0.9, 0.9),
    (0.08, 0.08, 0.09),
    (0.6, 0.62, 0.64),
    (0.65, 0.1, 0.1),
    (0.12, 0.2, 0.5),
    (0.2, 0.35, 0.2),
    (0.85, 0.7, 0.15),
    (0.4, 0.3, 0.22),
    (0.35, 0.36, 0.38),
)
_CLOTH = (
    (0.1, 0.1, 0.12),
    (0.2, 0.25, 0.45),
    (0.6, 0.1, 0.12),
    (0.85, 0.85, 0.82),
    (0.3, 0.4, 0.25),
    (0.45, 0.42, 0.4),
    (0.7, 0.55, 0.35),
    (0.2, 0.45, 0.55),
)
_SKIN = ((0.87, 0.7, 0.58), (0.72, 0.52, 0.38), (0.45, 0.3, 0.2), (0.95, 0.8, 0.7))
_SIGN = ((0.8, 0.1, 0.1), (0.1, 0.25, 0.7), (0.95, 0.8, 0.1), (0.95, 0.95, 0.95), (0.1, 0.5, 0.25))
_METAL = ((0.5, 0.5, 0.52), (0.2, 0.22, 0.2), (0.15, 0.28, 0.2), (0.65, 0.65, 0.62))


def _pick(rng: np.random.Generator, palette: tuple[Vec3, ...], jitter: float = 0.06) -> Vec3:
    """A palette colour scaled by 0.8-1.15 with per-channel jitter (plain floats: this runs ~500x a scene)."""
    u = rng.random(5).tolist()
    (r, g, b), scale = palette[int(u[0] * len(palette))], 0.8 + 0.35 * u[1]
    return (
        min(1.0, max(0.02, r * scale + (2 * u[2] - 1) * jitter)),
        min(1.0, max(0.02, g * scale + (2 * u[3] - 1) * jitter)),
        min(1.0, max(0.02, b * scale + (2 * u[4] - 1) * jitter)),
    )


def _buildings(rng: np.random.Generator, side: int, x0: float, z0: float, z1: float) -> list[Primitive]:
    """A row of facades starting at |x| = x0 on ``side`` (-1 left, +1 right), with gaps and setbacks."""
    out: list[Primitive] = []
    z = z0 - rng.uniform(0, 10)
    while z < z1:
        length = rng.uniform(8, 30)
        if rng.random() < 0.12:  # empty lot: hedge and trees instead of a building
            out += _hedge(rng, side, x0 + rng.uniform(0.5, 3), z, z + length)
            z += length
            continue
        near = x0 + (rng.uniform(0, 4) if rng.random() < 0.4 else 0.0)
        depth, height = rng.uniform(8, 20), float(np.exp(rng.uniform(np.log(5), np.log(40))))
        xs = sorted((side * near, side * (near + depth)))
        param = (
            rng.uniform(2.8, 3.8),
            rng.uniform(1.8, 3.5),
            rng.uniform(0.35, 0.7),
            rng.uniform(0.35, 0.65),
        )
        kw = dict(material=FACADE, color2=_pick(rng, _GLASS, 0.04), param=param)
        color = _pick(rng, _FACADE)
        out.append(box((xs[0], 0.0, z), (xs[1], height, z + length), BUILDING, color, **kw))
        if rng.random() < 0.3 and height > 8:  # set-back upper storeys
            inset = rng.uniform(1, 3)
            lo = (xs[0] + inset * (side > 0), height, z + inset)
            hi = (xs[1] - inset * (side < 0), height + rng.uniform(3, 9), z + length - inset)
            out.append(box(lo, hi, BUILDING, color, **kw))
        if near > x0 + 1.5 and rng.random() < 0.6:
            out += _hedge(rng, side, x0 + 0.3, z, z + length)[:1]
        z += length + (rng.uniform(2, 12) if rng.random() < 0.3 else 0.0)
    return out


def _hedge(rng: np.random.Generator, side: int, x: float, z0: float, z1: float) -> list[Primitive]:
    """A hedge along the sidewalk edge, sometimes with trees behind it."""
    w, h = rng.uniform(0.6, 1.5), rng.uniform(0.7, 2.0)
    xs = sorted((side * x, side * (x + w)))
    out = [box((xs[0], 0.0, z0), (xs[1], h, z1), VEGETATION, _pick(rng, _LEAF), material=LEAVES)]
    for zt in np.arange(z0 + rng.uniform(2, 6), z1, rng.uniform(5, 10)):
        out += _tree(rng, side * (x + w + rng.uniform(1, 4)), float(zt), 0.0)
    return out


def _tree(rng: np.random.Generator, x: float, z: float, base: float) -> list[Primitive]:
    """Trunk (cylinder) and crown (ellipsoid) standing on height ``base``."""
    trunk_h, r = rng.uniform(1.8, 4.0), rng.uniform(0.1, 0.25)
    rx, ry = rng.uniform(1.2, 3.0), rng.uniform(1.5, 3.5)
    top = base + trunk_h
    bark = _pick(rng, ((0.35, 0.25, 0.18), (0.3, 0.3, 0.28)), 0.04)
    crown = ellipsoid(
        (x, top + 0.6 * ry, z),
        (rx, ry, rx * rng.uniform(0.8, 1.2)),
        VEGETATION,
        _pick(rng, _LEAF),
        material=LEAVES,
    )
    return [cylinder(x, z, base, top + 0.5 * ry, r, VEGETATION, bark, material=BARK), crown]


def _pole(rng: np.random.Generator, side: int, x: float, z: float, base: float) -> list[Primitive]:
    """A pole with an optional sign panel facing the road and an optional lamp arm over the road."""
    r, h = rng.uniform(0.05, 0.14), rng.uniform(3, 9)
    metal = _pick(rng, _METAL, 0.03)
    out = [cylinder(x, z, base, base + h, r, POLE, metal)]
    if rng.random() < 0.5:
        w, hh, y = rng.uniform(0.4, 0.9), rng.uniform(0.4, 0.9), base + rng.uniform(2.0, min(3.2, h - 0.3))
        cx = x - side * (r + w / 2) if rng.random() < 0.5 else x
        out.append(
            box(
                (cx - w / 2, y - hh / 2, z - r - 0.05),
                (cx + w / 2, y + hh / 2, z - r - 0.01),
                SIGN_LABEL,
                _pick(rng, _SIGN, 0.02),
                material=SIGN,
                color2=(0.95, 0.95, 0.95),
            )
        )
    if rng.random() < 0.4 and h > 5:
        arm = rng.uniform(1.0, 3.0)
        xs = sorted((x, x - side * arm))
        out.append(box((xs[0], base + h - 0.12, z - 0.06), (xs[1], base + h, z + 0.06), SIGN_LABEL, metal))
    return out


def _car(rng: np.random.Generator, x: float, z: float, instance: int) -> list[Primitive]:
    """Lower body, glass cabin and four wheels (thin ellipsoids), aligned with the road; all of object ``instance``."""
    length, width = rng.uniform(3.6, 4.9), rng.uniform(1.6, 1.9)
    van = rng.random() < 0.15
    top = rng.uniform(1.9, 2.3) if van else rng.uniform(1.35, 1.6)
    belt = rng.uniform(0.85, 1.05)
    cab_len = length * (rng.uniform(0.7, 0.8) if van else rng.uniform(0.45, 0.6))
    cab_z = z + rng.uniform(-0.1, 0.05) * length
    paint, glass = _pick(rng, _CAR, 0.04), _pick(rng, _GLASS, 0.03)
    hw, hl = width / 2, length / 2
    out = [
        box((x - hw, 0.28, z - hl), (x + hw, belt, z + hl), CAR, paint, material=CAR_BODY, instance=instance),
        box(
            (x - hw + 0.06, belt, cab_z - cab_len / 2),
            (x + hw - 0.06, top, cab_z + cab_len / 2),
            CAR,
            paint,
            material=CAR_GLASS,
            color2=glass,
            instance=instance,
        ),
    ]
    for sx in (-1, 1):
        for sz in (-1, 1):
            c = (x + sx * (hw - 0.12), 0.32, z + sz * (hl - 0.75))
            out.append(ellipsoid(c, (0.12, 0.32, 0.32), CAR, (0.05, 0.05, 0.05), instance=instance))
    return out


def _person(rng: np.random.Generator, x: float, z: float, base: float, instance: int) -> list[Primitive]:
    """Two legs, a torso with arms (cylinders) and a head (sphere), all of object ``instance``."""
    h = rng.uniform(1.0, 1.35) if rng.random() < 0.15 else rng.uniform(1.5, 1.95)
    leg, head = 0.47 * h, 0.065 * h
    torso_r = rng.uniform(0.13, 0.2) * h / 1.75
    stride = rng.uniform(-0.18, 0.18)
    trousers, shirt = _pick(rng, _CLOTH), _pick(rng, _CLOTH)
    kw = {"instance": instance}
    out = [
        cylinder(
            x + s * 0.09 * h / 1.75,
            z + s * stride,
            base,
            base + leg,
            0.065 * h / 1.75,
            PERSON,
            trousers,
            **kw,
        )
        for s in (-1, 1)
    ]
    neck = base + h - 2 * head
    out.append(cylinder(x, z, base + leg - 0.05, neck, torso_r, PERSON, shirt, **kw))
    for s in (-1, 1):
        out.append(
            cylinder(
                x + s * (torso_r + 0.04),
                z - s * stride / 2,
                base + leg,
                neck - 0.05,
                0.045,
                PERSON,
                shirt,
                **kw,
            )
        )
    out.append(
        ellipsoid((x, neck + head, z), (head, head * 1.1, head), PERSON, _pick(rng, _SKIN, 0.03), **kw)
    )
    return out


def _sidewalk(
    rng: np.random.Generator,
    side: int,
    rw: float,
    sw: float,
    kerb: float,
    z0: float,
    z1: float,
    taken: list[tuple[int, float]],
    ids: Iterator[int],
) -> list[Primitive]:
    """Trees and poles near the kerb, people anywhere on the sidewalk of one side."""
    out: list[Primitive] = []
    if rng.random() < 0.7:
        for z in np.arange(z0 + rng.uniform(0, 10), z1, rng.uniform(7, 18)):
            out += _tree(rng, side * (rw + rng.uniform(0.6, min(1.2, sw - 0.3))), float(z), kerb)
            taken.append((side, float(z)))
    for z in np.arange(z0 + rng.uniform(0, 15), z1, rng.uniform(12, 35)):
        if any(s == side and abs(z - zt) < 1.5 for s, zt in taken):
            continue
        out += _pole(rng, side, side * (rw + rng.uniform(0.3, 0.6)), float(z), kerb)
    for _ in range(rng.poisson(rng.uniform(0, 6))):
        z = rng.uniform(z0 + 3, z1)
        if not any(s == side and abs(z - zt) < 0.8 for s, zt in taken):
            out += _person(rng, side * (rw + rng.uniform(0.5, max(0.6, sw - 0.4))), float(z), kerb, next(ids))
    return out


def _traffic(
    rng: np.random.Generator,
    lanes_x: list[float],
    ego_x: float,
    z0: float,
    z1: float,
    ego_lane_clear: bool,
    ids: Iterator[int],
) -> list[Primitive]:
    """Moving cars in the driving lanes; the ego lane stays clear for 7 m ahead of and 6 m behind z = 0."""
    out: list[Primitive] = []
    for lx in lanes_x:
        ego = abs(lx - ego_x) < 0.5
        if ego and ego_lane_clear:
            continue
        z = z0 + rng.uniform(0, 30)
        while z < z1:
            if not (ego and -6 < z < 12) and rng.random() < 0.6:
                out += _car(rng, lx + rng.uniform(-0.3, 0.3), float(z), next(ids))
            z += rng.uniform(7, 35)
    return out


def _parked(
    rng: np.random.Generator, side: int, x_edge: float, z0: float, z1: float, ids: Iterator[int]
) -> list[Primitive]:
    """A row of cars parked along the kerb at |x| = x_edge."""
    out: list[Primitive] = []
    z = z0 + rng.uniform(0, 5)
    while z < z1:
        if rng.random() < 0.65:
            out += _car(rng, side * (x_edge - rng.uniform(1.0, 1.2)), float(z), next(ids))
        z += rng.uniform(5.0, 9.0)
    return out


def sample_lighting(rng: np.random.Generator) -> Lighting:
    """Sunny or overcast, random sun direction, sky colours, fog, exposure and noise level."""
    elev, azim = np.radians(rng.uniform(15, 70)), rng.uniform(0, 2 * np.pi)
    sun = (np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim))
    overcast = rng.random() < 0.25
    warm = rng.uniform(0, 0.15)
    zenith = (
        (0.55, 0.57, 0.6)
        if overcast
        else (rng.uniform(0.15, 0.4), rng.uniform(0.35, 0.55), rng.uniform(0.7, 0.95))
    )
    horizon = tuple(float(min(1.0, 0.45 * c + 0.5 + warm * (i == 0))) for i, c in enumerate(zenith))
    amb = rng.uniform(0.6, 0.8) if overcast else rng.uniform(0.25, 0.45)
    return Lighting(
        sun_dir=tuple(float(v) for v in sun),
        sun_color=(0.0, 0.0, 0.0) if overcast else (1.0, 0.95 - warm / 2, 0.88 - warm),
        ambient=(amb * 0.95, amb, amb * 1.08),
        sky_horizon=horizon,
        sky_zenith=tuple(float(v) for v in zenith),
        fog_distance=float(rng.uniform(120, 600)),
        exposure=float(rng.uniform(0.8, 1.25)),
        noise_std=float(rng.uniform(0.003, 0.025)),
    )


def sample_scene(
    rng: np.random.Generator, length: float = 160.0, start: float = -30.0, ego_lane_clear: bool = False
) -> Scene:
    """Random street from z = ``start`` to ``length``: road, sidewalks, facades, trees, poles, cars, people."""
    lanes, lane_w = int(rng.integers(2, 5)), rng.uniform(2.9, 3.6)
    park = rng.uniform(2.0, 2.5) if rng.random() < 0.6 else 0.0
    rw = lanes * lane_w / 2 + park
    sw, kerb = rng.uniform(2.0, 5.0), rng.uniform(0.1, 0.2)
    lanes_x = [-lanes * lane_w / 2 + (i + 0.5) * lane_w for i in range(lanes)]
    ego_x = lanes_x[int(rng.integers(lanes // 2, lanes))]  # drive on the right half of the road
    paving = _pick(rng, ((0.62, 0.6, 0.56), (0.55, 0.4, 0.35), (0.7, 0.68, 0.62), (0.45, 0.45, 0.47)))
    prims: list[Primitive] = []
    ids = count(1)  # object ids in sampling order
    for side in (-1, 1):
        xs = sorted((side * rw, side * (rw + sw + 60)))
        prims.append(
            box(
                (xs[0], 0.0, start),
                (xs[1], kerb, length),
                SIDEWALK,
                paving,
                material=PAVING,
                color2=tuple(0.8 * c for c in paving),
                param=(rng.uniform(0.3, 0.8), 0, 0, 0),
                casts_shadow=False,
            )
        )
        taken: list[tuple[int, float]] = []
        prims += _sidewalk(rng, side, rw, sw, kerb, start, length, taken, ids)
        prims += _buildings(rng, side, rw + sw, start, length)
        if park:
            prims += _parked(rng, side, rw, start, length, ids)
    prims += _traffic(rng, lanes_x, ego_x, start, length, ego_lane_clear, ids)
    for _ in range(rng.poisson(0.4)):  # someone crossing the road
        prims += _person(rng, rng.uniform(-rw + 0.5, rw - 0.5), rng.uniform(8, 40), 0.0, next(ids))
    return Scene.build(
        prims,
        road_half_width=rw,
        sidewalk_width=sw,
        kerb_height=kerb,
        lane_width=lane_w,
        lanes=lanes,
        parking_width=park,
        ego_x=ego_x,
        z_range=(start, length),
        markings=rng.random() < 0.9,
        asphalt=_pick(rng, ((0.3, 0.3, 0.31), (0.4, 0.4, 0.4), (0.25, 0.24, 0.26)), 0.03),
        ground_paving=paving,
        lighting=sample_lighting(rng),
    )
