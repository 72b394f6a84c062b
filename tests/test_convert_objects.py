"""``densemtl data convert ... --objects``: Cityscapes instanceIds / gtBbox3d and KITTI object labels end to end.

Every source file is written here in its official format (16-bit instanceIds PNG, gtBbox3d JSON, KITTI's
15-column labels and 7-line calib) with boxes placed so that the expected boxes after the converter's crop and
resize are hand-computed, and the written ``objects/`` and ``instances/`` files are read back with the folder
format's own readers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.cli import main
from densemtl.data.check import check_dataset
from densemtl.data.format import DatasetFormatError, read_dataset_json
from densemtl.data.objects import boxes_from_instances, read_instances, read_objects
from densemtl.datasets.common import crop_box, resize_sample, write_converted
from densemtl.datasets.convert import convert_dataset

# ---------------------------------------------------------------- Cityscapes (32 x 64, one frame with objects)
H, W = 32, 64
FX, FY, U0, V0 = 2262.52, 2265.30, 30.5, 15.5
CITY, STEM, BARE = "aachen", "aachen_000000_000019", "bochum_000000_000313"
PERSON, CAR_A, CAR_B, BICYCLE = 24000, 26000, 26001, 33000
SENSOR_T = [[1.0, 0.0, 0.0, -1.7], [0.0, 1.0, 0.0, -0.1], [0.0, 0.0, 1.0, -1.22]]  # p_C = p_V + t


def _instance_ids() -> np.ndarray:
    ids = np.full((H, W), 7, np.uint16)  # road
    ids[:8] = 23  # sky
    ids[8:22, 4:10] = PERSON  # box [4, 8, 10, 22]
    ids[12:24, 20:36] = CAR_A  # box [20, 12, 36, 24]: its bottom row is the last row the crop keeps
    ids[20:32, 50:64] = CAR_B  # box [50, 20, 64, 32]: cut by the crop at row 24
    ids[26:32, 30:38] = BICYCLE  # entirely in the cropped-away bottom quarter
    ids[14:18, 40:46] = 26  # a crowd of cars: label id only, never an object
    return ids


def _gt_object(label: str, instance_id: int, modal: list[float], center: list[float]) -> dict:
    return {"2d": {"modal": modal, "amodal": modal},
            "3d": {"center": center, "dimensions": [4.2, 1.8, 1.5], "rotation": [1.0, 0.0, 0.0, 0.0]},
            "instanceId": instance_id, "label": label}  # fmt: skip


def _write_cityscapes(root: Path) -> None:
    rng = np.random.default_rng(0)
    for stem in (STEM, BARE):
        city = stem.split("_")[0]
        for folder in ("leftImg8bit", "gtFine", "camera"):
            (root / folder / "train" / city).mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
        cam = {"extrinsic": {"baseline": 0.209313}, "intrinsic": {"fx": FX, "fy": FY, "u0": U0, "v0": V0}}
        (root / "camera" / "train" / city / f"{stem}_camera.json").write_text(json.dumps(cam))
    Image.fromarray(_instance_ids()).save(root / "gtFine" / "train" / CITY / f"{STEM}_gtFine_instanceIds.png")
    objects = [
        _gt_object("car", CAR_A, [20, 12, 16, 12], [20.0, 2.0, 0.8]),  # joins mask instance car A
        _gt_object("car", 0, [40, 10, 8, 6], [30.0, -1.0, 0.8]),  # no mask: kept with id 0, its modal box
        _gt_object("car", 0, [0, 26, 6, 4], [12.0, 6.0, 0.8]),  # no mask and cropped away: dropped
    ]
    sensor = {"sensor_T_ISO_8855": SENSOR_T, "fx": FX, "fy": FY, "u0": U0, "v0": V0}
    box3d = root / "gtBbox3d" / "train" / CITY / f"{STEM}_gtBbox3d.json"
    box3d.parent.mkdir(parents=True)
    box3d.write_text(json.dumps({"imgWidth": W, "imgHeight": H, "sensor": sensor, "objects": objects}))


@pytest.fixture
def cs_root(tmp_path) -> Path:
    _write_cityscapes(tmp_path / "cityscapes")
    return tmp_path / "cityscapes"


def test_cityscapes_objects_follow_crop_and_resize(cs_root, tmp_path):
    dst = tmp_path / "out"
    argv = ["data", "convert", "cityscapes", str(cs_root), str(dst), "--objects", "--split", "train",
            "--crop", "0,0.25,0,0", "--size", "12x32"]  # fmt: skip
    assert main(argv) == 0  # rows 0..23 kept, then halved
    info = read_dataset_json(dst)
    assert info["object_classes"] == [
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    ]
    mask = read_instances(dst / "train" / "instances" / f"{STEM}.png", (12, 32))
    objects = read_objects(dst / "train" / "objects" / f"{STEM}.json", (12, 32), info["object_classes"])
    got = [(o["id"], o["class"], o["box"], o["truncated"]) for o in objects]
    assert got == [  # by hand: crop keeps rows 0..23, then every coordinate halves; the bicycle is gone
        (1, "person", [2.0, 4.0, 5.0, 11.0], 0.0),
        (2, "car", [10.0, 6.0, 18.0, 12.0], 1.0),  # now touches the new bottom border
        (3, "car", [25.0, 10.0, 32.0, 12.0], 1.0),
        (0, "car", [20.0, 5.0, 24.0, 8.0], 0.0),  # the gtBbox3d-only car; the other one was cropped away
    ]
    mask_boxes = boxes_from_instances(mask)  # the written boxes are the written mask's boxes
    assert mask_boxes == {o["id"]: o["box"] for o in objects if o["id"] > 0}
    # 3-D boxes are metric: unchanged by crop and resize. p_S = (-y_C, -z_C, x_C), yaw of +x_V = -pi/2
    assert objects[1]["box3d"]["center"] == pytest.approx([-1.9, 0.42, 18.3])
    assert objects[1]["box3d"]["size"] == [4.2, 1.8, 1.5]
    assert objects[1]["box3d"]["yaw"] == pytest.approx(-math.pi / 2)
    assert objects[0]["box3d"] is None
    meta = json.loads((dst / "train" / "meta" / f"{STEM}.json").read_text())
    assert meta["intrinsics"] == pytest.approx(
        [FX / 2, FY / 2, (U0 + 0.5) / 2 - 0.5, (V0 + 0.5) / 2 - 0.5], abs=1e-4
    )
    assert not (dst / "train" / "objects" / f"{BARE}.json").exists()  # no instanceIds / gtBbox3d: no objects
    report = check_dataset(dst)
    assert report.ok and [p.message for p in report.problems if "backbones need" not in p.message] == []
    assert report.splits["train"].objects["per_class"] == {"person": 1, "car": 3}


def test_cityscapes_without_objects_flag_writes_none(cs_root, tmp_path):
    stats = convert_dataset("cityscapes", cs_root, tmp_path / "plain", splits=("train",))
    assert "object_frames" not in stats and "object_classes" not in read_dataset_json(tmp_path / "plain")
    assert not (tmp_path / "plain" / "train" / "objects").exists()
    stats = convert_dataset("cityscapes", cs_root, tmp_path / "obj", splits=("train",), objects=True)
    assert stats["object_frames"] == {"train": 1}


def test_resize_gives_vanished_mask_objects_id_zero():
    ids = np.zeros((4, 4), np.uint16)
    ids[0, 0], ids[1:4, 1:4] = 1, 2  # nearest 4 -> 2 samples rows/columns 1 and 3: id 1 disappears
    obj = {"class": "car", "visible_fraction": None, "truncated": 0.0, "box3d": None}
    sample = {"image": np.zeros((4, 4, 3), np.uint8), "instances": ids,
              "objects": [{**obj, "id": 1, "box": [0, 0, 1, 1]}, {**obj, "id": 2, "box": [1, 1, 4, 4]}]}  # fmt: skip
    out = resize_sample(sample, (2, 2))
    assert [(o["id"], o["box"]) for o in out["objects"]] == [(0, [0, 0, 0.5, 0.5]), (2, [0.5, 0.5, 2.0, 2.0])]
    assert out["instances"].tolist() == [[2, 2], [2, 2]]  # pixels (1, 1), (1, 3), (3, 1), (3, 3)
    cropped = crop_box(sample, 1, 4, 1, 4)  # id 1 cropped away: dropped; id 2 renumbered to 1
    assert [(o["id"], o["box"], o["truncated"]) for o in cropped["objects"]] == [
        (1, [0.0, 0.0, 3.0, 3.0], 1.0)
    ]


def test_instance_mask_of_another_size_is_refused(tmp_path):
    sample = {"image": np.zeros((4, 6, 3), np.uint8), "instances": np.zeros((4, 4), np.uint16), "objects": []}
    with pytest.raises(
        DatasetFormatError, match=r"instances[/\\]x\.png: instance mask is 4x4 but its image is 4x6"
    ):
        write_converted(tmp_path, "train", "x", sample)
    assert not (tmp_path / "train").exists()  # nothing half-written


# ---------------------------------------------------------------- KITTI object benchmark (30 x 100 frames)
HK, WK = 30, 100
K = (50.0, 50.0, 49.5, 14.5)  # fx, fy, cx, cy of camera 2; P2 = K [I | (0.06, 0, 0)]


def _p(tx: float) -> str:
    fx, fy, cx, cy = K
    return " ".join(f"{v:.12e}" for v in (fx, 0, cx, fx * tx, 0, fy, cy, 0, 0, 0, 1, 0))


CALIB = f"""P0: {_p(0.0)}
P1: {_p(-0.54)}
P2: {_p(0.06)}
P3: {_p(-0.48)}
R0_rect: 1 0 0 0 1 0 0 0 1
Tr_velo_to_cam: 0 -1 0 0 0 0 -1 -0.08 1 0 0 -0.27
Tr_imu_to_velo: 1 0 0 -0.81 0 1 0 0.32 0 0 1 -0.80

