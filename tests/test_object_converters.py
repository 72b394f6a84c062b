"""Object boxes from the real formats: Cityscapes instanceIds + Cityscapes 3D, KITTI label_2 + calib.

Every fixture is written here, byte for byte in the official format (16-bit instanceIds PNG, gtBbox3d JSON,
KITTI's 15-column labels and 7-line calib), from known parameters, so the expected boxes are hand-computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.format import DatasetFormatError
from densemtl.datasets.objects_cityscapes import (
    box3d_from_cityscapes,
    cityscapes_objects,
    crop_objects,
    load_objects,
    object_classes,
    read_gtbbox3d,
    resize_objects,
)
from densemtl.datasets.objects_kitti import (
    KITTI_TYPES,
    kitti_objects,
    list_object_frames,
    load_object_frame,
    read_object_calib,
    read_object_labels,
)
from densemtl.datasets.objects_kitti import object_classes as kitti_classes

# ---------------------------------------------------------------- Cityscapes instanceIds (12 x 16)
SKY, BUILDING, ROAD, POLE, CAR_CROWD = 23, 11, 7, 17, 26
PERSON, CAR_A, CAR_B, BICYCLE, CARAVAN = 24000, 26000, 26001, 33000, 29000


def _instance_ids() -> np.ndarray:
    """Stuff, a crowd region of cars, a caravan and 4 kept instances (the person occludes car A's middle)."""
    ids = np.full((12, 16), ROAD, np.uint16)
    ids[:3], ids[3:9] = SKY, BUILDING
    ids[3:9, 4] = POLE
    ids[6:9, 5:8] = CAR_A  # rows 6..8, columns 5..7 and 10..11: one car in two visible parts
    ids[6:9, 10:12] = CAR_A
    ids[3:10, 8:10] = PERSON  # rows 3..9, columns 8..9
    ids[7:11, 13:16] = CAR_B  # touches the right border
    ids[5, 3] = BICYCLE  # one pixel: column 3, row 5
    ids[9:12, 0:3] = CAR_CROWD  # a group of cars: labelId only, no instance
    ids[10:12, 5:8] = CARAVAN  # an instance class Cityscapes does not evaluate
    return ids


EXPECTED_2D = [  # (id, class, box, truncated): ids follow the raw ids 24000 < 26000 < 26001 < 33000
    (1, "person", [8.0, 3.0, 10.0, 10.0], 0.0),
    (2, "car", [5.0, 6.0, 12.0, 9.0], 0.0),
    (3, "car", [13.0, 7.0, 16.0, 11.0], 1.0),
    (4, "bicycle", [3.0, 5.0, 4.0, 6.0], 0.0),
]


def _save_ids(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids).save(path)  # 16-bit grayscale PNG, as the official files
    return path


def _summary(objects: list[dict]) -> list[tuple]:
    return [(o["id"], o["class"], o["box"], o["truncated"]) for o in objects]


def test_instance_ids_to_mask_and_boxes(tmp_path):
    path = _save_ids(tmp_path / "aachen_000000_000019_gtFine_instanceIds.png", _instance_ids())
    mask, objects = cityscapes_objects(path)
    assert _summary(objects) == EXPECTED_2D  # crowd cars and the caravan are not objects
    assert all(o["occluded"] == -1 and o["visible_fraction"] is None and o["box3d"] is None for o in objects)
    ids = _instance_ids()
    expected = np.zeros((12, 16), np.uint16)
    for k, raw in enumerate((PERSON, CAR_A, CAR_B, BICYCLE), start=1):
        expected[ids == raw] = k
    assert mask.dtype == np.uint16 and np.array_equal(mask, expected)
    assert object_classes() == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def test_resize_scales_boxes_and_mask(tmp_path):
    mask, objects = cityscapes_objects(_save_ids(tmp_path / "x_gtFine_instanceIds.png", _instance_ids()))
    up, up_mask = resize_objects(objects, mask, (12, 16), (24, 32))
    assert [o["box"] for o in up] == [[2 * v for v in box] for _, _, box, _ in EXPECTED_2D]
    assert np.array_equal(up_mask, np.kron(mask, np.ones((2, 2), np.uint16)))  # nearest: each pixel -> 2x2
    down, down_mask = resize_objects(objects, mask, (12, 16), (6, 8))
    assert down[1]["box"] == [2.5, 3.0, 6.0, 4.5] and down_mask.shape == (6, 8)
    assert [o["truncated"] for o in down] == [0.0, 0.0, 1.0, 0.0]


def test_crop_renumbers_and_marks_truncation(tmp_path):
    mask, objects = cityscapes_objects(_save_ids(tmp_path / "x_gtFine_instanceIds.png", _instance_ids()))
    out, out_mask = crop_objects(objects, mask, (12, 16), top=0, bottom=12, left=10, right=16)
    # person (columns 8..9) and bicycle (column 3) are cut away; car A keeps columns 10..11 at the new border
    assert _summary(out) == [(1, "car", [0.0, 6.0, 2.0, 9.0], 1.0), (2, "car", [3.0, 7.0, 6.0, 11.0], 1.0)]
    assert sorted(np.unique(out_mask).tolist()) == [0, 1, 2] and out_mask.shape == (12, 6)
    assert np.array_equal(out_mask == 1, _instance_ids()[:, 10:] == CAR_A)


def test_bad_instance_ids_are_named(tmp_path):
    eight_bit = tmp_path / "labels_gtFine_instanceIds.png"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(eight_bit)
    with pytest.raises(DatasetFormatError, match="labels_gtFine_instanceIds.png.*16-bit"):
        cityscapes_objects(eight_bit)
    odd = _save_ids(tmp_path / "odd_gtFine_instanceIds.png", np.full((4, 4), 500, np.uint16))
    with pytest.raises(DatasetFormatError, match="odd_gtFine_instanceIds.png: value 500"):
        cityscapes_objects(odd)


# ---------------------------------------------------------------- Cityscapes 3D (vehicle frame -> OpenCV)
FX, FY, U0, V0 = 2262.52, 2265.30, 1096.98, 513.137  # a real Cityscapes camera, 2048 x 1024


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _sensor_T_iso(yaw: float, pitch: float, pos=(1.7, 0.1, 1.22)) -> np.ndarray:
    """[R | t] with p_C = R p_V + t for a camera at ``pos`` in V, turned by yaw (about z) then pitch (about y)."""
    pose = _rz(yaw) @ _ry(pitch)  # camera axes expressed in V
    return np.hstack([pose.T, -pose.T @ np.asarray(pos)[:, None]])


def _corners_v(center, dims, heading: float) -> np.ndarray:
    """(8, 3) corners in V of a box turned by ``heading`` about z (V's up axis)."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
    return np.asarray(center) + (signs * np.asarray(dims) / 2) @ _rz(heading).T


def _to_camera(points_v: np.ndarray, sensor_T: np.ndarray) -> np.ndarray:
    """V -> C (x forward, y left, z up at the camera): p_C = R p_V + t."""
    return points_v @ sensor_T[:, :3].T + sensor_T[:, 3]


def _project_c(p_c: np.ndarray) -> np.ndarray:
    """Cityscapes' projection from C (cityscapesScripts box3dImageTransform): u = u0 - fx y / x, v = v0 - fy z / x."""
    return np.stack([U0 - FX * p_c[:, 1] / p_c[:, 0], V0 - FY * p_c[:, 2] / p_c[:, 0]], -1)


def _gt_object(center, dims, heading, sensor_T, label="car", instance_id=0, size=(1024, 2048)) -> dict:
    """One gtBbox3d object whose 2-D boxes are the projection of its 3-D box (consistent by construction)."""
    uv = _project_c(_to_camera(_corners_v(center, dims, heading), sensor_T))
    x0, y0 = np.maximum(uv.min(0), 0)
    x1, y1 = np.minimum(uv.max(0), [size[1], size[0]])
    xywh = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
    quat = [math.cos(heading / 2), 0.0, 0.0, math.sin(heading / 2)]  # [w, x, y, z] of a turn about z
    return {"2d": {"modal": xywh, "amodal": xywh},
            "3d": {"center": list(center), "dimensions": list(dims), "rotation": quat, "type": "Mid Size Car",
                   "format": "CRS_ISO8855"},
            "occlusion": 0.0, "truncation": 0.0, "instanceId": instance_id, "label": label, "score": 1.0}  # fmt: skip


def _gt_file(path: Path, objects: list[dict], sensor_T: np.ndarray, size=(1024, 2048)) -> Path:
    sensor = {
        "sensor_T_ISO_8855": sensor_T.tolist(),
        "fx": FX,
        "fy": FY,
        "u0": U0,
        "v0": V0,
        "baseline": 0.209313,
    }
    data = {"imgWidth": size[1], "imgHeight": size[0], "sensor": sensor, "objects": objects, "ignore": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4))
    return path


