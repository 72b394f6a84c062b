"""Every array is validated before anything is written, and the readers and ``data check`` agree (issue #16).

``write_sample`` refuses bad images, targets, meta and ids with a message naming the file and the fix, and then
nothing is on disk; a 16-bit grayscale image is scaled, not read as white; ``data check`` and ``FolderDataset``
give the same message for the same bad file (one reader); ``data synth`` refuses a non-empty ``--out`` unless
``--overwrite``; hostile files (decompression bombs, pickled or truncated ``.npy``) are messages, not
tracebacks; long data jobs show progress in logs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset, load_image, write_sample
from densemtl.data.format import DatasetFormatError, encode_depth, write_dataset_json
from helpers import CLASSES, PALETTE, make_dataset

H, W = 24, 32
RGB = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def with_json(root: Path) -> Path:
    write_dataset_json(root, name="t", tasks=["semseg", "depth"], classes=CLASSES, palette=PALETTE,
                       splits=["train"], depth_max=80.0)  # fmt: skip
    return root


# ------------------------------------------------------------------------ item 4: write_sample refuses
# (what to write, the file the message must name, a phrase of the fix); nothing may be written
_LABEL, _DEPTH, _IMG = "train/semseg/x.png", "train/depth/x.png", "train/images/x.png"
REFUSED = {
    "label 300": ({"semseg": np.full((H, W), 300)}, _LABEL, "map them before writing"),
    "label -1": ({"semseg": np.full((H, W), -1)}, _LABEL, "-1 or void -> 255"),
    "label 0.7": ({"semseg": np.full((H, W), 0.7)}, _LABEL, "round or map them to ids"),
    "label beyond dataset.json classes": ({"semseg": np.full((H, W), 5)}, _LABEL, "add the classes"),
    "colour label": ({"semseg": np.zeros((H, W, 3), np.uint8)}, _LABEL, "map colour-coded labels"),
    "label size": ({"semseg": np.zeros((H, W - 1), np.uint8)}, _LABEL, "resize them to it"),
    "negative depth": ({"depth": np.full((H, W), -1.0)}, _DEPTH, "fix the sign or units"),
    "depth -inf": ({"depth": np.full((H, W), -np.inf)}, _DEPTH, "fix the sign or units"),
    "depth too far": ({"depth": np.full((H, W), 300.0)}, _DEPTH, "clip or invalidate"),
    "depth (H, W, 2)": ({"depth": np.ones((H, W, 2))}, _DEPTH, "one depth map per image"),
    "float image > 1": ({"image": RGB / 1.0}, _IMG, "for 0..255 floats pass"),
    "NaN image": ({"image": np.full((H, W, 3), np.nan)}, _IMG, "fix those pixels"),
    "16-bit image": ({"image": RGB.astype(np.uint16) * 257}, _IMG, "np.rint(image / 257)"),
    "RGBA image": ({"image": np.zeros((H, W, 4), np.uint8)}, _IMG, "drop the alpha channel"),
    "bool image": ({"image": np.zeros((H, W, 3), bool)}, _IMG, "pass uint8"),
    "NaN in meta": ({"meta": {"intrinsics": [np.nan, 1.0, 1.0, 1.0]}}, "train/meta/x.json", "no NaN"),
    "bad intrinsics": ({"meta": {"intrinsics": [-5.0, 1.0, 1.0, 1.0]}}, "train/meta/x.json", "fx, fy > 0"),
    "object in meta": ({"meta": {"when": object()}}, "train/meta/x.json", "pass a dict of numbers"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_write_sample_refuses_bad_arrays_and_writes_nothing(tmp_path: Path, case: str) -> None:
    kwargs, named, fix = REFUSED[case]
    root = with_json(tmp_path / "d")
    kwargs = {"image": RGB, "semseg": np.zeros((H, W), np.uint8), **kwargs}  # a good label beside a bad file
    with pytest.raises(DatasetFormatError) as e:
        write_sample(root, "train", "x", **kwargs)
    assert str(root / named) in str(e.value) and fix in str(e.value), str(e.value)
    assert files_under(root) == ["dataset.json"]


@pytest.mark.parametrize(
    "sample_id", ["../../escape", "a/b", "a\\b", "", ".hidden", "..", "a\x00b", "line\nbreak", "x" * 300]
)
def test_ids_and_splits_must_be_plain_file_names(tmp_path: Path, sample_id: str) -> None:
    root = tmp_path / "a" / "b" / "d"
    with pytest.raises(DatasetFormatError, match="not a plain file name") as e:
        write_sample(root, "train", sample_id, RGB)
    assert repr(sample_id)[:40] in str(e.value) and "no '/'" in str(e.value)
    with pytest.raises(DatasetFormatError, match="split '../x' is not a plain file name"):
        write_sample(root, "../x", "ok", RGB)
    assert files_under(tmp_path) == []


def test_what_write_sample_accepts_reads_back_exactly(tmp_path: Path) -> None:
    """[0, 1] float images are scaled, (H, W, 1) depth and labels squeezed, whole float ids and numpy meta kept,
    NaN/inf depth stored as invalid (0) as documented."""
    root = with_json(tmp_path / "d")
    image = np.linspace(0, 1, H * W * 3).reshape(H, W, 3)
    depth = np.full((H, W, 1), 2.0)
    depth[0, :3, 0] = [np.nan, np.inf, 0.0]
    labels = np.full((H, W, 1), 2.0)
    labels[1, :2] = 255.0
    meta = {"intrinsics": np.float32([30, 31, 15.5, 11.5]), "frame": np.int64(7)}
    write_sample(root, "train", "x", image, meta, semseg=labels, depth=depth)
    s = FolderDataset(root, "train", tasks=("semseg", "depth"))[0]
    rgb = np.asarray(Image.open(root / _IMG))
    np.testing.assert_array_equal(rgb, np.rint(image * 255).astype(np.uint8))  # not all black
    np.testing.assert_array_equal(s["semseg"].numpy(), labels[..., 0].astype(np.int64))
    np.testing.assert_array_equal(s["depth"][0, 0, :4].numpy(), [0.0, 0.0, 0.0, 2.0])
    assert s["intrinsics"].tolist() == [30, 31, 15.5, 11.5]
    assert json.loads((root / "train/meta/x.json").read_text())["frame"] == 7


def test_second_image_format_for_an_id_is_refused(tmp_path: Path) -> None:
    write_sample(tmp_path, "train", "x", RGB)
    with pytest.raises(DatasetFormatError, match="delete x.png first") as e:
        write_sample(tmp_path, "train", "x", RGB, image_format="jpg", depth=np.ones((H, W)))
    assert str(tmp_path / _IMG) in str(e.value)
    assert files_under(tmp_path) == [_IMG]


def test_depth_limit_is_printed_with_enough_digits() -> None:
    from densemtl.datasets.cityscapes import DepthPrep, load_frame

    with pytest.raises(ValueError, match=r"up to 255\.999 m .*\(max 255\.996 m\)"):
        encode_depth(np.full((2, 2), 255.999))
    assert encode_depth(np.full((1, 1), 255.996))[0, 0] == 65535  # the printed max is storable
    with pytest.raises(ValueError, match=r"\(255\.996 m\)"):
        load_frame("/nonexistent", "train", "c", "s", prep=DepthPrep(max_depth=256.0))


# ------------------------------------------------------- item 5: 16-bit images, one reader for check + loader
def _dataset_with_image(root: Path, image: Image.Image, file_format: str = "PNG") -> Path:
    make_dataset(root, n=2, size=(H, W))
    image.save(root / "train/images/s000.png", format=file_format)  # Pillow opens by content, not name
    return root / "train/images/s000.png"


def test_16_bit_grayscale_image_is_scaled_not_white(tmp_path: Path) -> None:
    gray = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 80  # 0..61360
    path = _dataset_with_image(tmp_path, Image.fromarray(gray))
    assert Image.open(path).mode.startswith("I")
    rgb = load_image(path)
    np.testing.assert_array_equal(rgb[..., 1], np.rint(gray / 257).astype(np.uint8))
    assert rgb.min() == 0 and rgb.max() == 239
    assert check_dataset(tmp_path).ok
    s = FolderDataset(tmp_path, "train")[0]
    assert abs(float(s["image"].max()) - 239 / 255) < 1e-6


def _bad_image(case: str) -> Image.Image:
    if case == "32-bit beyond 16 bits":
        return Image.fromarray(np.full((H, W), 70000, np.int32))
    return Image.fromarray(np.zeros((H, W), np.float32))  # mode F


@pytest.mark.parametrize("case", ["32-bit beyond 16 bits", "float image", "bomb error", "bomb warning"])
def test_check_and_loader_give_the_same_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """The same bad file: ``data check`` reports it (and still reports the rest), the loader raises one line."""
    if case.startswith("bomb"):
        path = _dataset_with_image(tmp_path, Image.fromarray(RGB))
        limit = H * W // 3 if case == "bomb error" else H * W - 1  # Pillow errors over 2x, warns over 1x
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        fix = "raise PIL.Image.MAX_IMAGE_PIXELS"
    else:
        path = _dataset_with_image(tmp_path, _bad_image(case), "TIFF")
        fix = "save it as"
    report = check_dataset(tmp_path)
    messages = [p.message for p in report.errors if p.path == str(path)]
    assert len(messages) == 1 and fix in messages[0] and str(path) in messages[0]
    assert report.splits["train"].samples == 2
    with pytest.raises(DatasetFormatError) as e:
        FolderDataset(tmp_path, "train")[0]
    assert str(e.value) == messages[0] and "\n" not in str(e.value)


def test_cli_check_reports_a_bomb_instead_of_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from densemtl.cli import main

    path = _dataset_with_image(tmp_path, Image.fromarray(RGB))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"ERROR: {path}: image refused as a possible decompression bomb" in out and "2 error(s)" in out


# --------------------------------------------------------------------- item 6: data synth over a dataset
def _synth(out: Path, **kw) -> dict:
    from densemtl.synth.generate import generate_dataset

    return generate_dataset(out, n_train=1, n_val=1, size=(32, 64), workers=1, progress=False, **kw)


def test_synth_refuses_a_non_empty_out_and_overwrite_clears_only_the_dataset(tmp_path: Path) -> None:
    out, outside = tmp_path / "data", tmp_path / "outside"
    make_dataset(out, n=3, splits=("train", "val", "test"))
    outside.mkdir()
    (outside / "precious.png").write_bytes(b"keep")
    (out / "train/images/link.png").symlink_to(outside / "precious.png")
    (out / "test/meta").rename(tmp_path / "meta_elsewhere")
    (out / "test/meta").symlink_to(tmp_path / "meta_elsewhere", target_is_directory=True)
    (out / "NOTES.txt").write_text("mine")
    before = files_under(out)
    with pytest.raises(ValueError, match="is not empty .* pass --overwrite") as e:
        _synth(out)
    assert str(out) in str(e.value) and files_under(out) == before
    _synth(out, overwrite=True)
    assert (outside / "precious.png").read_bytes() == b"keep"
    assert len(list((tmp_path / "meta_elsewhere").iterdir())) == 3
    assert not (out / "test").exists() and (out / "NOTES.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "train/images").iterdir()) == ["000000.jpg"]
    assert json.loads((out / "dataset.json").read_text())["splits"] == ["train", "val"]
    assert check_dataset(out).ok


def test_synth_overwrite_refuses_a_folder_that_is_not_a_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from densemtl.cli import main

    (tmp_path / "photos/images").mkdir(parents=True)
    (tmp_path / "photos/images/me.png").write_bytes(b"x")
    (tmp_path / "todo.txt").write_text("x")
    argv = ["data", "synth", "--out", str(tmp_path), "--train", "1", "--val", "1", "--size", "32x64"]
    assert main([*argv, "--workers", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--workers", "1", "--overwrite"]) == 2
    assert "refusing to clear it" in capsys.readouterr().err
    assert files_under(tmp_path) == ["photos/images/me.png", "todo.txt"]


def test_interrupted_synth_can_be_overwritten(tmp_path: Path) -> None:
    _synth(tmp_path / "d")
    (tmp_path / "d/dataset.json").unlink()  # as a killed run leaves it
    _synth(tmp_path / "d", overwrite=True, seed=1)
    assert json.loads((tmp_path / "d/dataset.json").read_text())["generator"]["seed"] == 1


# ------------------------------------------------------------------- tracebacks in datasets/ -> messages
def _mtan(src: Path, broken: str) -> Path:
    h, w = 8, 12
    for name, arr in {
        "image": np.zeros((h, w, 3), np.float32),
        "label": np.zeros((h, w), np.float32),
    }.items():
        (src / "train" / name).mkdir(parents=True, exist_ok=True)
        np.save(src / "train" / name / "0.npy", arr)
    path = src / "train" / ("label" if broken == "label 0.5" else "image") / "0.npy"
    if broken == "pickled":
        np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    elif broken == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    else:
        np.save(path, np.full((h, w), 0.5, np.float32))
    return path


@pytest.mark.parametrize(
    "broken, fix", [("pickled", "never loads"), ("truncated", "re-export it"), ("label 0.5", "round or map")]
)
def test_convert_nyuv2_names_the_bad_npy_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture, broken: str, fix: str
) -> None:
    from densemtl.cli import main

    path = _mtan(tmp_path / "src", broken)
    assert main(["data", "convert", "nyuv2", str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"densemtl: error: {path}:" in err and fix in err and len(err.strip().splitlines()) == 1


def test_bad_source_files_of_other_converters_are_named(tmp_path: Path) -> None:
    from densemtl.datasets.cityscapes import read_camera
    from densemtl.datasets.kitti import read_calib, read_depth_png

    cam = tmp_path / "c_camera.json"
    cam.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON") as e:
        read_camera(cam)
    assert str(cam) in str(e.value)
    calib = tmp_path / "calib_cam_to_cam.txt"
    calib.write_text("P_rect_02: 1 2 three\n")
    with pytest.raises(DatasetFormatError, match="restore calib_cam_to_cam.txt"):
        read_calib(calib)
    png = tmp_path / "depth.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetFormatError, match="corrupt or truncated") as e:
        read_depth_png(png)
    assert str(png) in str(e.value)


# ------------------------------------------------------------------------------------ progress in logs
def test_track_prints_plain_lines_off_a_terminal_and_a_bar_on_one() -> None:
    from densemtl.data.progress import track

    log = io.StringIO()
    assert list(track(range(5), "check train", every=2, stream=log)) == list(range(5))
    assert log.getvalue().splitlines()[0].startswith("check train: 2/5 (40%)")
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "check train: 2/5 (40%)", "check train: 4/5 (80%)", "check train: 5/5 (100%)",
    ]  # fmt: skip
    timed = io.StringIO()
    list(track(iter(range(3)), "convert", interval=0.0, stream=timed))  # no len: counts without a total
    assert [line.split(",")[0] for line in timed.getvalue().splitlines()] == [
        "convert: 1",
        "convert: 2",
        "convert: 3",
    ]
    silent = io.StringIO()
    list(track(range(3), "x", enabled=False, stream=silent))
    assert silent.getvalue() == ""
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    list(track(range(3), "bar", stream=tty))
    assert "bar: 100%" in tty.getvalue()


def test_data_commands_show_progress(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    from densemtl.cli import main
    from densemtl.data import pseudolabel as pl

    make_dataset(tmp_path / "d", n=3)
    assert main(["data", "check", str(tmp_path / "d")]) == 0
    assert "check train: 3/3 (100%)" in capsys.readouterr().err
    _mtan(tmp_path / "src", "label 0.5")
    np.save(tmp_path / "src/train/label/0.npy", np.zeros((8, 12), np.float32))
    assert main(["data", "convert", "nyuv2", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert "convert nyuv2 train: 1/1 (100%)" in capsys.readouterr().err

    class Teacher:  # predicts 3 m everywhere
        tasks, class_names = ("depth",), list(CLASSES)

        def predict(self, path: Path) -> dict:
            return {"depth": np.full((24, 32), 3.0, np.float32)}

    monkeypatch.setattr(pl, "load_teacher", lambda *a: Teacher())
    for p in (tmp_path / "d/train/depth").iterdir():
        p.unlink()
    (tmp_path / "t.pt").write_bytes(b"")
    assert main(["pseudolabel", "--teacher", str(tmp_path / "t.pt"), "--data", str(tmp_path / "d")]) == 0
    assert "pseudolabel train: 3/3 (100%)" in capsys.readouterr().err


# ------------------------------------------------------------------------------- item 7: 16-bit labels
def test_16_bit_label_pngs_load_and_the_docs_say_so(tmp_path: Path) -> None:
    make_dataset(tmp_path, n=1, size=(H, W))
    labels = np.full((H, W), 1, np.uint16)
    labels[0] = 255
    Image.fromarray(labels).save(tmp_path / "train/semseg/s000.png")
    assert Image.open(tmp_path / "train/semseg/s000.png").mode.startswith("I")
    np.testing.assert_array_equal(FolderDataset(tmp_path, "train")[0]["semseg"].numpy(), labels)
    docs = (Path(__file__).parents[1] / "docs/folder_format.md").read_text()
    semseg_rule = docs[docs.index("**Semantic labels**") :].split("\n\n")[0]
    assert "16-bit" in semseg_rule and "write_sample" in semseg_rule
