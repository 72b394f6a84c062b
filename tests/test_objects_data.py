"""Object ground truth: the instances/ and objects/ files (densemtl.data.objects), the synthetic renderer's objects
(exact boxes, visible fraction, 3-D boxes in the camera frame) and their checks in ``densemtl data check``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.format import DatasetFormatError, read_dataset_json
from densemtl.data.objects import (
    OBJECT_CLASSES_KEY,
    boxes_from_instances,
    encode_instances,
    instances_png_bytes,
    read_instances,
    read_objects,
    validate_objects,
    write_objects,
)
from densemtl.synth import scene as sc
from densemtl.synth.generate import generate_dataset
from densemtl.synth.objects import coverage
from densemtl.synth.raycast import Camera, cast
from densemtl.synth.render import render, render_sample, sample_camera, sample_rng
from densemtl.synth.streets import sample_scene

SIZE = (64, 128)
CLASSES = ["car", "person"]


def _obj(**kw) -> dict:
    base = {
        "id": 1,
        "class": "car",
        "box": [3, 5, 4, 6],
        "visible_fraction": 0.5,
        "truncated": 0.0,
        "box3d": None,
    }
    return {**base, **kw}


# ------------------------------------------------------------------------------------------- boxes from masks
def test_boxes_from_instances_on_a_hand_made_mask():
    m = np.zeros((8, 10), np.uint16)
    m[5, 3] = 1  # one pixel at column 3, row 5
    m[1:4, 6] = 7  # an L: rows 1..3 of column 6 and row 3 of columns 6..8
    m[3, 6:9] = 7
    m[0, 0] = m[7, 9] = 300  # two far-apart pixels of one id
    assert boxes_from_instances(m) == {
        1: [3.0, 5.0, 4.0, 6.0],
        7: [6.0, 1.0, 9.0, 4.0],
        300: [0.0, 0.0, 10.0, 8.0],
    }
    assert boxes_from_instances(np.zeros((4, 4), np.uint16)) == {}
    with pytest.raises(ValueError, match="integer array"):
        boxes_from_instances(np.zeros((4, 4), np.float32))


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "objects, field",
    [
        ([_obj(box=[3, 5, float("nan"), 6])], "objects[0].box[2]"),
        ([_obj(box=[3, 5, 3, 6])], "objects[0].box"),  # x1 <= x0
        ([_obj(box=[3, 5, 4])], "objects[0].box"),
        ([_obj(box=[-1.5, 5, 4, 6])], "objects[0].box"),  # 1.5 px outside the image
        ([_obj(box=[3, 5, 11.5, 6])], "objects[0].box"),
        ([_obj(), _obj(**{"class": "bus"})], "objects[1].class"),
        ([_obj(id=2), _obj(id=2)], "objects[1].id"),
        ([_obj(id=-1)], "objects[0].id"),
        ([_obj(id=True)], "objects[0].id"),
        ([_obj(id=1.0)], "objects[0].id"),
        ([_obj(visible_fraction=1.5)], "objects[0].visible_fraction"),
        ([_obj(truncated=float("inf"))], "objects[0].truncated"),
        ([_obj(occluded=4)], "objects[0].occluded"),
        ([{k: v for k, v in _obj().items() if k != "truncated"}], "truncated"),
        ([_obj(box3d={"center": [0, 0, 5], "size": [4, -1, 1.5], "yaw": 0})], "objects[0].box3d.size"),
        ([_obj(box3d={"center": [0, 0, 5], "size": [4, 2, 1.5], "yaw": 4.0})], "objects[0].box3d.yaw"),
        (
            [_obj(box3d={"center": [0, float("nan"), 5], "size": [4, 2, 1], "yaw": 0})],
            "objects[0].box3d.center[1]",
        ),
        ([_obj(box3d={"size": [4, 2, 1], "yaw": 0})], "objects[0].box3d"),
        ([[1, 2, 3]], "objects[0]"),
    ],
)
def test_validate_objects_refuses_malformed_objects_naming_file_and_field(objects: list, field: str):
    path = Path("/data/train/objects/000007.json")
    with pytest.raises(DatasetFormatError) as e:
        validate_objects({"objects": objects}, path, (8, 10), CLASSES)
    assert str(path) in str(e.value) and field in str(e.value)


def test_validate_objects_accepts_the_schema_and_normalises():
    ok = [
        _obj(box=[-1.0, 0, 11.0, 9.0]),  # up to one pixel outside is rounding, not an error
        _obj(id=0, **{"class": "person"}, visible_fraction=None, truncated=None, occluded=2),
        _obj(id=0, box3d={"center": [1, 2, 3], "size": [4, 2, 1.5], "yaw": -math.pi}, track=17),
    ]
    out = validate_objects({"objects": ok}, "f.json", (8, 10), CLASSES)
    assert [o["id"] for o in out] == [1, 0, 0]  # id 0 (no mask) may repeat
    assert out[0]["occluded"] == -1 and out[1]["occluded"] == 2 and out[2]["track"] == 17
    assert out[2]["box3d"] == {"center": [1.0, 2.0, 3.0], "size": [4.0, 2.0, 1.5], "yaw": -math.pi}
    for bad in ([], {"objects": {}}, {"boxes": []}):
        with pytest.raises(DatasetFormatError, match=r"f\.json: an objects file must be"):
            validate_objects(bad, "f.json", None, None)
    with pytest.raises(DatasetFormatError, match="f.json: objects\\[0\\].class"):
        validate_objects({"objects": [_obj(**{"class": ""})]}, "f.json", None, None)


def test_ids_missing_from_the_mask_and_boxes_off_their_mask_are_warnings():
    mask = np.zeros((8, 10), np.uint16)
    mask[5, 3] = 1
    mask[2:4, 6:9] = 2
    objects = [_obj(), _obj(id=2, box=[6, 2, 9, 5]), _obj(id=3), _obj(id=4, box=[6, 2, 10.5, 4])]
    warn: list[str] = []
    out = validate_objects({"objects": objects}, "o.json", (8, 10), CLASSES, instances=mask, warn=warn)
    assert len(out) == 4 and len(warn) == 2  # box [6, 2, 9, 5] is 1 px off: fine
    assert "o.json: objects[2].id 3 does not occur in the instance mask" in warn[0]
    assert "o.json: objects[3].id 4" in warn[1]
    mask[0, 0] = 4
    warn = []
    validate_objects({"objects": objects[3:]}, "o.json", (8, 10), CLASSES, instances=mask, warn=warn)
    assert len(warn) == 2 and "o.json: instance mask ids [1, 2] have no object in this file" in warn[0]
    assert "objects[0].box [6.0, 2.0, 10.5, 4.0] differs from" in warn[1]
    with pytest.warns(UserWarning, match="does not occur in the instance mask"):
        validate_objects({"objects": [_obj(id=9)]}, "o.json", (8, 10), CLASSES, instances=0 * mask)


# -------------------------------------------------------------------------------------------- write / read
def test_objects_and_instances_round_trip(tmp_path: Path):
    objects = [
        _obj(box=np.array([3, 5, 4, 6], np.int64), visible_fraction=np.float32(0.25)),
        _obj(id=2, **{"class": "person"}, box3d={"center": np.zeros(3), "size": [0.5, 0.6, 1.8], "yaw": 1.0}),
    ]
    path = tmp_path / "train/objects/a.json"
    write_objects(path, objects, size=(8, 10), object_classes=CLASSES)
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left
    back = read_objects(path, (8, 10), CLASSES)
    assert back == validate_objects({"objects": objects}, path, (8, 10), CLASSES)
    assert back[0]["box"] == [3.0, 5.0, 4.0, 6.0] and back[0]["visible_fraction"] == 0.25
    assert json.loads(path.read_text())["objects"][1]["box3d"]["center"] == [0.0, 0.0, 0.0]
    with pytest.raises(DatasetFormatError, match="objects\\[0\\].class"):
        write_objects(tmp_path / "b.json", [_obj(**{"class": "bus"})], object_classes=CLASSES)
    assert not (tmp_path / "b.json").exists()  # validated before anything is written
    path.write_text('{"objects": [')
    with pytest.raises(DatasetFormatError, match="a.json: objects file is not valid UTF-8 JSON"):
        read_objects(path, (8, 10), CLASSES)

    ids = np.zeros((8, 10), np.int32)
    ids[2:5, 1:4], ids[7, 9] = 1, 40000
    png = tmp_path / "m.png"
    png.write_bytes(instances_png_bytes(ids))
    assert Image.open(png).mode == "I;16"
    np.testing.assert_array_equal(read_instances(png, (8, 10)), ids)
    assert read_instances(png, (8, 10)).dtype == np.uint16
    with pytest.raises(DatasetFormatError, match="m.png: instance mask is 10x8 .* its image is 11x8"):
        read_instances(png, (8, 11))
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(png)
    with pytest.raises(
        DatasetFormatError, match="m.png: an instance mask must be a single-channel 16-bit PNG"
    ):
        read_instances(png, (8, 10))
    for bad in (ids - 1, ids * 2, ids.astype(np.float32), np.zeros((2, 8, 10), np.int32)):
        with pytest.raises(DatasetFormatError, match="x.png: instance ids"):
            encode_instances(bad, "x.png")


# ------------------------------------------------------------------------------------------ synthetic objects
def _level(cam: Camera, yaw_deg: float = 0.0) -> Camera:
    return Camera(cam.fx, cam.fy, cam.cx, cam.cy, cam.position, yaw_deg=yaw_deg)


def _samples(n: int = 4, level_yaw: float | None = None):
    """(render output, camera) of sampled scenes; ``level_yaw``: the sampled camera made level (no pitch/roll)."""
    for i in range(n):
        rng = sample_rng(5, "train", i)
        scene = sample_scene(rng)
        cam = sample_camera(rng, scene, SIZE)
        cam = cam if level_yaw is None else _level(cam, level_yaw)
        yield render(scene, cam, SIZE, shadows=False), cam


def test_synthetic_objects_match_their_instance_masks():
    seen: set[str] = set()
    for i in range(6):
        s = render_sample(0, "train", i, SIZE)
        inst, objects = s["instances"], s["objects"]
        assert inst.dtype == np.uint16 and inst.shape == SIZE
        assert [o["id"] for o in objects] == list(range(1, inst.max() + 1))  # every listed id is visible
        assert boxes_from_instances(inst) == {o["id"]: o["box"] for o in objects}
        is_object = np.isin(s["semseg"], [sc.CAR, sc.PERSON])
        np.testing.assert_array_equal(inst > 0, is_object)  # each car/person pixel is one object's
        for o in objects:
            assert (
                s["semseg"][inst == o["id"]].tolist()
                == [sc.CAR if o["class"] == "car" else sc.PERSON] * (inst == o["id"]).sum()
            )
            assert 0 < o["visible_fraction"] <= 1 and 0 <= o["truncated"] <= 1
        validate_objects({"objects": objects}, "x.json", SIZE, CLASSES, instances=inst, warn=(w := []))
        assert w == []
        seen |= {o["class"] for o in objects}
    assert seen == {"car", "person"}


def test_coverage_contains_every_visible_pixel():
    """Coverage counts the pixels the cast saw entering each object: its visible pixels are all within it."""
    for i in range(4):
        rng = sample_rng(2, "val", i)
        scene = sample_scene(rng)
        cam = sample_camera(rng, scene, SIZE)
        hits = cast(scene, cam, SIZE)
        lut = np.concatenate([[0, 0], scene.instance])
        visible = np.bincount(lut[hits.index + 2].ravel(), minlength=scene.instance.max() + 1)
        group = np.where(scene.instance > 0, scene.instance - 1, -1)
        covered = coverage(scene, hits, group, int(scene.instance.max()))
        assert (covered >= visible[1:]).all() and (covered > visible[1:]).any()


def _car_part(lo, hi, instance: int = 1) -> sc.Primitive:
    return sc.box(lo, hi, sc.CAR, (0.5, 0.5, 0.5), instance=instance)


def test_visible_fraction_truncation_and_hidden_objects_by_hand():
    cam = Camera(70.0, 70.0, 63.5, 31.5, position=(0.0, 1.5, 0.0))
    car = [_car_part((-1.0, 0.2, 10.0), (1.0, 1.2, 14.0)), _car_part((-0.8, 1.2, 11.0), (0.8, 1.8, 13.0))]
    wall = sc.box((-3.0, 0.0, 8.0), (0.2, 3.0, 8.5), sc.BUILDING, (0.4, 0.4, 0.4))
    hidden = _car_part((-2.0, 0.0, 20.0), (-1.0, 1.0, 21.0), instance=2)  # behind the wall
    alone = render(sc.flat_scene(prims=car), cam, SIZE, shadows=False)
    both = render(sc.flat_scene(prims=[*car, wall, hidden]), cam, SIZE, shadows=False)
    assert alone["objects"][0]["visible_fraction"] == 1.0 and alone["objects"][0]["truncated"] == 0.0
    assert [o["id"] for o in both["objects"]] == [1]  # the hidden car is not listed
    expected = (both["instances"] == 1).sum() / (alone["instances"] == 1).sum()
    assert 0.2 < expected < 0.8
    assert both["objects"][0]["visible_fraction"] == pytest.approx(expected, abs=1e-6)
    # a thin box projecting to u = -20.5..19.5 (pixel centres; the image starts at -0.5): half of it is outside
    z, f, cx = 10.0, 70.0, 63.5
    x0, x1 = (-0.5 - 20 - cx) * z / f, (-0.5 + 20 - cx) * z / f
    plate = render(
        sc.flat_scene(prims=[_car_part((x0, 1.0, z), (x1, 2.0, z + 1e-4))]), cam, SIZE, shadows=False
    )
    (o,) = plate["objects"]
    assert o["truncated"] == pytest.approx(0.5, abs=1e-3) and o["box"][0] == 0.0
    assert o["box3d"]["center"] == pytest.approx(
        [(x0 + x1) / 2, 0.0, z + 5e-5], abs=1e-4
    )  # 1.5 m camera height
    assert o["box3d"]["size"] == pytest.approx([1e-4, x1 - x0, 1.0], abs=2e-5)
    assert o["box3d"]["yaw"] == pytest.approx(math.pi / 2)  # left of the road centre: heading -z, towards us


def _in_box_frame(points: np.ndarray, box3d: dict) -> np.ndarray:
    """Camera-frame points (N, 3) in the box's frame: x along the heading (length), y down, z across (width)."""
    yaw = box3d["yaw"]
    heading = np.array([math.cos(yaw), 0.0, -math.sin(yaw)])
    side = np.cross(heading, [0.0, 1.0, 0.0])
    q = points - np.asarray(box3d["center"])
    return np.stack([q @ heading, q[:, 1], q @ side], axis=1)