CARS = [((15.0, 1.5, 0.75), (4.2, 1.8, 1.5), 0.2), ((25.0, 5.0, 0.8), (4.6, 1.9, 1.6), math.pi - 0.1)]


def test_gtbbox3d_centre_projects_inside_amodal_box(tmp_path):
    sensor_T = _sensor_T_iso(yaw=-0.0195, pitch=0.038)  # the real Cityscapes mounting angles
    path = _gt_file(tmp_path / "a_gtBbox3d.json", [_gt_object(*car, sensor_T) for car in CARS], sensor_T)
    records, size = read_gtbbox3d(path)
    assert size == (1024, 2048) and len(records) == 2
    for (center, dims, _), rec, gt in zip(
        CARS, records, json.loads(path.read_text())["objects"], strict=True
    ):
        x, y, z = rec["box3d"]["center"]
        c = _to_camera(np.array([center]), sensor_T)[0]
        assert [x, y, z] == pytest.approx([-c[1], -c[2], c[0]], abs=1e-9)  # right = -left, down = -up, fwd
        u, v = FX * x / z + U0, FY * y / z + V0  # our OpenCV frame with the sensor's intrinsics
        ax, ay, aw, ah = gt["2d"]["amodal"]
        assert z > 0 and ax < u < ax + aw and ay < v < ay + ah
        assert rec["box3d"]["size"] == list(dims)
        assert rec["modal"] == pytest.approx([ax, ay, ax + aw, ay + ah])  # xywh -> corners


