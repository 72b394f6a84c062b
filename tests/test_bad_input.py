"""Bad input: each broken file is reported with its path and a fix, all in one pass, and nothing is lost.

Complements tests/test_folder.py (the loaders raise on each bad file) and tests/test_checkpoint.py (unsafe and
foreign checkpoints): here ``check_dataset`` finds every problem of a dataset at once, odd but valid images
are handled, and a run that meets a bad file stops with a clear message while its checkpoints survive.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset
from densemtl.data.format import DatasetFormatError
from helpers import CLASSES
from helpers import make_dataset as _make_dataset

H, W = 40, 48
# every task in each split; class 2 ("sky") never occurs; returns what was written by (split, id)
make_dataset = partial(_make_dataset, n=3, size=(H, W), label_ids=2)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _break(root: Path, case: str) -> tuple[Path, str]:
    """Break sample s000 (or the dataset) as ``case`` says; return the file to be named and a word of the fix."""
    t = root / "train"
    if case == "truncated image":
        p = t / "images/s000.png"
        p.write_bytes(p.read_bytes()[:200])
        return p, "re-export"
    if case == "garbage jpeg":
        (t / "images/s000.png").unlink()
        p = t / "images/s000.jpg"
        p.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
        return p, "corrupt or truncated"
    if case == "label size":
        return _save(t / "semseg/s000.png", np.zeros((H, W - 3), np.uint8)), "re-export at the image size"
    if case == "depth size":
        return _save(t / "depth/s000.png", np.zeros((H + 2, W), np.uint16)), "re-export at the image size"
    if case == "normals size":
        return _save(t / "normals/s000.png", np.zeros((H, W + 1, 3), np.uint8)), "re-export at the image size"
    if case == "label ids out of range":
        return _save(t / "semseg/s000.png", np.full((H, W), 9, np.uint8)), "add the classes to dataset.json"
    if case == "colour-coded label":
        return _save(t / "semseg/s000.png", np.zeros((H, W, 3), np.uint8)), "convert colour-coded labels"
    if case == "8-bit depth":
        return _save(t / "depth/s000.png", np.full((H, W), 9, np.uint8)), "16-bit"
    if case == "npy depth with NaN, inf, negative":
        p = t / "depth/s001.npy"
        d = np.ones((H, W), np.float32)
        d[0, :3], d[1, :2], d[2, :1] = np.nan, np.inf, -1.0
        np.save(p, d)
        return p, "3 NaN, 2 inf, 1 negative"
    if case == "float tiff depth":
        p = t / "depth/s001.tif"
        Image.fromarray(np.full((H, W), -2.0, np.float32)).save(p)
        return p, f"{H * W} negative"
    if case == "jpeg label":
        return _save(t / "semseg/s001.jpg", np.zeros((H, W), np.uint8)), "semseg/<id>.png"
    if case == "broken meta json":
        p = t / "meta/s000.json"
        p.write_text('{"intrinsics": [1, 2')
        return p, "not valid JSON"
    if case == "bad intrinsics":
        p = t / "meta/s000.json"
        p.write_text(json.dumps({"intrinsics": [0.0, 40.0, 1.0, 2.0]}))
        return p, "fx, fy > 0"
    if case == "duplicate id":
        _save(t / "images/s000.jpg", np.zeros((H, W, 3), np.uint8))
        return t / "images/s000.png", "also has s000.jpg; keep one image per id"
    if case == "missing split folder":
        _retarget_splits(root, ["train", "val"])
        return root / "val", "remove 'val' from 'splits'"
    if case == "empty split folder":
        (root / "test/images").mkdir(parents=True)
        _retarget_splits(root, ["train", "test"])
        return root / "test/images", "contains no .png/.jpg/.jpeg images"
    if case == "dataset.json not JSON":
        p = root / "dataset.json"
        p.write_text('{"tasks": [')
        return p, "not valid JSON"
    raise AssertionError(case)


def _retarget_splits(root: Path, splits: list[str]) -> None:
    info = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**info, "splits": splits}))


ERROR_CASES = [
    "truncated image",
    "garbage jpeg",
    "label size",
    "depth size",
    "normals size",
    "label ids out of range",
    "colour-coded label",
    "8-bit depth",
    "npy depth with NaN, inf, negative",
    "float tiff depth",
    "jpeg label",
    "broken meta json",
    "bad intrinsics",
    "duplicate id",
    "missing split folder",
    "empty split folder",
    "dataset.json not JSON",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_check_reports_the_file_and_the_fix(tmp_path: Path, case: str) -> None:
    make_dataset(tmp_path)
    assert check_dataset(tmp_path).problems == []
    bad, fix = _break(tmp_path, case)
    before = tree_digest(tmp_path)
    report = check_dataset(tmp_path)
    assert tree_digest(tmp_path) == before, "the checker must not change the dataset"
    assert not report.ok
    assert len(report.errors) == 1, report.format()
    problem = report.errors[0]
    assert problem.path == str(bad) and str(bad) in problem.message and fix in problem.message, (
        problem.message
    )
    assert problem.message in report.format() and json.loads(report.to_json())["ok"] is False


def test_dataset_json_lists_every_missing_key_and_wrong_type_at_once(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    info = json.loads((tmp_path / "dataset.json").read_text())
    del info["classes"], info["depth"]
    info["palette"], info["ignore_index"] = "red", "255"
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    report = check_dataset(tmp_path)
    messages = [p.message for p in report.errors if p.what == "dataset.json"]
    for key in ("'classes'", "'depth'", "'palette' must be a list", "'ignore_index' must be a int"):
        assert sum(key in m for m in messages) == 1, (key, messages)
    assert all(str(tmp_path / "dataset.json") in m for m in messages)
    assert report.splits["train"].samples == 3  # files are still checked without a usable dataset.json
    with pytest.raises(DatasetFormatError, match="missing key 'classes'"):
        FolderDataset(tmp_path, "train")


def test_all_problems_are_found_in_one_pass(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=4)
    cases = ["truncated image", "npy depth with NaN, inf, negative", "missing split folder"]
    bad = {str(_break(tmp_path, c)[0]) for c in cases}
    bad.add(str(_save(tmp_path / "train/depth/s002.png", np.full((H, W), 3, np.uint8))))  # 8-bit depth
    bad.add(str(_save(tmp_path / "train/semseg/s003.png", np.full((H, W), 200, np.uint8))))  # ids
    report = check_dataset(tmp_path)
    assert {p.path for p in report.errors} == bad
    assert report.splits["train"].samples == 4 and report.splits["val"].samples == 0


def test_warnings_do_not_fail_the_check(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    orphan = _save(tmp_path / "train/semseg/zzz.png", np.zeros((H, W), np.uint8))
    unscaled = _save(tmp_path / "train/depth/s001.png", np.full((H, W), 3, np.uint16))  # 3/256 m
    report = check_dataset(tmp_path)
    assert report.ok and len(report.problems) == 2
    found = {p.path: p.message for p in report.problems}
    assert "add the image or delete the file" in found[str(orphan)]
    assert "without the x256 scale" in found[str(unscaled)]


def test_statistics_match_what_was_written(tmp_path: Path) -> None:
    written = make_dataset(tmp_path, n=3, splits=("train", "val"))
    report = check_dataset(tmp_path)
    assert report.ok and report.problems == [] and list(report.splits) == ["train", "val"]
    for split, stats in report.splits.items():
        labels = np.stack([v["semseg"] for (s, _), v in written.items() if s == split])
        depth = np.stack([v["depth"] for (s, _), v in written.items() if s == split])
        valid = depth[depth > 0]
        assert stats.samples == 3 and stats.with_task == {"semseg": 3, "depth": 3, "normals": 3, "objects": 0}
        seg = stats.tasks["semseg"]
        assert seg["class_pixels"] == np.bincount(labels[labels != 255], minlength=3).tolist()
        assert seg["class_images"] == [3, 3, 0] and seg["ignore_pixels"] == int((labels == 255).sum())
        d = stats.tasks["depth"]
        assert d["valid_fraction"] == pytest.approx(valid.size / depth.size)
        assert d["min"] == pytest.approx(valid.min(), abs=1 / 256) and d["max"] == pytest.approx(
            valid.max(), abs=1 / 256
        )
        assert d["mean"] == pytest.approx(valid.mean(), abs=1e-2)
        assert d["p50"] == pytest.approx(np.median(valid), abs=0.15)
    text = report.format()
    assert "split val: 3 samples" in text and "sky" in text and "0 error(s), 0 warning(s)" in text


def test_odd_but_valid_images_are_handled_not_rejected(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=4, size=(37, 53))  # odd, non-multiple-of-32 size
    t = tmp_path / "train/images"
    gray = np.arange(37 * 53, dtype=np.uint8).reshape(37, 53)
    Image.fromarray(gray, mode="L").save(t / "s000.png")
    Image.fromarray(np.zeros((37, 53, 4), np.uint8), mode="RGBA").save(t / "s001.png")
    Image.fromarray(np.zeros((37, 53), np.uint8)).convert("P").save(t / "s002.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 53x37 landscape, displayed upright as 37 wide x 53 tall: transposed targets
    (t / "s003.png").unlink()
    Image.fromarray(np.zeros((53, 37, 3), np.uint8)).save(t / "s003.jpg", exif=exif)
    assert check_dataset(tmp_path).problems == []
    ds = FolderDataset(tmp_path, "train")
    assert [tuple(ds[i]["image"].shape) for i in range(3)] == [(3, 37, 53)] * 3
    Image.fromarray(np.zeros((53, 37), np.uint8)).save(tmp_path / "train/semseg/s003.png")
    report = check_dataset(tmp_path)
    assert [p.path for p in report.errors] == [str(tmp_path / "train/semseg/s003.png")]
    assert "EXIF" in report.errors[0].message


def test_checkpoint_from_another_model_is_refused_with_a_fix(tmp_path: Path) -> None:
    from densemtl.config import load_config
    from densemtl.models import build_model
    from densemtl.train.checkpoint import (
        CheckpointError,
        load_checkpoint,
        model_from_checkpoint,
        save_checkpoint,
    )

    cfg = load_config(
        None, ["model.backbone=mobilenet_v3_small", "model.decoder_channels=16", "model.num_classes=3"]
    )
    other = load_config(
        None, ["model.backbone=mobilenet_v3_small", "model.decoder_channels=24", "model.num_classes=3"]
    )
    from densemtl.train.checkpoint import make_payload

    payload = make_payload(cfg, build_model(other.model), {"classes": CLASSES})  # weights of another model
    path = save_checkpoint(tmp_path / "other.pt", payload)
    with pytest.raises(CheckpointError, match="weights do not fit"):
        model_from_checkpoint(load_checkpoint(path), path)
    torch.save(build_model(cfg.model).state_dict(), tmp_path / "plain.pt")  # a bare state dict
    with pytest.raises(CheckpointError, match="backbone_weights"):
        load_checkpoint(tmp_path / "plain.pt")


def test_bad_file_mid_run_stops_clearly_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    from densemtl.config import load_config
    from densemtl.train.checkpoint import load_checkpoint
    from densemtl.train.engine import config_for_resume, train

    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset(data, n=4, splits=("train", "val"), size=(32, 32))
    sets = [
        f"data.root={data}",
        f"train.out_dir={run}",
        "train.epochs=1",
        "train.batch_size=2",
        "data.crop=[32, 32]",
        "data.num_workers=0",
        "model.decoder_channels=16",
        "model.tasks=[semseg, depth]",
        "model.backbone=mobilenet_v3_small",
        "train.device=cpu",
    ]
    train(load_config(None, sets))
    saved = {name: (run / name).read_bytes() for name in ("last.pt", "best.pt", "config.yaml")}
    bad = _save(data / "train/depth/s002.png", np.full((32, 32), 7, np.uint8))  # an 8-bit depth map
    with pytest.raises(DatasetFormatError, match=str(bad)):
        train(config_for_resume(run / "last.pt", ["train.epochs=2"]), resume=run / "last.pt")
    assert {name: (run / name).read_bytes() for name in saved} == saved
    assert load_checkpoint(run / "last.pt")["epoch"] == 0


def test_cli_data_check_exit_code_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from densemtl.cli import main

    make_dataset(tmp_path / "d")
    argv = ["data", "check", str(tmp_path / "d"), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0 and "0 error(s)" in capsys.readouterr().out
    bad, _ = _break(tmp_path / "d", "label ids out of range")
    assert main(argv) == 1 and str(bad) in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is False and report["problems"][0]["path"] == str(bad)
    assert main([*argv[:3], "--split", "val"]) == 1  # a split that does not exist
    assert f"{tmp_path / 'd' / 'val'} not found" in capsys.readouterr().out


@pytest.mark.export
def test_onnx_file_without_our_metadata_is_refused_with_a_fix(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from densemtl.deploy.export import read_metadata

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["out"])], "foreign", [x], [y])
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    before = path.read_bytes()
    with pytest.raises(
        ValueError, match=rf"{path} has no 'densemtl' metadata; export it with `densemtl export`"
    ):
        read_metadata(path)
    assert path.read_bytes() == before
