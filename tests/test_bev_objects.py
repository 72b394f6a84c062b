"""Detected objects in the BEV: hand-computed footprints, rotation by yaw, the cells drawn, the JSON, no change
without the objects task."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from densemtl.scene3d.bev import BevGrid, SceneOptions, colorize_bev, scene_bev, scene_of, write_scene_outputs
from densemtl.scene3d.bev_layers import mark_camera
from densemtl.scene3d.bev_objects import (
    FILL_ALPHA,
    bev_objects,
    class_color,
    draw_bev_objects,
    object_corners_camera,
)
from densemtl.scene3d.geometry import CameraPose

K = (100.0, 100.0, 30.0, 20.0)  # fx, fy, cx, cy pixels
LEVEL = CameraPose(height=1.75)  # level camera 1.75 m up: ground = (x, 1.75 - y, z) of the camera frame
GRID = BevGrid(x_range=(-8.0, 8.0), z_range=(0.0, 16.0), cell=0.5)  # 32 x 32 cells
BG = (90, 90, 90)


def one_object(yaw: float = 0.0, cls: int = 0, **over: np.ndarray) -> dict[str, np.ndarray]:
    """A car whose box centre (edges 40.5..60.5, 20.5..40.5) is pixel centre (50, 30): at Z = 10 m its 3-D centre
    is X = (50 - 30) * 10 / 100 = 2 m, Y = (30 - 20) * 10 / 100 = 1 m; 4 m long, 2 m wide, 1.5 m high."""
    pred = {
        "objects_boxes": np.array([[40.5, 20.5, 60.5, 40.5]], np.float32),
        "objects_scores": np.array([0.9], np.float32),
        "objects_classes": np.array([cls], np.int32),
        "objects_distance": np.array([10.0], np.float32),
        "objects_size3d": np.array([[4.0, 2.0, 1.5]], np.float32),
        "objects_yaw": np.array([yaw], np.float32),
    }
    return pred | over


def background() -> np.ndarray:
    return mark_camera(np.full((*GRID.shape, 3), BG, np.uint8), GRID)


def changed(before: np.ndarray, after: np.ndarray) -> set[tuple[int, int]]:
    r, c = np.nonzero((before != after).any(-1))
    return set(zip(r.tolist(), c.tolist(), strict=True))


def block(rows: range, cols: range) -> set[tuple[int, int]]:
    return {(r, c) for r in rows for c in cols}


def test_footprint_corners_in_metres_are_the_hand_computed_ones():
    # yaw 0: heading +x, so the length runs along x (0..4 m) and the width along z (9..11 m); the bottom face is
    # h / 2 = 0.75 m below the centre (y down): y = 1.75 m, which is the ground for a camera 1.75 m up
    corners = object_corners_camera(one_object(), K)
    expected = [[4.0, 1.75, 11.0], [4.0, 1.75, 9.0], [0.0, 1.75, 9.0], [0.0, 1.75, 11.0]]  # FL, FR, RR, RL
    np.testing.assert_allclose(corners[0], expected, atol=1e-6)
    objs = bev_objects(one_object(), K, LEVEL, ["car", "person"])
    np.testing.assert_allclose(objs.corners_xz[0], [[4, 11], [4, 9], [0, 9], [0, 11]], atol=1e-6)
    np.testing.assert_allclose(objs.centre_xz[0], [2.0, 10.0], atol=1e-6)
    np.testing.assert_allclose([objs.yaw[0], objs.scores[0]], [0.0, 0.9], atol=1e-6)
    assert objs.classes.tolist() == [0] and objs.class_names == ("car", "person")


def test_yaw_quarter_turn_rotates_the_footprint_about_its_centre():
    # yaw pi/2: heading (cos, 0, -sin) = (0, 0, -1), towards the camera: the front edge is the near one, z = 8
    turned = object_corners_camera(one_object(yaw=math.pi / 2), K)[0]
    np.testing.assert_allclose(turned[:, [0, 2]], [[3, 8], [1, 8], [1, 12], [3, 12]], atol=1e-6)
    np.testing.assert_allclose(turned[:, 1], 1.75, atol=1e-6)
    straight = object_corners_camera(one_object(), K)[0]
    centre = np.array([2.0, 10.0])
    # rotating the yaw-0 footprint by 90 degrees about the centre in (x, z) gives the yaw-pi/2 one
    d = straight[:, [0, 2]] - centre
    np.testing.assert_allclose(centre + np.stack([d[:, 1], -d[:, 0]], 1), turned[:, [0, 2]], atol=1e-6)
    assert bev_objects(one_object(yaw=math.pi / 2), K, LEVEL).yaw[0] == pytest.approx(math.pi / 2)


def test_pitched_camera_keeps_the_heading_and_foreshortens_the_length_by_cos_pitch():
    # heading -pi/2 = straight away along camera z; a camera pitched 10 degrees down sees it tilted: in the ground
    # frame it still points along +z (yaw -pi/2) and its 4 m length covers 4 cos(10 deg) m of z
    objs = bev_objects(one_object(yaw=-math.pi / 2), K, CameraPose(1.75, pitch_deg=10.0))
    assert objs.yaw[0] == pytest.approx(-math.pi / 2)
    xz = objs.corners_xz[0]
    assert xz[0, 1] - xz[3, 1] == pytest.approx(4.0 * math.cos(math.radians(10.0)), abs=1e-6)
    assert xz[0, 0] - xz[3, 0] == pytest.approx(0.0, abs=1e-6)
    # heading pi/4, (cos, 0, -sin) = (0.707, 0, -0.707) in the camera: the pitch shrinks its z part by cos(10 deg)
    diagonal = bev_objects(one_object(yaw=math.pi / 4), K, CameraPose(1.75, pitch_deg=10.0)).yaw[0]
    assert diagonal == pytest.approx(math.atan(math.cos(math.radians(10.0))), abs=1e-6)  # 44.56, not 45 deg


def test_drawing_colours_the_footprint_cells_and_the_heading_tick_only():
    objs = bev_objects(one_object(cls=1), K, LEVEL)
    before = background()
    after = draw_bev_objects(before, objs.corners_xz, objs.classes, GRID)
    # footprint x 0..4 m -> columns 16..23, z 9..11 m -> rows 31 - 18 .. 31 - 21 = 13..10; the heading tick
    # leaves the front edge's midpoint (4, 10) along +x for 1 m (2 cells): row 31 - 20 = 11, columns 24, 25
    footprint = block(range(10, 14), range(16, 24))
    assert changed(before, after) == footprint | {(11, 24), (11, 25)}
    color = np.array(class_color(1))
    np.testing.assert_array_equal(after[10, 16], color)  # border: full colour
    np.testing.assert_array_equal(after[11, 25], color)  # tick
    blended = np.round((1 - FILL_ALPHA) * np.array(BG) + FILL_ALPHA * color)
    np.testing.assert_array_equal(after[11, 18], blended)  # interior: blended over the map
    assert not np.array_equal(class_color(0), class_color(1))


def test_drawn_footprint_turns_with_the_yaw():
    before = background()
    wide = changed(
        before, draw_bev_objects(before, bev_objects(one_object(), K, LEVEL).corners_xz, [0], GRID)
    )
    tall_objs = bev_objects(one_object(yaw=math.pi / 2), K, LEVEL)
    tall = changed(before, draw_bev_objects(before, tall_objs.corners_xz, [0], GRID))
    # yaw 0: 8 columns x 4 rows (+ tick to the right); yaw pi/2: x 1..3 m, z 8..12 m = columns 18..21, rows 8..15
    assert block(range(10, 14), range(16, 24)) <= wide and max(c for _, c in wide) == 25
    footprint = block(range(8, 16), range(18, 22))
    tick = tall - footprint  # towards the camera: rows below the footprint
    assert footprint <= tall and tick and min(r for r, _ in tick) >= 16


def test_legend_names_the_classes_only_when_given():
    grid = BevGrid(x_range=(-8.0, 8.0), z_range=(0.0, 16.0), cell=0.2)  # 80 x 80: room for a legend
    objs = bev_objects(one_object(), K, LEVEL, ["car", "person"])
    before = mark_camera(np.full((*grid.shape, 3), BG, np.uint8), grid)
    plain = changed(before, draw_bev_objects(before, objs.corners_xz, objs.classes, grid))
    named = changed(before, draw_bev_objects(before, objs.corners_xz, objs.classes, grid, objs.class_names))
    legend = named - plain
    assert legend and max(r for r, _ in legend) < 14 and max(c for _, c in legend) < 30
    assert not any(r < 14 and c < 30 for r, c in plain)


def test_prediction_without_objects_leaves_the_bev_unchanged_and_with_them_draws_and_lists_them(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    depth = np.full((40, 60), 5.0, np.float32)  # a wall 5 m ahead
    opts = SceneOptions(bev=True, intrinsics=K, pose=LEVEL, grid=GRID)
    info = {"palette": [[10, 20, 30]], "object_classes": ["car", "person"]}
    plain = write_scene_outputs(tmp_path, "plain", None, rgb, {"depth": depth}, info, opts)
    assert set(plain) == {"bev", "bev_npy"}
    expected = colorize_bev(
        scene_bev(scene_of(rgb, {"depth": depth}, info, opts, {}), GRID), [[10, 20, 30]], GRID
    )
    plain_png = np.asarray(Image.open(plain["bev"]))
    np.testing.assert_array_equal(plain_png, expected)
    files = write_scene_outputs(tmp_path, "obj", None, rgb, {"depth": depth, **one_object()}, info, opts)
    assert set(files) == {"bev", "bev_npy", "bev_objects"}
    np.testing.assert_array_equal(np.load(files["bev_npy"]), np.load(plain["bev_npy"]))  # layers untouched
    assert changed(plain_png, np.asarray(Image.open(files["bev"]))) == block(range(10, 14), range(16, 24)) | {
        (11, 24),
        (11, 25),
    }
    doc = json.loads(files["bev_objects"].read_text())
    (obj,) = doc["objects"]
    assert obj["class"] == "car" and obj["score"] == pytest.approx(0.9) and obj["in_grid"]
    assert [obj["centre_x_m"], obj["centre_z_m"], obj["yaw_rad"]] == pytest.approx([2.0, 10.0, 0.0])
    assert obj["size_m"] == [4.0, 2.0, 1.5] and obj["footprint_xz_m"][0] == [4.0, 11.0]
    none = {k: v[:0] for k, v in one_object().items()}  # the objects task, nothing detected
    empty = write_scene_outputs(tmp_path, "none", None, rgb, {"depth": depth, **none}, info, opts)
    np.testing.assert_array_equal(np.asarray(Image.open(empty["bev"])), plain_png)
    assert json.loads(empty["bev_objects"].read_text())["objects"] == []


def test_incomplete_objects_prediction_names_what_is_missing():
    pred = one_object()
    del pred["objects_yaw"]
    with pytest.raises(ValueError, match="objects_yaw"):
        bev_objects(pred, K, LEVEL)
    with pytest.raises(ValueError, match=r"objects_size3d.*shape"):
        bev_objects(one_object(objects_size3d=np.ones((1, 2), np.float32)), K, LEVEL)


def test_detections_without_a_footprint_are_left_out():
    two = {k: np.concatenate([v, v]) for k, v in one_object().items()}
    two["objects_distance"][0] = np.nan  # no depth: no place in the BEV
    two["objects_size3d"][1, 0] = 0.0  # no length: no footprint
    assert len(bev_objects(two, K, LEVEL)) == 0
    two["objects_size3d"][1, 0] = 4.0
    np.testing.assert_allclose(bev_objects(two, K, LEVEL).centre_xz, [[2.0, 10.0]], atol=1e-6)