def test_gtbbox3d_yaw_and_corners_follow_kitti_convention():
    sensor_T = _sensor_T_iso(yaw=0.05, pitch=0.0)  # level camera: yaw is exact
    for center, dims, heading in CARS:
        quat = [math.cos(heading / 2), 0.0, 0.0, math.sin(heading / 2)]
        box = box3d_from_cityscapes(list(center), list(dims), quat, sensor_T)
        expected = math.remainder(-(heading - 0.05) - math.pi / 2, 2 * math.pi)  # heading 0 (away) -> -pi/2
        assert box["yaw"] == pytest.approx(expected, abs=1e-9)
        length, width, height = box["size"]  # KITTI box axes: x along length, y down (height), z width
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
        ours = box["center"] + (signs * [length / 2, height / 2, width / 2]) @ _ry(box["yaw"]).T
        c = _to_camera(_corners_v(center, dims, heading), sensor_T)
        theirs = np.stack([-c[:, 1], -c[:, 2], c[:, 0]], -1)
        dist = np.linalg.norm(ours[:, None] - theirs[None], axis=-1)  # (8, 8): the same 8 points, any order
        assert dist.min(1).max() < 1e-9 and dist.min(0).max() < 1e-9
    away = box3d_from_cityscapes(
        [10.0, 0.0, 0.7], [4.0, 1.8, 1.4], [1.0, 0.0, 0.0, 0.0], _sensor_T_iso(0.0, 0.0)
    )
    assert away["yaw"] == pytest.approx(-math.pi / 2) and away["center"] == pytest.approx([0.1, 0.52, 8.3])