def _check_boxes_3d(s: dict, cam: Camera, slack) -> int:
    """Assert that each object's pixels back-project into its 3-D box (grown by ``slack``(size)) and that an
    unoccluded, untruncated object's projected centre lies in its 2-D box; returns how many objects were checked."""
    fx, fy, cx, cy = s["meta"]["intrinsics"]
    checked = 0
    for o in s["objects"]:
        b = o["box3d"]
        v, u = np.nonzero((s["instances"] == o["id"]) & (s["depth"] > 0))
        z = s["depth"][v, u].astype(np.float64)
        pts = np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], axis=1)
        half = np.array([b["size"][0], b["size"][2], b["size"][1]]) / 2 + slack(b["size"])
        assert (np.abs(_in_box_frame(pts, b)) <= half).all(), o
        if o["visible_fraction"] == 1.0 and o["truncated"] == 0.0:
            x, y, zc = b["center"]
            pu, pv = fx * x / zc + cx + 0.5, fy * y / zc + cy + 0.5  # box coordinates = pixel centre + 0.5
            x0, y0, x1, y1 = o["box"]
            assert x0 - 1 <= pu <= x1 + 1 and y0 - 1 <= pv <= y1 + 1, o
        checked += len(u) > 0
    return checked


def test_synthetic_3d_boxes_bound_the_back_projected_pixels():
    # a level camera (any yaw): the camera-frame box is exact, so the bound is tight
    n = sum(_check_boxes_3d(s, cam, lambda size: 2e-3) for s, cam in _samples(4, level_yaw=-8.0))
    assert n > 20
    # the sampled pitch and roll tilt the upright box by the angle between the camera's y axis and gravity
    for s, cam in _samples(4):
        r = np.array(s["meta"]["camera_to_world"])
        tilt = math.acos(min(1.0, -r[1, 1]))  # camera y axis (world r[:, 1]) vs world down (0, -1, 0)
        assert 0 < tilt < math.radians(6.5)
        # the yaw-only frame is the box's turned by at most ~1.22 x tilt: a point moves <= that x its radius
        _check_boxes_3d(s, cam, lambda size, t=tilt: 2e-3 + 1.25 * t * np.linalg.norm(size) / 2)
    # heading: with the identity pose, right of the road centre is -pi/2 (away), left +pi/2 (towards us)
    for s, cam in _samples(2, level_yaw=0.0):
        for o in s["objects"]:
            world_x = o["box3d"]["center"][0] + cam.position[0]
            assert o["box3d"]["yaw"] == pytest.approx(-math.pi / 2 if world_x >= 0 else math.pi / 2)


