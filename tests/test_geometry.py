"""Back-projection, gravity alignment, point clouds and PLY/NPZ files, checked analytically and on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.scene3d.geometry import (
    CameraPose,
    PointCloud,
    backproject,
    fit_plane,
    gravity_rotation,
    intrinsics_from_fov,
    pose_from_ground_plane,
    read_ply,
    save_npz,
    semantic_point_cloud,
    to_ground_frame,
    voxel_downsample,
    write_ply,
)
from densemtl.synth.raycast import Camera

NYU = Path(__file__).resolve().parents[2] / "shared" / "data" / "nyu_samples"
NYU_K = (518.8579, 519.4696, 325.5824, 253.7362)
NYU_FLOOR = 1  # 0-based id of "floor" in the 40-class NYUD labels (class 2 of 40 in 1-based lists)
K = (60.0, 62.0, 31.5, 23.5)


def plane_depth(normal: np.ndarray, d: float, k: tuple, size: tuple[int, int]) -> np.ndarray:
    """Depth of the plane n . p = d seen through each pixel centre (ray (x', y', 1) hits at t = d / n.r)."""
    fx, fy, cx, cy = k
    v, u = np.mgrid[: size[0], : size[1]].astype(np.float64)
    rays = np.stack([(u - cx) / fx, (v - cy) / fy, np.ones_like(u)], axis=-1)
    return (d / (rays @ normal)).astype(np.float32)


def test_fronto_parallel_plane_backprojects_to_its_distance():
    pts = backproject(np.full((48, 64), 7.5, np.float32), K)
    assert pts.shape == (48, 64, 3)
    np.testing.assert_allclose(pts[..., 2], 7.5)
    # the principal point's ray is the optical axis; one pixel right moves x by z / fx
    np.testing.assert_allclose(pts[23, 32, 0] - pts[23, 31, 0], 7.5 / K[0], rtol=1e-5)


def test_tilted_plane_backprojects_onto_that_plane():
    n = np.array([0.2, -0.6, 0.77])
    n /= np.linalg.norm(n)
    depth = plane_depth(n, 4.0, K, (48, 64))
    assert (depth > 0).all()
    pts = backproject(depth, K).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(pts @ n, 4.0, atol=1e-4)


def test_invalid_depth_gives_no_points():
    depth = np.full((8, 8), 3.0, np.float32)
    depth[0, :3] = [0.0, np.nan, np.inf]
    cloud = semantic_point_cloud(depth, K)
    assert len(cloud) == 64 - 3


def test_intrinsics_from_fov_edge_rays_span_the_field_of_view():
    fx, fy, cx, cy = intrinsics_from_fov((48, 64), 90.0)
    assert fx == fy and cx == 31.5 and cy == 23.5
    # the image's left edge (u = -0.5) and right edge (u = 63.5) make 45 degrees with the axis
    assert np.degrees(np.arctan((63.5 - cx) / fx)) == pytest.approx(45.0)
    with pytest.raises(ValueError, match="field of view"):
        intrinsics_from_fov((48, 64), 190.0)


@pytest.mark.parametrize("pitch,roll", [(0.0, 0.0), (4.0, -2.0), (-3.0, 7.5)])
def test_gravity_rotation_matches_the_renderer_camera(pitch, roll):
    cam = Camera(50, 50, 10, 10, pitch_deg=pitch, roll_deg=roll)
    np.testing.assert_allclose(gravity_rotation(pitch, roll), cam.rotation(), atol=1e-12)


@pytest.mark.parametrize("pose", [CameraPose(1.5, 3.0, -2.0), CameraPose(0.9, -4.0, 6.0)])
def test_pose_from_ground_plane_inverts_to_ground_frame(pose):
    rng = np.random.default_rng(0)
    ground = np.stack([rng.uniform(-5, 5, 500), np.zeros(500), rng.uniform(2, 30, 500)], axis=1)
    r = pose.rotation()
    cam = (ground - [0.0, pose.height, 0.0]) @ r  # camera = R^T (ground - t), row-vector form
    normal, offset, resid = fit_plane(cam)
    assert np.abs(resid).max() < 1e-9
    est = pose_from_ground_plane(normal, offset)
    assert est.height == pytest.approx(pose.height, abs=1e-9)
    assert est.pitch_deg == pytest.approx(pose.pitch_deg, abs=1e-7)
    assert est.roll_deg == pytest.approx(pose.roll_deg, abs=1e-7)
    np.testing.assert_allclose(to_ground_frame(cam, est), ground, atol=1e-4)


def test_max_range_and_voxel_downsampling():
    depth = np.array([[1.0, 1.0, 50.0]], np.float32)
    labels = np.array([[3, 3, 4]], np.uint8)
    cloud = semantic_point_cloud(depth, (1000.0, 1000.0, 1.0, 0.0), semseg=labels, max_range=10.0)
    assert len(cloud) == 2 and set(cloud.label) == {3}
    xyz = np.array([[0.01, 0, 0], [0.02, 0, 0], [0.03, 0, 0], [5.0, 0, 0]], np.float32)
    rgb = np.array([[0, 0, 0], [30, 30, 30], [60, 60, 60], [9, 9, 9]], np.uint8)
    conf = np.array([0.2, 0.4, 0.6, 1.0], np.float32)
    c = voxel_downsample(PointCloud(xyz, rgb, np.array([7, 2, 7, 1], np.uint8), conf), voxel=0.5)
    order = np.argsort(c.xyz[:, 0])
    np.testing.assert_allclose(c.xyz[order, 0], [0.02, 5.0], rtol=1e-6)
    np.testing.assert_array_equal(c.label[order], [7, 1])  # the majority label of the first voxel
    np.testing.assert_array_equal(c.rgb[order, 0], [30, 9])
    np.testing.assert_allclose(c.confidence[order], [0.4, 1.0], rtol=1e-6)


@pytest.mark.parametrize("with_conf", [True, False])
def test_ply_and_npz_round_trip(tmp_path, with_conf):
    rng = np.random.default_rng(1)
    n = 123
    cloud = PointCloud(
        rng.normal(size=(n, 3)).astype(np.float32),
        rng.integers(0, 256, (n, 3), dtype=np.uint8),
        rng.integers(0, 8, n, dtype=np.uint8),
        rng.random(n, dtype=np.float32) if with_conf else None,
        "ground",
    )
    path = write_ply(tmp_path / "c.ply", cloud)
    header = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in header and f"element vertex {n}" in header
    data = read_ply(path)
    assert set(data) == {"x", "y", "z", "red", "green", "blue", "label"} | (
        {"confidence"} if with_conf else set()
    )
    np.testing.assert_array_equal(np.stack([data["x"], data["y"], data["z"]], 1), cloud.xyz)
    np.testing.assert_array_equal(np.stack([data["red"], data["green"], data["blue"]], 1), cloud.rgb)
    np.testing.assert_array_equal(data["label"], cloud.label)
    if with_conf:
        np.testing.assert_array_equal(data["confidence"], cloud.confidence)
    z = np.load(save_npz(tmp_path / "c.npz", cloud, intrinsics=np.array(K)))
    np.testing.assert_array_equal(z["xyz"], cloud.xyz)
    assert str(z["frame"]) == "ground" and z["intrinsics"].tolist() == list(K)


def test_synthetic_ground_points_are_flat():
    from densemtl.synth import scene as sc
    from densemtl.synth.render import render
    from densemtl.synth.streets import sample_scene

    scene = sample_scene(np.random.default_rng(3), ego_lane_clear=True)
    cam = Camera(40.0, 40.0, 39.5, 23.5, position=(scene.ego_x, 1.4, 0.0), pitch_deg=3.0, roll_deg=-1.5)
    out = render(scene, cam, (48, 80), shadows=False)
    meta = out["meta"]
    pose = CameraPose(meta["camera_height"], meta["pitch_deg"], meta["roll_deg"])
    cloud = semantic_point_cloud(out["depth"], tuple(meta["intrinsics"]), semseg=out["semseg"], pose=pose)
    road = cloud.xyz[cloud.label == sc.ROAD]
    assert len(road) > 200
    np.testing.assert_allclose(road[:, 1], 0.0, atol=2e-4 * road[:, 2].max())  # float32 rounding only
    np.testing.assert_array_less(np.abs(road[:, 0] + scene.ego_x), scene.road_half_width + 1e-3)


@pytest.mark.skipif(not NYU.is_dir(), reason="shared NYU samples not available")
@pytest.mark.parametrize("frame", ["000433", "000464"])
def test_nyu_floor_points_fit_a_plane(frame):
    depth = np.asarray(Image.open(NYU / f"depth_gt_{frame}.png")).astype(np.float32) / 5000.0
    labels = np.asarray(Image.open(NYU / f"segm_gt_{frame}.png"))
    cloud = semantic_point_cloud(depth, NYU_K, semseg=labels)
    floor = cloud.xyz[cloud.label == NYU_FLOOR].astype(np.float64)
    assert len(floor) > 10000
    normal, offset, resid = fit_plane(floor)
    assert np.median(np.abs(resid)) < 0.02 and np.percentile(np.abs(resid), 95) < 0.06
    pose = pose_from_ground_plane(normal, offset)
    assert 0.5 < pose.height < 2.0  # a hand-held Kinect, not the floor of another storey
    walls = cloud.xyz[cloud.label == 0]  # "wall" is vertical: its points do not fit the floor plane
    assert np.median(np.abs(walls @ normal - offset)) > 0.3