def test_gtbbox3d_matched_to_mask_by_instance_id(tmp_path):
    src = tmp_path / "cs"
    stem, rel = "aachen_000000_000019", Path("train") / "aachen"
    _save_ids(src / "gtFine" / rel / f"{stem}_gtFine_instanceIds.png", _instance_ids())
    sensor_T = _sensor_T_iso(yaw=0.0, pitch=0.0)
    small = (12, 16)
    objects = [
        _gt_object(*CARS[0], sensor_T, instance_id=CAR_B, size=small),
        _gt_object(*CARS[1], sensor_T, instance_id=CAR_A, size=small),
        _gt_object((30.0, -2.0, 0.8), (4.0, 1.8, 1.5), 0.0, sensor_T, instance_id=0, size=small),  # crowd car
        _gt_object((20.0, 3.0, 1.2), (6.0, 2.2, 2.5), 0.0, sensor_T, "caravan", CARAVAN, small),
    ]
    # a 16 x 12 frame: the real camera projects elsewhere; matched objects take their boxes from the mask anyway
    for obj in objects:
        obj["2d"] = {"modal": [2.0, 3.0, 4.0, 5.0], "amodal": [1.0, 2.0, 6.0, 7.0]}
    objects.append(_gt_object((9.0, -3.0, 0.7), (4.0, 1.8, 1.5), 0.0, sensor_T, instance_id=0, size=small))
    objects[-1]["2d"] = {
        "modal": [10.0, 6.0, 5.0, 5.0],
        "amodal": [10.0, 6.0, 5.0, 5.0],
    }  # clipped to W-1, H-1
    _gt_file(src / "gtBbox3d" / rel / f"{stem}_gtBbox3d.json", objects, sensor_T, small)
    mask, objs = load_objects(src, "train", "aachen", stem)
    assert _summary(objs[:4]) == EXPECTED_2D  # boxes still come from the mask
    by_id = {o["id"]: o for o in objs}
    assert by_id[3]["box3d"]["size"] == list(CARS[0][1]) and by_id[2]["box3d"]["size"] == list(CARS[1][1])
    assert by_id[1]["box3d"] is None and by_id[4]["box3d"] is None  # person, bicycle: no 3-D box
    # unmatched cars are kept with their modal box (the one cut by the border snaps onto it); the caravan is not
    unmatched = [(0, "car", [2.0, 3.0, 6.0, 8.0], 0.0), (0, "car", [10.0, 6.0, 16.0, 12.0], 1.0)]
    assert _summary(objs[4:]) == unmatched
    assert objs[4]["box3d"]["size"] == [4.0, 1.8, 1.5]
    assert load_objects(src, "val", "aachen", stem) == (None, None)


def test_bad_gtbbox3d_is_named(tmp_path):
    path = tmp_path / "b_gtBbox3d.json"
    path.write_text(json.dumps({"imgWidth": 16, "imgHeight": 12, "objects": []}))
    with pytest.raises(DatasetFormatError, match="b_gtBbox3d.json: not a Cityscapes 3D box file.*sensor"):
        read_gtbbox3d(path)
    sensor_T = _sensor_T_iso(0.0, 0.0)
    obj = _gt_object(*CARS[0], sensor_T)
    obj["3d"]["dimensions"] = [4.2, 1.8]
    _gt_file(path, [obj], sensor_T)
    with pytest.raises(DatasetFormatError, match=r"objects\[0\].3d.dimensions must be 3"):
        read_gtbbox3d(path)


