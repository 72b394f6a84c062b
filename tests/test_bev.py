"""Bird's-eye-view maps: boxes land in the right cells, free space stops at obstacles, files, synthetic GT."""

from __future__ import annotations

import numpy as np
from PIL import Image

from densemtl.scene3d.bev import (
    LAYERS,
    BevGrid,
    SceneOptions,
    bev_map,
    drivable_ids,
    save_bev,
    write_scene_outputs,
)
from densemtl.scene3d.geometry import CameraPose, PointCloud, semantic_point_cloud

GRID = BevGrid(x_range=(-4.0, 4.0), z_range=(0.0, 16.0), cell=0.5, min_points=1)
ROAD, SIDEWALK, CAR = 0, 1, 5
PALETTE = np.array(
    [[128, 64, 128], [244, 35, 232], [70, 70, 70], [0, 0, 0], [1, 1, 1], [0, 0, 142]], np.uint8
)


def ground_points(spacing: float = 0.1, road_half: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A dense flat ground over the grid: road for |x| < road_half, sidewalk outside."""
    x, z = np.meshgrid(np.arange(-4, 4, spacing) + spacing / 2, np.arange(0, 16, spacing) + spacing / 2)
    pts = np.stack([x.ravel(), np.zeros(x.size), z.ravel()], 1)
    return pts, np.where(np.abs(pts[:, 0]) < road_half, ROAD, SIDEWALK)


def box_points(lo: tuple, hi: tuple, spacing: float = 0.05) -> np.ndarray:
    axes = [np.arange(a, b + 1e-9, spacing) for a, b in zip(lo, hi, strict=True)]
    return np.stack(np.meshgrid(*axes), -1).reshape(-1, 3)


def cloud_of(*parts: tuple[np.ndarray, np.ndarray]) -> PointCloud:
    xyz = np.concatenate([p for p, _ in parts]).astype(np.float32)
    label = np.concatenate([np.broadcast_to(lab, len(p)) for p, lab in parts]).astype(np.uint8)
    return PointCloud(xyz, np.zeros((len(xyz), 3), np.uint8), label, None, "ground")


def cells_of(bev_layer: np.ndarray) -> set[tuple[float, float]]:
    """Cell-centre (x, z) of the true cells."""
    x, z = GRID.centres()
    return {(float(a), float(b)) for a, b in zip(x[bev_layer], z[bev_layer], strict=True)}


def test_box_of_known_size_lands_in_the_right_cells():
    box = box_points(
        (1.05, 0.0, 8.05), (1.95, 1.4, 9.45)
    )  # 1 m x 1.5 m footprint, inside cells x 1-2, z 8-9.5
    bev = bev_map(cloud_of(ground_points(), (box, CAR)), GRID, drivable=(ROAD,))
    expected = {(x, z) for x in (1.25, 1.75) for z in (8.25, 8.75, 9.25)}
    assert cells_of(bev["occupancy"]) == expected
    assert (bev["class"][bev["occupancy"]] == CAR).all()
    np.testing.assert_allclose(bev["height"][bev["occupancy"]], 1.4, atol=1e-5)
    assert set(np.unique(bev["class"][~bev["occupancy"]])) == {ROAD, SIDEWALK}
    # drivable: road cells (|x| < 2) not under the box
    x, _ = GRID.centres()
    np.testing.assert_array_equal(bev["drivable"], (np.abs(x) < 2) & ~bev["occupancy"])


def test_low_kerbs_and_high_branches_are_not_obstacles():
    kerb = box_points((-3.0, 0.0, 4.0), (-2.5, 0.15, 6.0))
    branch = box_points((0.0, 3.0, 5.0), (1.0, 3.5, 6.0))
    bev = bev_map(cloud_of(ground_points(), (kerb, SIDEWALK), (branch, 3)), GRID)
    assert not bev["occupancy"].any()


def test_free_space_stops_at_the_first_obstacle():
    wall = box_points((-0.95, 0.0, 6.05), (0.95, 2.0, 6.2))  # cells x -1..1, z 6..6.5
    bev = bev_map(cloud_of(ground_points(), (wall, CAR)), GRID)
    x, z = GRID.centres()
    assert cells_of(bev["occupancy"]) == {(x, 6.25) for x in (-0.75, -0.25, 0.25, 0.75)}
    ahead = np.abs(x) < 0.3
    assert bev["free"][ahead & (z < 5.9)].all()
    assert not bev["free"][ahead & (z > 6.0)].any()  # behind the wall, along the same rays
    assert bev["free"][np.abs(x) > 1.1 * np.abs(z) / 6 + 0.5].all()  # outside the wall's shadow rays go on
    assert not (bev["free"] & bev["occupancy"]).any()


def test_free_space_needs_observations():
    pts, lab = ground_points()
    seen = pts[:, 2] < 8.0  # the camera saw the ground only up to 8 m
    bev = bev_map(cloud_of((pts[seen], lab[seen])), GRID)
    _, z = GRID.centres()
    assert bev["free"][z < 7.5].all() and not bev["free"][z > 8.0].any()


def test_ground_frame_required_and_files(tmp_path):
    pts, lab = ground_points()
    bad = PointCloud(pts.astype(np.float32), np.zeros((len(pts), 3), np.uint8), lab.astype(np.uint8))
    try:
        bev_map(bad, GRID)
        raise AssertionError("camera-frame clouds must be refused")
    except ValueError as e:
        assert "ground-frame" in str(e)
    bev = bev_map(cloud_of((pts, lab)), GRID, drivable=(ROAD,))
    files = save_bev(tmp_path / "x", bev, PALETTE, GRID)
    stack = np.load(files["bev_npy"])
    assert stack.shape == (len(LAYERS), *GRID.shape) == (5, 32, 16)
    np.testing.assert_array_equal(stack[LAYERS.index("drivable")].astype(bool), bev["drivable"])
    png = np.asarray(Image.open(files["bev"]))
    assert png.shape == (32, 16, 3)
    assert drivable_ids(["Road", "car", "floor"]) == (0, 2)


def test_synthetic_road_cells_agree_with_the_scene_layout(tmp_path):
    """Ground-truth depth + labels of a rendered street: BEV road cells lie on the scene's road strip."""
    from densemtl.synth.raycast import Camera
    from densemtl.synth.render import render
    from densemtl.synth.scene import CLASSES
    from densemtl.synth.scene import PALETTE as SCENE_PALETTE
    from densemtl.synth.streets import sample_scene

    scene = sample_scene(np.random.default_rng(5), ego_lane_clear=True)
    cam = Camera(60.0, 60.0, 63.5, 31.5, position=(scene.ego_x, 1.5, 0.0), pitch_deg=4.0, roll_deg=1.0)
    out = render(scene, cam, (64, 128), shadows=False)
    meta = out["meta"]
    pose = CameraPose(meta["camera_height"], meta["pitch_deg"], meta["roll_deg"])
    grid = BevGrid(x_range=(-12.0, 12.0), z_range=(0.0, 30.0), cell=0.5)
    cloud = semantic_point_cloud(out["depth"], tuple(meta["intrinsics"]), semseg=out["semseg"], pose=pose)
    bev = bev_map(cloud, grid, drivable_ids(CLASSES))
    x, _ = grid.centres()
    xw = x + scene.ego_x  # ground frame origin sits below the camera
    road = bev["class"] == CLASSES.index("road")
    assert road.sum() > 100
    assert (np.abs(xw[road]) <= scene.road_half_width + grid.cell / 2).all()
    surface = np.isin(cloud.label, [CLASSES.index("road"), CLASSES.index("sidewalk")])
    low = bev_map(cloud.select(surface & (cloud.xyz[:, 1] < grid.obstacle_min_height)), grid)  # ground seen
    inner = low["observed"] & (np.abs(xw) < scene.road_half_width - grid.cell)
    outer = low["observed"] & (np.abs(xw) > scene.road_half_width + grid.cell)
    assert inner.sum() > 100 and (low["class"][inner] == CLASSES.index("road")).all()
    assert outer.sum() > 10 and (low["class"][outer] == CLASSES.index("sidewalk")).all()
    # the same through the predict hook, with the sample's meta JSON beside the image (folder format)
    (tmp_path / "val" / "meta").mkdir(parents=True)
    (tmp_path / "val" / "meta" / "000000.json").write_text(__import__("json").dumps(meta))
    pred = {"semseg": out["semseg"], "depth": out["depth"]}
    opts = SceneOptions(pointcloud=True, bev=True, grid=grid, voxel=0.2)
    info = {"classes": list(CLASSES), "palette": np.array(SCENE_PALETTE).tolist()}  # as Predictor.info
    files = write_scene_outputs(
        tmp_path, "000000", tmp_path / "val/images/000000.png", out["image"], pred, info, opts
    )
    assert set(files) == {"ply", "npz", "bev", "bev_npy"}
    np.testing.assert_array_equal(np.load(files["bev_npy"])[1], bev["class"].astype(np.float32))


def test_scene_reads_depth_and_optional_labels_from_a_prediction(tmp_path):
    from densemtl.scene3d.bev import scene_of

    rgb = np.zeros((16, 32, 3), np.uint8)
    depth = np.full((16, 32), 5.0, np.float32)  # a wall 5 m ahead
    opts = SceneOptions(bev=True, hfov_deg=60.0, pose=CameraPose(1.5, 0.0, 0.0), grid=GRID)
    assert (
        write_scene_outputs(tmp_path, "x", None, rgb, {"semseg": np.zeros((16, 32), np.uint8)}, {}, opts)
        == {}
    )
    bare = scene_of(rgb, {"depth": depth}, {}, opts, {})
    assert len(bare.cloud) == 16 * 32 and (bare.cloud.label == 255).all() and bare.cloud.confidence is None
    pred = {"depth": depth, "semseg": np.full((16, 32), CAR, np.uint8), "confidence": np.full((16, 32), 0.7)}
    labelled = scene_of(rgb, pred, {"classes": ["road", "sidewalk"]}, opts, {})
    assert (labelled.cloud.label == CAR).all() and np.allclose(labelled.cloud.confidence, 0.7)
    assert labelled.drivable == (0,) and labelled.pose == opts.pose
    files = write_scene_outputs(tmp_path, "x", None, rgb, pred, {"palette": PALETTE.tolist()}, opts)
    assert set(files) == {"bev", "bev_npy"}