# --------------------------------------------------------------------------------------- files and data check
# Recorded from HEAD's code (fdf7c01, before objects existed): sha256[:16] of the decoded pixels of each PNG and
# of the bytes of each meta file, for generate_dataset(n_train=2, n_val=1, size=(64, 128), seed=11, png).
HEAD_DIGESTS = {
    "train/depth/000000.png": "2b8a7e4c3d867dcc",
    "train/depth/000001.png": "2bae17e6f68931a9",
    "train/images/000000.png": "375ab43f36d3b9ae",
    "train/images/000001.png": "91e65c87be5ee934",
    "train/meta/000000.json": "ece825e7c6b06a83",
    "train/meta/000001.json": "b5bc214b7bb84752",
    "train/normals/000000.png": "9026358dac27adcc",
    "train/normals/000001.png": "c879b329f329892c",
    "train/semseg/000000.png": "12be5aa745987569",
    "train/semseg/000001.png": "43e5776d51aa9fa6",
    "val/depth/000000.png": "0b3967a624d3f991",
    "val/images/000000.png": "03b0671837ee0fd6",
    "val/meta/000000.json": "0b20927af5326548",
    "val/normals/000000.png": "6606c445713158e9",
    "val/semseg/000000.png": "dd9805210aa415f0",
}