# ---------------------------------------------------------------- KITTI object
W_K, H_K = 1242, 375
CALIB = """P0: 7.215377000000e+02 0.000000000000e+00 6.095593000000e+02 0.000000000000e+00 0.000000000000e+00 7.215377000000e+02 1.728540000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P1: 7.215377000000e+02 0.000000000000e+00 6.095593000000e+02 -3.875744000000e+02 0.000000000000e+00 7.215377000000e+02 1.728540000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P2: 7.215377000000e+02 0.000000000000e+00 6.095593000000e+02 4.485728000000e+01 0.000000000000e+00 7.215377000000e+02 1.728540000000e+02 2.163791000000e-01 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 2.745884000000e-03
P3: 7.215377000000e+02 0.000000000000e+00 6.095593000000e+02 -3.395242000000e+02 0.000000000000e+00 7.215377000000e+02 1.728540000000e+02 2.199936000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 2.729905000000e-03
R0_rect: 9.999239000000e-01 9.837760000000e-03 -7.445048000000e-03 -9.869795000000e-03 9.999421000000e-01 -4.278459000000e-03 7.402527000000e-03 4.351614000000e-03 9.999631000000e-01
Tr_velo_to_cam: 7.533745000000e-03 -9.999714000000e-01 -6.166020000000e-04 -4.069766000000e-03 1.480249000000e-02 7.280733000000e-04 -9.998902000000e-01 -7.631618000000e-02 9.998621000000e-01 7.523790000000e-03 1.480755000000e-02 -2.717806000000e-01
Tr_imu_to_velo: 9.999976000000e-01 7.553071000000e-04 -2.035826000000e-03 -8.086759000000e-01 -7.854027000000e-04 9.998898000000e-01 -1.482298000000e-02 3.195559000000e-01 2.024406000000e-03 1.482454000000e-02 9.997795000000e-01 -7.997231000000e-01

"""  # noqa: E501
# 2-D boxes = the devkit's corners (bottom centre, y up to y - h) projected with P2, clipped to [0, W-1] x [0, H-1]
LABELS = """Car 0.00 0 -1.57 687.39 181.30 778.53 268.65 1.52 1.63 3.88 2.50 1.72 15.00 -1.40
Car 0.59 1 -0.63 1053.35 187.26 1241.00 326.01 1.50 1.60 4.00 8.00 1.70 9.00 0.10
Pedestrian 0.00 1 0.62 330.97 164.43 415.28 311.29 1.75 0.60 0.80 -3.00 1.65 9.00 0.30
Cyclist 0.09 2 2.14 0.00 162.67 144.94 335.18 1.70 0.55 1.75 -6.00 1.60 8.00 1.50
Van 0.00 3 1.80 427.45 167.60 500.10 222.65 2.10 1.90 4.90 -6.00 1.90 30.00 1.60
DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10
"""
P2 = np.array(
    [[721.5377, 0.0, 609.5593, 44.85728], [0.0, 721.5377, 172.854, 0.2163791], [0.0, 0.0, 1.0, 0.002745884]]
)
TZ = 0.002745884  # camera 2 relative to camera 0: t = K^-1 P2[:, 3], by hand
T2 = ((44.85728 - 609.5593 * TZ) / 721.5377, (0.2163791 - 172.854 * TZ) / 721.5377, TZ)


@pytest.fixture
def kitti_base(tmp_path) -> Path:
    base = tmp_path / "data_object" / "training"
    for sub in ("image_2", "label_2", "calib"):
        (base / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((H_K, W_K, 3), np.uint8)).save(base / "image_2" / "000042.png")
    (base / "label_2" / "000042.txt").write_text(LABELS)
    (base / "calib" / "000042.txt").write_text(CALIB)
    return base


def test_kitti_boxes_classes_and_fields(kitti_base):
    assert list_object_frames(kitti_base) == ["000042"]
    sample = load_object_frame(kitti_base, "000042")
    assert sample["image"].shape == (H_K, W_K, 3) and sample["instances"] is None
    assert sample["intrinsics"] == pytest.approx((721.5377, 721.5377, 609.5593, 172.854))
    got = [(o["class"], o["box"], o["truncated"], o["occluded"]) for o in sample["objects"]]
    expected = [  # +0.5: KITTI's pixel-centre coordinates -> our pixel corners; clipped sides snap to 0 / W
        ("car", [687.89, 181.80, 779.03, 269.15], 0.0, 0),
        ("car", [1053.85, 187.76, 1242.0, 326.51], 0.59, 1),
        ("pedestrian", [331.47, 164.93, 415.78, 311.79], 0.0, 1),
        ("cyclist", [0.0, 163.17, 145.44, 335.68], 0.09, 2),
    ]
    assert len(got) == len(expected)
    for (c, box, t, o), (ec, ebox, et, eo) in zip(got, expected, strict=True):
        assert (c, t, o) == (ec, et, eo) and box == pytest.approx(ebox, abs=1e-9)
    assert all(o["id"] == 0 and o["visible_fraction"] is None for o in sample["objects"])
    assert kitti_classes() == ["car", "pedestrian", "cyclist"]


def test_kitti_keeps_other_types_when_asked(kitti_base):
    labels = read_object_labels(kitti_base / "label_2" / "000042.txt")
    objs = kitti_objects(
        labels, read_object_calib(kitti_base / "calib" / "000042.txt"), (H_K, W_K), KITTI_TYPES
    )
    van, dontcare = objs[4], objs[5]
    assert van["class"] == "van" and van["occluded"] == 3
    assert van["box"] == pytest.approx([427.95, 168.10, 500.60, 223.15])
    assert dontcare["class"] == "dontcare" and dontcare["box3d"] is None
    assert dontcare["truncated"] is None and dontcare["occluded"] == -1


