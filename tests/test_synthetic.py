"""Synthetic street renderer: exact geometry, normals, shadows, determinism, on-disk round trip, plausibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.format import decode_depth, decode_normals, read_dataset_json
from densemtl.synth import scene as sc
from densemtl.synth.generate import generate_dataset
from densemtl.synth.raycast import Camera
from densemtl.synth.render import render, render_sample

SIZE = (64, 128)


def _camera(**pose) -> Camera:
    return Camera(fx=70.0, fy=70.0, cx=63.5, cy=31.5, **pose)


def _gray(label: int = sc.BUILDING) -> dict:
    return {"label": label, "color": (0.5, 0.5, 0.5)}


def test_flat_road_depth_is_exact_and_sky_is_invalid():
    h = 1.5
    out = render(sc.flat_scene(), _camera(position=(0.0, h, 0.0)), SIZE, shadows=False)
    v = np.arange(SIZE[0], dtype=np.float64)[:, None] * np.ones(SIZE[1])
    below = v > 31.5
    expected = h * 70.0 / (v - 31.5)
    valid = below & (expected <= 80.0)
    np.testing.assert_allclose(out["depth"][valid], expected[valid], rtol=1e-5)
    assert (out["depth"][below & ~valid] == 0).all()  # ground beyond 80 m: invalid depth, still road
    assert (out["semseg"][below] == sc.ROAD).all()
    assert (out["semseg"][~below] == sc.SKY).all()
    assert (out["depth"][~below] == 0).all()
    assert (out["normals"][~below] == 0).all()
    np.testing.assert_allclose(out["normals"][below], np.tile([0.0, -1.0, 0.0], (below.sum(), 1)), atol=1e-6)
    assert out["meta"]["intrinsics"] == [70.0, 70.0, 63.5, 31.5] and out["meta"]["camera_height"] == h


def test_wall_at_known_distance_and_nearest_hit_occlusion():
    wall = sc.box((-50.0, 0.0, 12.0), (50.0, 40.0, 13.0), **_gray())
    post = sc.box((-0.3, 0.0, 5.0), (0.3, 3.0, 5.5), **_gray(sc.POLE))  # in front of the wall
    out = render(sc.flat_scene(prims=[wall, post]), _camera(position=(0.0, 1.5, 0.0)), SIZE, shadows=False)
    seg, depth = out["semseg"], out["depth"]
    assert (seg == sc.BUILDING).sum() > 1000 and (seg == sc.SKY).sum() == 0
    np.testing.assert_allclose(depth[seg == sc.BUILDING], 12.0, rtol=1e-5)
    np.testing.assert_allclose(depth[seg == sc.POLE], 5.0, rtol=1e-5)
    assert seg[31, 63] == sc.POLE and seg[31, 10] == sc.BUILDING
    np.testing.assert_allclose(
        out["normals"][seg == sc.BUILDING], [[0.0, 0.0, -1.0]] * (seg == 2).sum(), atol=1e-6
    )
    road = seg == sc.ROAD
    assert road.any() and (depth[road] < 12.0).all()  # the wall hides the road behind it


def test_sphere_and_cylinder_are_exact():
    ball = sc.ellipsoid((0.0, 1.5, 10.0), (1.0, 1.0, 1.0), **_gray(sc.PERSON))
    pole = sc.cylinder(-4.0, 8.0, 0.0, 6.0, 0.25, **_gray(sc.POLE))
    cam = Camera(70.0, 70.0, 64.0, 32.0)
    out = render(sc.flat_scene(prims=[ball, pole]), cam, (65, 129), shadows=False)
    assert out["semseg"][32, 64] == sc.PERSON
    assert out["depth"][32, 64] == pytest.approx(9.0, rel=1e-5)  # centre ray meets the sphere 1 m early
    np.testing.assert_allclose(out["normals"][32, 64], [0.0, 0.0, -1.0], atol=1e-5)
    u = 64 + round(70.0 * -4.0 / 8.0)  # the pole axis projects to column 29 at 8 m
    assert out["semseg"][32, u] == sc.POLE
    axis = np.hypot(4.0, 8.0)  # the ray through the axis meets the surface 0.25 m before it
    assert out["depth"][32, u] == pytest.approx(8.0 * (axis - 0.25) / axis, rel=1e-5)
    person = out["semseg"] == sc.PERSON
    n = out["normals"][person]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    # sphere normals point back at the camera: (n . ray) < 0 everywhere on the visible cap
    assert (n[:, 2] < 0).all()


@pytest.mark.parametrize("pitch,roll,yaw", [(10.0, 0.0, 0.0), (4.0, -3.0, 7.0)])
def test_pose_rotates_normals_and_backprojects_to_the_ground(pitch: float, roll: float, yaw: float):
    cam = _camera(position=(0.7, 1.4, 3.0), pitch_deg=pitch, roll_deg=roll, yaw_deg=yaw)
    out = render(sc.flat_scene(), cam, SIZE, shadows=False)
    road = out["semseg"] == sc.ROAD
    r = np.array(out["meta"]["camera_to_world"])
    np.testing.assert_allclose(
        out["normals"][road], np.tile(r.T @ [0.0, 1.0, 0.0], (road.sum(), 1)), atol=1e-5
    )
    if roll == 0 and yaw == 0:
        p = np.radians(pitch)
        np.testing.assert_allclose(r.T @ [0.0, 1.0, 0.0], [0.0, -np.cos(p), -np.sin(p)], atol=1e-6)
    # back-project valid depth with the saved intrinsics and pose: every point lies on the ground plane y = 0
    fx, fy, cx, cy = out["meta"]["intrinsics"]
    v, u = np.nonzero(out["depth"] > 0)
    z = out["depth"][v, u].astype(np.float64)
    pts_cam = np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z])
    world = r @ pts_cam + np.array(out["meta"]["camera_position"])[:, None]
    np.testing.assert_allclose(world[1], 0.0, atol=2e-4 * z.max())


def test_shadow_of_a_wall_darkens_only_the_road_behind_it():
    wall = sc.box((-2.0, 0.0, 20.0), (2.0, 6.0, 21.0), **_gray())
    s = np.array([0.0, 1.0, 1.0]) / np.sqrt(2)  # sun 45 deg up straight ahead: the shadow falls towards us
    lighting = sc.Lighting(sun_dir=tuple(s), noise_std=0.0, fog_distance=1e6)
    scene = sc.flat_scene(prims=[wall], lighting=lighting)
    cam = _camera(position=(0.0, 8.0, 0.0), pitch_deg=25.0)
    lit = render(scene, cam, SIZE, shadows=False)["image"].astype(int).sum(-1)
    out = render(scene, cam, SIZE, shadows=True)
    shadowed = out["image"].astype(int).sum(-1)
    seg = out["semseg"]
    # which road pixels lie in the wall's shadow (in front of it, up to 6 m closer, |x| < 2)?
    r = np.array(out["meta"]["camera_to_world"])
    v, u = np.nonzero(seg == sc.ROAD)
    z = out["depth"][v, u]
    world = r @ np.stack([(u - 63.5) / 70 * z, (v - 31.5) / 70 * z, z]) + np.array([[0.0], [8.0], [0.0]])
    inside = (np.abs(world[0]) < 1.9) & (world[2] > 14.1) & (world[2] < 19.9)
    outside = (np.abs(world[0]) > 2.1) | (world[2] < 13.9)
    assert inside.sum() > 20
    assert (shadowed[v[inside], u[inside]] < lit[v[inside], u[inside]] - 20).all()
    np.testing.assert_array_equal(shadowed[v[outside], u[outside]], lit[v[outside], u[outside]])


def test_samples_are_plausible_and_cover_every_class():
    seen = np.zeros(256, dtype=bool)
    for i in range(8):
        s = render_sample(0, "train", i, SIZE)
        seg = s["semseg"]
        seen[np.unique(seg)] = True
        assert s["image"].dtype == np.uint8 and s["image"].shape == (*SIZE, 3) and s["image"].std() > 10
        rows = np.nonzero(seg == sc.ROAD)[0]
        assert rows.size > 0 and (rows >= SIZE[0] // 2 - 4).mean() > 0.95  # road in the lower half
        sky = np.nonzero(seg == sc.SKY)[0]
        assert (sky < SIZE[0] // 2).mean() > 0.8 and (sky < SIZE[0] * 3 // 4).all()  # sky in the upper part
        valid = s["depth"] > 0
        assert (s["depth"] <= 80).all() and valid.mean() > 0.3
        surface = seg != sc.SKY
        np.testing.assert_allclose(np.linalg.norm(s["normals"][surface], axis=-1), 1.0, atol=1e-4)
        assert (s["normals"][~surface] == 0).all() and (s["depth"][~surface] == 0).all()
    assert seen[: len(sc.CLASSES)].all(), f"missing classes {np.flatnonzero(~seen[:8])}"
    assert not seen[len(sc.CLASSES) :].any()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_is_deterministic_across_workers_and_round_trips(tmp_path: Path):
    size = (32, 64)
    kw = {"n_train": 3, "n_val": 2, "size": size, "progress": False}
    a = generate_dataset(tmp_path / "a", seed=7, workers=1, image_format="png", **kw)
    generate_dataset(tmp_path / "b", seed=7, workers=2, image_format="png", **kw)
    generate_dataset(tmp_path / "c", seed=8, workers=1, image_format="png", **kw)
    generate_dataset(tmp_path / "d", seed=7, workers=2, **kw)  # default: JPEG RGB
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(fa) == 1 + 5 * 7 and fa == fb  # image, meta, 3 tasks, instances, objects
    assert fa["train/images/000000.png"] != fc["train/images/000000.png"]
    fd = _files(tmp_path / "d")
    assert {k: v for k, v in fd.items() if "images" not in k and k != "dataset.json"} == {
        k: v for k, v in fa.items() if "images" not in k and k != "dataset.json"
    }
    jpg = np.array(Image.open(tmp_path / "d" / "val" / "images" / "000001.jpg")).astype(float)
    png = np.array(Image.open(tmp_path / "a" / "val" / "images" / "000001.png")).astype(float)
    assert np.abs(jpg - png).mean() < 4.0  # quality-95 JPEG: small, bounded error
    assert a["images"] == 5 and a["images_per_s"] > 0 and a["seconds"] > 0
    json.dumps(a)
    info = read_dataset_json(tmp_path / "a")
    assert info["tasks"] == ["semseg", "depth", "normals"] and info["classes"][7] == "sky"
    assert info["name"] == "synthetic-streets" and info["generator"]["seed"] == 7
    # read back with PIL: labels exact, depth within the 1/256 m quantisation, normals within uint8 precision
    ref = render_sample(7, "val", 1, size)
    root = tmp_path / "a" / "val"
    np.testing.assert_array_equal(np.array(Image.open(root / "images/000001.png")), ref["image"])
    np.testing.assert_array_equal(np.array(Image.open(root / "semseg/000001.png")), ref["semseg"])
    depth = decode_depth(np.array(Image.open(root / "depth/000001.png")))
    assert np.abs(depth - ref["depth"]).max() <= 0.5 / 256 + 1e-6
    assert ((depth == 0) == (ref["depth"] == 0)).all()
    normals = decode_normals(np.array(Image.open(root / "normals/000001.png")))
    assert np.abs(normals - ref["normals"]).max() < 0.02
    meta = json.loads((root / "meta/000001.json").read_text())
    assert meta["intrinsics"] == ref["meta"]["intrinsics"] and 1.2 <= meta["camera_height"] <= 1.8


def test_tile_culled_shadows_match_brute_force_shadow_rays():
    """Culling is exact: every caster tested against every pixel gives the same sun visibility."""
    from densemtl.synth.raycast import _INTERSECT, cast
    from densemtl.synth.render import sample_camera, sample_rng
    from densemtl.synth.shadows import sun_visibility
    from densemtl.synth.streets import sample_scene

    rng = sample_rng(3, "train", 0)
    scene = sample_scene(rng)
    cam = sample_camera(rng, scene, (61, 123))  # not a multiple of the tile size
    hits = cast(scene, cam, (61, 123))
    sun = (0.45, 0.6, -0.3)
    s = np.asarray(sun) / np.linalg.norm(sun)
    origin = hits.points + np.float32(2e-3) * hits.normals
    inv = tuple(1.0 / v for v in s)
    expected = np.ones(hits.t.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for i in np.flatnonzero(scene.casts_shadow):
            tn, tf = _INTERSECT[scene.kind[i]](scene.center[i], scene.half[i], origin, tuple(s), inv)
            expected &= ~((tn <= tf) & (tf > 0))
    surface = hits.index != -2
    assert (~expected & surface).sum() > 50  # the test scene has shadows
    np.testing.assert_array_equal(sun_visibility(scene, hits, cam, sun)[surface], expected[surface])
    where = surface & (hits.normals[1] > 0.5)
    lit = sun_visibility(scene, hits, cam, sun, where=where)
    np.testing.assert_array_equal(lit[where], expected[where])
    assert lit[~where].all()


def test_synth_to_files_to_folder_dataset_round_trip(tmp_path: Path):
    """What the renderer produced is what FolderDataset hands to training (labels exact, depth to 1/256 m)."""
    from densemtl.data.folder import FolderDataset

    size = (48, 96)
    generate_dataset(
        tmp_path, n_train=1, n_val=2, size=size, seed=3, workers=1, progress=False, image_format="png"
    )
    ds = FolderDataset(tmp_path, split="val", tasks=("semseg", "depth", "normals"))
    assert len(ds) == 2 and ds.class_names[0] == "road" and ds.num_classes == 8
    for i in range(2):
        ref = render_sample(3, "val", i, size)
        s = ds[i]
        np.testing.assert_array_equal(
            (s["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), ref["image"]
        )
        np.testing.assert_array_equal(s["semseg"].numpy(), ref["semseg"].astype(np.int64))
        depth = s["depth"][0].numpy()
        assert np.abs(depth - ref["depth"]).max() <= 0.5 / 256 + 1e-6
        assert ((depth == 0) == (ref["depth"] == 0)).all()
        assert np.abs(s["normals"].permute(1, 2, 0).numpy() - ref["normals"]).max() < 0.02
        np.testing.assert_allclose(s["intrinsics"].numpy(), ref["meta"]["intrinsics"], rtol=1e-6)
        assert all(bool(v) for v in s["valid_tasks"].values())