def _digest(p: Path) -> str:
    data = (
        p.read_bytes() if p.suffix == ".json" else np.ascontiguousarray(np.asarray(Image.open(p))).tobytes()
    )
    return hashlib.sha256(data).hexdigest()[:16]


def test_synth_adds_object_files_and_leaves_the_others_unchanged(tmp_path: Path):
    generate_dataset(
        tmp_path, n_train=2, n_val=1, size=SIZE, seed=11, workers=1, progress=False, image_format="png"
    )
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    old = [
        f for f in files if f.split("/")[1:2] in (["images"], ["semseg"], ["depth"], ["normals"], ["meta"])
    ]
    assert {f: _digest(tmp_path / f) for f in old} == HEAD_DIGESTS
    new = sorted(set(files) - set(old) - {"dataset.json"})
    ids = [("train", "000000"), ("train", "000001"), ("val", "000000")]
    assert new == sorted(
        [f"{s}/instances/{i}.png" for s, i in ids] + [f"{s}/objects/{i}.json" for s, i in ids]
    )
    assert read_dataset_json(tmp_path)[OBJECT_CLASSES_KEY] == CLASSES
    ref = render_sample(11, "val", 0, SIZE)
    np.testing.assert_array_equal(
        read_instances(tmp_path / "val/instances/000000.png", SIZE), ref["instances"]
    )
    assert read_objects(tmp_path / "val/objects/000000.json", SIZE, CLASSES) == validate_objects(
        {"objects": ref["objects"]}, "", SIZE, CLASSES
    )