"""
LABELS = {
    "000000": """Car 0.00 0 -1.57 10.00 5.00 40.00 20.00 1.52 1.63 3.88 2.50 1.72 15.00 -1.40
Pedestrian 0.30 1 0.50 60.00 2.00 99.00 29.00 1.75 0.60 0.80 -3.00 1.65 9.00 0.30
Van 0.00 0 1.80 42.00 6.00 50.00 12.00 2.10 1.90 4.90 -6.00 1.90 30.00 1.60
DontCare -1 -1 -10 1.00 1.00 5.00 5.00 -1 -1 -1 -1000 -1000 -1000 -10
""",
    "000001": "Cyclist 0.00 2 2.14 0.00 3.00 20.00 25.00 1.70 0.55 1.75 -6.00 1.60 8.00 1.50\n",
}


@pytest.fixture
def kitti_root(tmp_path) -> Path:
    root = tmp_path / "kitti"
    base = root / "data_object" / "training"
    for sub in ("image_2", "label_2", "calib"):
        (base / sub).mkdir(parents=True)
    for fid, text in LABELS.items():
        Image.fromarray(np.full((HK, WK, 3), 90, np.uint8)).save(base / "image_2" / f"{fid}.png")
        (base / "label_2" / f"{fid}.txt").write_text(text)
        (base / "calib" / f"{fid}.txt").write_text(CALIB)
    (root / "data_object" / "ImageSets").mkdir()
    (root / "data_object" / "ImageSets" / "val.txt").write_text("000001\n")
    return root


def test_kitti_object_frames_to_boxes_box3d_and_classes(kitti_root, tmp_path):
    dst = tmp_path / "out"
    assert main(["data", "convert", "kitti", str(kitti_root), str(dst), "--objects", "--size", "60x200"]) == 0
    info = read_dataset_json(dst)
    assert info["object_classes"] == ["car", "pedestrian", "cyclist"] and info["splits"] == ["train", "val"]
    train = read_objects(dst / "train" / "objects" / "obj_000000.json", (60, 200), info["object_classes"])
    # +0.5 (pixel centres -> corners), sides clipped to the last pixel snap to W / H, then x2; Van, DontCare go
    assert [(o["id"], o["class"], o["box"], o["truncated"], o["occluded"]) for o in train] == [
        (0, "car", [21.0, 11.0, 81.0, 41.0], 0.0, 0),
        (0, "pedestrian", [121.0, 5.0, 200.0, 60.0], 0.3, 1),
    ]
    car = train[0]["box3d"]  # camera-2 frame: bottom centre -> geometric centre (y - h/2), + t = (0.06, 0, 0)
    assert car["center"] == pytest.approx([2.56, 1.72 - 0.76, 15.0]) and car["size"] == [3.88, 1.63, 1.52]
    assert car["yaw"] == -1.40
    val = read_objects(dst / "val" / "objects" / "obj_000001.json", (60, 200), info["object_classes"])
    assert [(o["class"], o["box"]) for o in val] == [("cyclist", [0.0, 7.0, 41.0, 51.0])]
    meta = json.loads((dst / "train" / "meta" / "obj_000000.json").read_text())
    assert meta["intrinsics"] == pytest.approx([100.0, 100.0, 99.5, 29.5])  # (c + 0.5) * 2 - 0.5
    assert not (dst / "train" / "instances").exists()  # KITTI has no instance masks
    report = check_dataset(dst)
    assert report.ok and [p.message for p in report.problems if "backbones need" not in p.message] == []


def test_kitti_bad_label_file_is_named(kitti_root, tmp_path, capsys):
    label = kitti_root / "data_object" / "training" / "label_2" / "000001.txt"
    label.write_text(LABELS["000001"].rsplit(" ", 1)[0] + "\n")  # 14 values
    with pytest.raises(DatasetFormatError, match=r"label_2[/\\]000001\.txt:1: 14 values, expected 15"):
        convert_dataset("kitti", kitti_root, tmp_path / "a", objects=True)
    assert main(["data", "convert", "kitti", str(kitti_root), str(tmp_path / "b"), "--objects"]) == 2
    assert "000001.txt:1: 14 values" in capsys.readouterr().err


def test_kitti_missing_pieces_are_named(kitti_root, tmp_path):
    (kitti_root / "data_object" / "training" / "calib" / "000000.txt").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"calib[/\\]000000\.txt not found: label_2/000000\.txt needs it"
    ):
        convert_dataset("kitti", kitti_root, tmp_path / "a", objects=True)
    assert not (tmp_path / "a").exists()  # the error came before anything was written
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"data_object[/\\]training[/\\]label_2 not found"):
        convert_dataset("kitti", tmp_path / "empty", tmp_path / "b", objects=True)
    (kitti_root / "data_object" / "ImageSets" / "val.txt").write_text("000001\n000777\n")
    with pytest.raises(DatasetFormatError, match=r"val\.txt: ids \['000777'\] have no"):
        convert_dataset("kitti", kitti_root, tmp_path / "c", objects=True)
    assert main(["data", "convert", "nyuv2", str(kitti_root), str(tmp_path / "d"), "--objects"]) == 2