def test_kitti_bottom_centre_to_geometric_centre_in_camera_2(kitti_base):
    calib = read_object_calib(kitti_base / "calib" / "000042.txt")
    assert calib.offset(2) == pytest.approx(T2, abs=1e-12) and calib.offset(0) == pytest.approx([0, 0, 0])
    car = load_object_frame(kitti_base, "000042")["objects"][0]
    box3d = car["box3d"]
    assert box3d["center"] == pytest.approx([2.50 + T2[0], 1.72 - 1.52 / 2 + T2[1], 15.00 + T2[2]], abs=1e-12)
    assert box3d["size"] == [3.88, 1.63, 1.52] and box3d["yaw"] == -1.40
    for obj, line in zip(
        load_object_frame(kitti_base, "000042")["objects"], LABELS.splitlines(), strict=False
    ):
        v = [float(s) for s in line.split()[1:]]
        h, loc = v[7], np.array(v[10:13])
        x, y, z = obj["box3d"]["center"]
        uv = np.array([721.5377 * x / z + 609.5593, 721.5377 * y / z + 172.854])  # K only, camera-2 frame
        p = P2 @ np.append(loc - [0, h / 2, 0], 1.0)  # the label's centre through the full P2
        assert uv == pytest.approx(p[:2] / p[2], abs=1e-9)
        x0, y0, x1, y1 = obj["box"]
        if obj["truncated"] < 0.5:  # the 59 %-truncated car's centre lies right of the image
            assert x0 < uv[0] + 0.5 < x1 and y0 < uv[1] + 0.5 < y1  # + 0.5: pixel centres -> corners
    # the devkit's corners (bottom centre, y from 0 to -h) equal ours (geometric centre +- half sizes) + t
    h, w, length = 1.52, 1.63, 3.88
    devkit = np.array(
        [[length / 2 * sx, -h * top, w / 2 * sz] for sx in (-1, 1) for top in (0, 1) for sz in (-1, 1)]
    )
    devkit = devkit @ _ry(-1.40).T + [2.50, 1.72, 15.00] + np.array(T2)
    ours = np.array(
        [[length / 2 * sx, h / 2 * sy, w / 2 * sz] for sx in (-1, 1) for sy in (1, -1) for sz in (-1, 1)]
    )
    ours = ours @ _ry(box3d["yaw"]).T + box3d["center"]
    assert np.allclose(ours, devkit, atol=1e-9)


CAR_LINE = LABELS.splitlines()[0]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (CAR_LINE.rsplit(" ", 1)[0], ":1: 14 values, expected 15"),
        ("\n" + CAR_LINE.replace("181.30", "x"), ":2: the label holds a non-number"),
        (CAR_LINE.replace(" 0 -1.57 ", " 5 -1.57 "), ":1: occluded must be 0..3"),
        (CAR_LINE.replace("687.39", "999.00"), ":1: box .* x2 < x1"),
    ],
)
def test_malformed_label_lines_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "label_2" / "000007.txt"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match=r"label_2[/\\]000007\.txt" + match):
        read_object_labels(path)


def test_malformed_calib_names_file_and_line(tmp_path):
    path = tmp_path / "000007.txt"
    lines = CALIB.splitlines()
    path.write_text("\n".join([lines[0], lines[1], "P2: " + " ".join(lines[2].split()[1:12])]))
    with pytest.raises(DatasetFormatError, match=r"000007\.txt:3: P2 has 11 numbers, expected 12"):
        read_object_calib(path)
    path.write_text("\n".join([lines[0], "P2 7.2 0 609.5"]))
    with pytest.raises(DatasetFormatError, match=r"000007\.txt:2: expected 'KEY: numbers'"):
        read_object_calib(path)
    path.write_text("\n".join(lines[:2] + lines[3:]))
    with pytest.raises(DatasetFormatError, match=r"000007\.txt: no P2 line"):
        read_object_calib(path)