def test_data_check_counts_objects_and_catches_broken_object_files(tmp_path: Path):
    generate_dataset(
        tmp_path, n_train=3, n_val=1, size=SIZE, seed=4, workers=1, progress=False, image_format="png"
    )
    expected: dict[str, dict[str, int]] = {}
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            for o in json.loads((tmp_path / f"{split}/objects/{i:06d}.json").read_text())["objects"]:
                expected.setdefault(split, {}).setdefault(o["class"], 0)
                expected[split][o["class"]] += 1
    report = check_dataset(tmp_path)
    assert report.ok and not report.problems
    for split in ("train", "val"):
        stats = report.splits[split].objects
        assert stats["per_class"] == dict(sorted(expected[split].items()))
        assert stats["files"] == stats["instance_masks"] == (3 if split == "train" else 1)
        assert report.splits[split].with_task["objects"] == stats["files"]
    assert f"objects per class: car {expected['train'].get('car', 0)}" in report.format()

    broken = tmp_path / "train/objects/000001.json"
    data = json.loads(broken.read_text())
    data["objects"][0]["box"] = [5, 2, 5, 9]
    broken.write_text(json.dumps(data))
    shifted = tmp_path / "train/objects/000002.json"
    data = json.loads(shifted.read_text())
    data["objects"][0]["box"][2] += 3
    shifted.write_text(json.dumps(data))
    (tmp_path / "val/objects/000009.json").write_text('{"objects": []}')  # no image
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(tmp_path / "val/instances/000000.png")
    report = check_dataset(tmp_path)
    by_file = {(Path(p.path).name, p.severity): p.message for p in report.problems}
    assert "objects[0].box = [5, 2, 5, 9] is empty" in by_file[("000001.json", "error")]
    assert (
        "objects[0].box" in by_file[("000002.json", "warning")]
        and "more than 1 pixel" in by_file[("000002.json", "warning")]
    )
    assert "no image val/images/000009.*" in by_file[("000009.json", "warning")]
    assert "instance mask is 4x4" in by_file[("000000.png", "error")]
    assert len(report.errors) == 2 and not report.ok
    assert report.splits["train"].objects["files"] == 2  # the broken file is not counted
    assert report.splits["train"].with_task["objects"] == 2
    assert len(report.problems) == len({(p.path, p.message) for p in report.problems})  # each file read once

    info = json.loads((tmp_path / "dataset.json").read_text())
    del info[OBJECT_CLASSES_KEY]
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    messages = [p.message for p in check_dataset(tmp_path).errors]
    assert any("has objects files but no 'object_classes'" in m for m in messages)
