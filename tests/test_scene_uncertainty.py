"""Depth uncertainty in 3-D (issue #14): confident points only, per-point depth std in the cloud and its files,
a BEV depth-confidence layer, and ``--max-rel-std``. Without ``depth_std`` everything is as before."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from densemtl.cli import build_parser
from densemtl.predict_commands import scene_options
from densemtl.scene3d.bev import (
    DEFAULT_MAX_REL_STD,
    LAYERS,
    BevGrid,
    SceneOptions,
    bev_map,
    depth_confidence,
    save_bev,
    scene_of,
    write_scene_outputs,
)
from densemtl.scene3d.geometry import (
    CameraPose,
    PointCloud,
    camera_depth,
    read_ply,
    to_ground_frame,
    voxel_downsample,
    write_ply,
)

GRID = BevGrid(x_range=(-4.0, 4.0), z_range=(0.0, 8.0), cell=1.0, min_points=1)
POSE = CameraPose(1.5, 0.0, 0.0)
K = (40.0, 40.0, 23.5, 15.5)
OLD_BEV_KEYS = {"occupancy", "class", "height", "drivable", "free", "observed"}
OLD_PLY = {"x", "y", "z", "red", "green", "blue", "label", "confidence"}
OLD_NPZ = {
    "xyz",
    "rgb",
    "label",
    "confidence",
    "frame",
    "intrinsics",
    "camera_height",
    "pitch_deg",
    "roll_deg",
}
LN_1_1 = math.log(1.1)


def wall(rel_std: np.ndarray, depth: float = 4.0) -> dict[str, np.ndarray]:
    """A fronto-parallel wall ``depth`` metres ahead, labelled road, with relative depth std ``rel_std``."""
    shape = rel_std.shape
    pred = {"depth": np.full(shape, depth, np.float32), "semseg": np.zeros(shape, np.uint8)}
    pred["confidence"] = np.full(shape, 0.9, np.float32)
    pred["depth_std"] = (rel_std * depth).astype(np.float32)
    return pred


# ------------------------------------------------------------------------------------------------ filtering
def test_points_over_the_relative_std_limit_are_dropped_and_the_rest_kept():
    rel = np.full((4, 6), 0.05, np.float32)
    rel[0, :] = 0.5  # 6 uncertain pixels
    rel[1, 0] = 0.25  # exactly at the limit: kept ("exceeds" drops)
    rel[1, 1] = 0.2500001
    rel[2, 2] = np.nan  # unknown std: dropped by any limit
    pred = wall(rel)
    opts = SceneOptions(bev=True, intrinsics=K, pose=POSE, grid=GRID, max_rel_std=0.25)
    cloud = scene_of(np.zeros((4, 6, 3), np.uint8), pred, {}, opts, {}).cloud
    assert len(cloud) == 24 - 6 - 1 - 1 == 16
    keep = ~(rel > 0.25) & np.isfinite(rel)
    np.testing.assert_allclose(cloud.depth_std, pred["depth_std"][keep])
    np.testing.assert_allclose(camera_depth(cloud.xyz, POSE), 4.0, rtol=1e-6)
    # 0 keeps every point, and still carries the std (nan included)
    every = scene_of(
        np.zeros((4, 6, 3), np.uint8), pred, {}, SceneOptions(pose=POSE, intrinsics=K, max_rel_std=0), {}
    )
    assert len(every.cloud) == 24 and np.isnan(every.cloud.depth_std).sum() == 1


def flat_road(pose: CameraPose, size: tuple[int, int] = (32, 48)) -> np.ndarray:
    """Depth (H, W) of the ground y = 0 seen by a camera at ``pose``; 0 above the horizon or beyond 30 m."""
    fx, fy, cx, cy = K
    v, u = np.mgrid[: size[0], : size[1]].astype(np.float64)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], -1)
    up = pose.rotation()[1]  # ground y of camera point c is up . c + h
    t = -pose.height / (rays @ up)
    return np.where((t > 0) & (t < 30), t, 0).astype(np.float32)


def test_the_ground_plane_is_fitted_to_the_confident_points_only():
    true = CameraPose(1.5, 6.0, -2.0)
    depth = flat_road(true)
    road = depth > 0
    rel = np.full(depth.shape, 0.02, np.float32)
    bad = road & (np.arange(depth.shape[1]) < 24)[None, :] & (depth < 8)  # the near-left road: far too deep
    rel[bad] = 0.6
    pred = {"depth": np.where(bad, depth * 1.4, depth).astype(np.float32), "semseg": np.where(road, 0, 7)}
    pred["semseg"] = pred["semseg"].astype(np.uint8)
    pred["depth_std"] = rel * pred["depth"]
    info = {"classes": ["road", "x", "x", "x", "x", "x", "x", "sky"]}
    rgb = np.zeros((*depth.shape, 3), np.uint8)
    fitted = scene_of(rgb, pred, info, SceneOptions(intrinsics=K, max_rel_std=0.15), {}).pose
    assert fitted.height == pytest.approx(1.5, abs=1e-3)
    assert fitted.pitch_deg == pytest.approx(6.0, abs=0.05) and fitted.roll_deg == pytest.approx(
        -2.0, abs=0.05
    )
    blind = scene_of(rgb, pred, info, SceneOptions(intrinsics=K, max_rel_std=0.0), {}).pose
    assert abs(blind.height - 1.5) > 0.2  # unfiltered, the too-deep points pull the plane (1.83 m)


def test_without_depth_std_the_outputs_are_those_of_before(tmp_path):
    rel = np.full((4, 6), 0.5, np.float32)  # would all be dropped, but the model has no uncertainty
    pred = wall(rel)
    del pred["depth_std"]
    opts = SceneOptions(pointcloud=True, bev=True, intrinsics=K, pose=POSE, grid=GRID, voxel=None)
    scene = scene_of(np.zeros((4, 6, 3), np.uint8), pred, {}, opts, {})
    assert len(scene.cloud) == 24 and scene.cloud.depth_std is None
    assert set(bev_map(scene.cloud, GRID, pose=POSE)) == OLD_BEV_KEYS
    files = write_scene_outputs(tmp_path, "x", None, np.zeros((4, 6, 3), np.uint8), pred, {}, opts)
    assert set(files) == {"ply", "npz", "bev", "bev_npy"}
    assert set(read_ply(files["ply"])) == OLD_PLY and set(np.load(files["npz"])) == OLD_NPZ
    assert np.load(files["bev_npy"]).shape == (len(LAYERS), *GRID.shape)
    # with a zero std the same points and the same five layers come out, plus the std and confidence
    pred["depth_std"] = np.zeros((4, 6), np.float32)
    sure = write_scene_outputs(tmp_path, "y", None, np.zeros((4, 6, 3), np.uint8), pred, {}, opts)
    np.testing.assert_array_equal(read_ply(sure["ply"])["x"], read_ply(files["ply"])["x"])
    stack, before = np.load(sure["bev_npy"]), np.load(files["bev_npy"])
    np.testing.assert_array_equal(stack[: len(LAYERS)], before)


# ------------------------------------------------------------------------------------- the cloud and its files
def test_camera_depth_inverts_the_ground_frame():
    pts = np.array([[0.5, -0.2, 3.0], [-2.0, 1.0, 11.0]], np.float32)
    pose = CameraPose(1.3, 4.0, -2.5)
    np.testing.assert_allclose(camera_depth(to_ground_frame(pts, pose), pose), [3.0, 11.0], rtol=1e-5)
    shifted = to_ground_frame(pts, pose) + np.array([2.0, 0.0, -1.0], np.float32)
    np.testing.assert_allclose(camera_depth(shifted, pose, (2.0, -1.0)), [3.0, 11.0], rtol=1e-5)


def test_voxel_downsample_takes_the_root_mean_square_of_the_stds():
    xyz = np.array([[0.1, 0, 0], [0.2, 0, 0], [5.0, 0, 0]], np.float32)
    cloud = PointCloud(xyz, np.zeros((3, 3), np.uint8), np.zeros(3, np.uint8), None, "camera",
                       np.array([0.3, 0.4, 0.1], np.float32))  # fmt: skip
    small = voxel_downsample(cloud, 0.5)
    order = np.argsort(small.xyz[:, 0])
    np.testing.assert_allclose(small.depth_std[order], [math.sqrt((0.09 + 0.16) / 2), 0.1], rtol=1e-6)
    np.testing.assert_allclose(cloud.select(np.array([False, True, True])).depth_std, [0.4, 0.1])


@pytest.mark.parametrize("with_conf", [True, False])
def test_ply_and_npz_carry_the_depth_std(tmp_path, with_conf):
    rng = np.random.default_rng(2)
    n = 17
    cloud = PointCloud(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 256, (n, 3), dtype=np.uint8),
                       rng.integers(0, 8, n, dtype=np.uint8), rng.random(n, dtype=np.float32) if with_conf else None,
                       "ground", rng.random(n, dtype=np.float32))  # fmt: skip
    data = read_ply(write_ply(tmp_path / "c.ply", cloud))
    assert "depth_std" in data and ("confidence" in data) == with_conf
    np.testing.assert_array_equal(data["depth_std"], cloud.depth_std)
    np.testing.assert_array_equal(data["x"], cloud.xyz[:, 0])
    if with_conf:
        np.testing.assert_array_equal(data["confidence"], cloud.confidence)


def test_written_files_with_uncertainty(tmp_path):
    rel = np.full((4, 6), 0.05, np.float32)
    rel[0] = 0.3
    opts = SceneOptions(
        pointcloud=True, bev=True, intrinsics=K, pose=POSE, grid=GRID, voxel=None, max_rel_std=0.2
    )
    pred = wall(rel)
    files = write_scene_outputs(tmp_path, "x", None, np.zeros((4, 6, 3), np.uint8), pred, {}, opts)
    assert set(files) == {"ply", "npz", "bev", "bev_npy", "bev_confidence"}
    np.testing.assert_allclose(read_ply(files["ply"])["depth_std"], 0.2)  # 18 kept points at 5 % of 4 m
    z = np.load(files["npz"])
    assert set(z) == OLD_NPZ | {"depth_std", "max_rel_std"} and len(z["depth_std"]) == 18
    assert float(z["max_rel_std"]) == 0.2
    stack = np.load(files["bev_npy"])
    assert stack.shape == (len(LAYERS) + 1, *GRID.shape)
    seen = stack[LAYERS.index("class")] != 255  # the cells the points landed in
    assert seen.any() and (np.isfinite(stack[-1]) == seen).all()
    np.testing.assert_allclose(stack[-1][seen], math.erf(LN_1_1 / (0.05 * math.sqrt(2))), rtol=1e-5)
    assert np.asarray(Image.open(files["bev_confidence"])).shape == (*GRID.shape, 3)


# --------------------------------------------------------------------------------------------- BEV confidence
def test_depth_confidence_is_the_probability_of_a_10_percent_error():
    s = np.array([0.0, 0.05, 0.1, np.nan, -0.1])
    p = depth_confidence(s)
    expected = [1.0, math.erf(LN_1_1 / (0.05 * math.sqrt(2))), math.erf(LN_1_1 / (0.1 * math.sqrt(2)))]
    np.testing.assert_allclose(p[:3], expected, rtol=1e-6)
    assert 0.94 < p[1] < 0.95 and 0.65 < p[2] < 0.67 and np.isnan(p[3:]).all()


def test_bev_confidence_of_a_cell_is_the_mean_of_its_points(tmp_path):
    # pitch 0: camera depth = ground z. Cell A (x 0..1, z 5..6): s = 0.05 and 0.1; cell B (x -2..-1, z 2..3):
    # s = 0 and one nan std (ignored); cell C (x 3..4, z 7..8) only an obstacle at s = 0.2
    xyz = np.array([[0.5, 0.0, 5.2], [0.6, 0.1, 5.8], [-1.5, 0.0, 2.5], [-1.4, 0.0, 2.6], [3.5, 1.0, 7.5]])
    std = np.array([0.05 * 5.2, 0.1 * 5.8, 0.0, np.nan, 0.2 * 7.5], np.float32)
    n = len(xyz)
    cloud = PointCloud(xyz.astype(np.float32), np.zeros((n, 3), np.uint8), np.zeros(n, np.uint8), None, "ground",
                       std)  # fmt: skip
    bev = bev_map(cloud, GRID, pose=POSE)
    conf = bev["confidence"]
    p = [math.erf(LN_1_1 / (s * math.sqrt(2))) for s in (0.05, 0.1, 0.2)]
    row, col, _ = GRID.cell_of(xyz[:, 0], xyz[:, 2])
    assert conf.dtype == np.float32 and conf.shape == GRID.shape
    assert conf[row[0], col[0]] == pytest.approx((p[0] + p[1]) / 2, rel=1e-5)
    assert conf[row[2], col[2]] == pytest.approx(1.0)
    assert conf[row[4], col[4]] == pytest.approx(p[2], rel=1e-5)
    assert np.isnan(conf).sum() == conf.size - 3
    np.testing.assert_array_equal(np.isfinite(conf), bev["observed"])
    with pytest.raises(ValueError, match="pose="):
        bev_map(cloud, GRID)
    files = save_bev(tmp_path / "m", bev, [[0, 0, 0]], GRID)
    np.testing.assert_array_equal(np.load(files["bev_npy"])[-1], conf)


# ------------------------------------------------------------------------------------------------ the flag
@pytest.mark.parametrize(
    "command", [["predict", "x.png", "--out", "o"], ["video", "clip.mp4", "--out", "o.mp4"]]
)
def test_max_rel_std_flag(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [command[0], "--checkpoint", "m.pt", *command[1:]]
    parser = build_parser()
    assert parser.parse_args(argv).max_rel_std == DEFAULT_MAX_REL_STD == 0.4  # chosen by benchmarks/uncertainty.py
    args = parser.parse_args([*argv, "--max-rel-std", "0.3", "--hfov", "60"])
    assert scene_options(args).max_rel_std == 0.3
    assert scene_options(parser.parse_args([*argv, "--max-rel-std", "0", "--hfov", "60"])).max_rel_std == 0
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*argv, "--max-rel-std", "-0.1"])
    assert e.value.code == 2 and "--max-rel-std" in capsys.readouterr().err


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_scene_options_refuse_a_bad_limit(value):
    with pytest.raises(ValueError, match="--max-rel-std"):
        SceneOptions(max_rel_std=value)
