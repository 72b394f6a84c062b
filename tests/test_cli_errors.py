"""Bad input to ``densemtl`` gives one line naming the flag or file and the fix, exit status 2, never a traceback.

Issue #16: flags are range-checked at parse time, the library functions behind them raise ``ValueError`` for
the same values, ``cli.main`` turns OS, memory, image-bomb and YAML errors into one line (``--debug`` shows the
traceback), outputs never overwrite each other or go half-written, and export/quantize say what they do.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.cli import build_parser, main

PREDICT = ["predict", "--checkpoint", "nope.pt", "x.png", "--out", "o"]
VIDEO = ["video", "--checkpoint", "nope.pt", "clip.mp4", "--out", "o.mp4"]
BENCH = ["benchmark", "--checkpoint", "nope.pt"]
QUANT = ["quantize", "--onnx", "nope.onnx", "--calib", "nope"]
EXPORT = ["export", "--checkpoint", "nope.pt"]


def _read_only_folder() -> Path | None:
    """A folder this process cannot create files in, even as root (``/sys``), or None."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys")
    os.close(fd)
    os.unlink(probe)
    return None


READ_ONLY = _read_only_folder()
needs_read_only = pytest.mark.skipif(READ_ONLY is None, reason="no read-only folder (/sys) here")


# ------------------------------------------------------------------------------------ refused at parse time
@pytest.mark.parametrize(
    "argv, words",
    [
        ([*PREDICT, "--size", "100000x100000"], ["--size", "at most 8192"]),
        (["models", "--size", "9000x10"], ["--size", "at most 8192"]),
        ([*EXPORT, "--out", "m.onnx", "--size", "100000x100000"], ["--size", "at most 8192"]),
        ([*PREDICT, "--bev", "--bev-cell", "0"], ["--bev-cell", "> 0"]),
        ([*PREDICT, "--bev", "--bev-cell", "-0.5"], ["--bev-cell", "> 0"]),
        ([*PREDICT, "--bev", "--bev-range", "0"], ["--bev-range", "> 0"]),
        ([*PREDICT, "--bev", "--bev-range", "-40"], ["--bev-range", "> 0"]),
        ([*PREDICT, "--bev", "--bev-range", "inf"], ["--bev-range", "finite"]),
        ([*PREDICT, "--max-range", "0"], ["--max-range", "> 0"]),
        ([*PREDICT, "--voxel", "-0.1"], ["--voxel", ">= 0"]),
        ([*PREDICT, "--fx", "-500", "--fy", "500", "--cx", "1", "--cy", "1"], ["--fx", "> 0"]),
        ([*PREDICT, "--fy", "0"], ["--fy", "> 0"]),
        ([*PREDICT, "--cx", "nan"], ["--cx", "finite"]),
        ([*PREDICT, "--hfov", "0"], ["--hfov", "> 0", "< 180"]),
        ([*PREDICT, "--hfov", "180"], ["--hfov", "< 180"]),
        ([*PREDICT, "--hfov", "-30"], ["--hfov", "> 0"]),
        ([*PREDICT, "--camera-height", "-1.5"], ["--camera-height", "> 0"]),
        ([*PREDICT, "--pitch", "95"], ["--pitch", "<= 90"]),
        ([*PREDICT, "--device", "gpu"], ["--device", "unknown device 'gpu'", "cuda"]),
        ([*VIDEO, "--fps", "0"], ["--fps", "> 0"]),
        ([*VIDEO, "--max-frames", "0"], ["--max-frames", ">= 1"]),
        ([*VIDEO, "--bev-cell", "0"], ["--bev-cell", "> 0"]),
        ([*BENCH, "--runs", "0"], ["--runs", ">= 1"]),
        ([*BENCH, "--threads", "-3"], ["--threads", ">= 1"]),
        ([*BENCH, "--threads", "0"], ["--threads", ">= 1"]),
        ([*BENCH, "--warmup", "-1"], ["--warmup", ">= 0"]),
        ([*BENCH, "--runs", "many"], ["--runs", "expected an integer"]),
        ([*BENCH, "--backends", "torch,tensorrt"], ["--backends", "tensorrt", "onnxruntime"]),
        ([*QUANT, "-n", "0"], ["-n", ">= 1"]),
        ([*QUANT, "-n", "-5"], ["-n", ">= 1"]),
        ([*QUANT, "--eval-samples", "-1"], ["--eval-samples", ">= 0"]),
        (["evaluate", "--checkpoint", "nope.pt", "--device", "tpu"], ["--device", "unknown device"]),
        (["data", "synth-video", "--frames", "0"], ["--frames", ">= 1"]),
        (["data", "synth-video", "--hfov", "190"], ["--hfov", "< 180"]),
        (["data", "preview", "root", "-n", "0"], ["-n", ">= 1"]),
    ],
)
def test_bad_flag_values_exit_2_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "Traceback" not in err and err.strip().splitlines()[0].startswith("usage: densemtl")
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["predict", "--checkpoint", "nope.pt", "x.png", "--out", "{file}"], ["--out", "existing file"]),
        (["evaluate", "--checkpoint", "nope.pt", "--out", "{file}"], ["--out", "existing file"]),
        (["export", "--checkpoint", "nope.pt", "--out", "{dir}"], ["--out", "is a folder", "model.onnx"]),
        (["export", "--checkpoint", "nope.pt", "--out", "{link}"], ["--out", "symlink"]),
        (["export", "--checkpoint", "nope.pt", "--out", "{file}/m.onnx"], ["--out", "is a file"]),
        (["video", "--checkpoint", "nope.pt", "c.mp4", "--out", "{dir}"], ["--out", "is a folder"]),
        (["quantize", "--onnx", "m.onnx", "--calib", "d", "--out", "{dir}"], ["--out", "is a folder"]),
        (["benchmark", "--checkpoint", "nope.pt", "--json", "{dir}"], ["--json", "is a folder"]),
    ],
)
def test_out_of_the_wrong_kind_is_refused_before_any_work(argv, words, tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "file")
    places = {"file": tmp_path / "file", "dir": tmp_path / "dir", "link": tmp_path / "link"}
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**places) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert (tmp_path / "file").read_text() == "keep me" and not any((tmp_path / "dir").iterdir())


@pytest.mark.parametrize(
    "command", ["predict", "video", "export", "quantize", "benchmark", "evaluate", "models"]
)
def test_every_flag_has_help(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    missing = [a.option_strings or a.dest for a in sub._actions if a.dest != "help" and not a.help]
    assert not missing, missing


# -------------------------------------------------------------------------------- the library checks too
def _bev(**kw):
    from densemtl.scene3d.bev import BevGrid

    return BevGrid(**kw)


def _scene(**kw):
    from densemtl.scene3d.bev import SceneOptions

    return SceneOptions(**kw)


def _pose(*args):
    from densemtl.scene3d.geometry import CameraPose

    return CameraPose(*args)


def _backproject(k):
    from densemtl.scene3d.geometry import backproject

    return backproject(np.ones((4, 4), np.float32), k)


def _cloud(**kw):
    from densemtl.scene3d.geometry import semantic_point_cloud

    return semantic_point_cloud(np.ones((4, 4), np.float32), (2.0, 2.0, 1.5, 1.5), **kw)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: _bev(cell=0.0), ["--bev-cell", "> 0"]),
        (lambda: _bev(cell=-0.2), ["--bev-cell", "> 0"]),
        (lambda: _bev(cell=math.nan), ["--bev-cell"]),
        (lambda: _bev(x_range=(-1e5, 1e5), z_range=(0.0, 1e5)), ["cells", "GiB", "larger cell"]),
        (lambda: _bev(cell=0.001), ["40000x40000", "larger cell or a smaller range"]),
        (lambda: _bev(x_range=(5.0, -5.0)), ["x_range", "high > low"]),
        (lambda: _bev(z_range=(0.0, 0.01)), ["empty"]),
        (lambda: _bev(min_points=0), ["min_points"]),
        (lambda: _scene(max_range=0.0), ["--max-range", "> 0"]),
        (lambda: _scene(hfov_deg=200.0), ["--hfov", "(0, 180)"]),
        (lambda: _scene(voxel=-1.0), ["voxel", "> 0"]),
        (lambda: _scene(intrinsics=(-500.0, 500.0, 10.0, 10.0)), ["fx, fy > 0"]),
        (lambda: _pose(-1.5), ["camera height", "> 0", "--camera-height"]),
        (lambda: _pose(1.5, math.nan), ["pitch", "--pitch"]),
        (lambda: _pose(1.5, 120.0), ["pitch", "[-90, 90]"]),
        (lambda: _backproject((0.0, 2.0, 1.0, 1.0)), ["fx, fy > 0"]),
        (lambda: _backproject((2.0, 2.0, math.inf, 1.0)), ["finite"]),
        (lambda: _cloud(max_range=-1.0), ["--max-range", "> 0"]),
    ],
)
def test_scene3d_constructors_refuse_what_the_flags_refuse(make, words):
    with pytest.raises(ValueError) as info:
        make()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_deploy_functions_refuse_bad_counts(tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from densemtl.deploy.benchmark import run_benchmark
    from densemtl.deploy.quantize import accuracy_change, calibration_batches, quantize_onnx

    for kw, flag in (({"threads": -3}, "--threads"), ({"runs": 0}, "--runs"), ({"warmup": -1}, "--warmup")):
        with pytest.raises(ValueError, match=flag):
            run_benchmark(torch.nn.Identity(), (8, 8), ("torch",), **{"threads": 1, "runs": 1, **kw})
    for n in (0, -5):
        with pytest.raises(ValueError, match=r"calibration images .*>= 1 \(-n\)"):
            quantize_onnx(tmp_path / "m.onnx", tmp_path / "q.onnx", None, n=n)
        with pytest.raises(ValueError, match=r">= 1 \(-n\)"):
            calibration_batches(tmp_path / "m.onnx", tmp_path, n=n)
    with pytest.raises(ValueError, match="--eval-samples"):
        accuracy_change(tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path, max_samples=-1)
    assert not (tmp_path / "q.onnx").exists()


# ------------------------------------------------------------------------ errors at run time: one line
def test_os_errors_print_one_line_with_a_plain_path():
    from densemtl.errors import error_message

    cases = [
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), Path("/runs/x.pt")),
            "check its permissions",
        ),
        (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), Path("/runs")), "give a file path"),
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/d/best.pt"), "free disk space"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), b"/ro/m.onnx"), "read-only"),
    ]
    for exc, hint in cases:
        text = error_message(exc)
        assert str(exc.filename if not isinstance(exc.filename, bytes) else exc.filename.decode()) in text
        assert hint in text and "PosixPath" not in text and "[Errno" not in text and "\n" not in text
    ours = FileNotFoundError("input x.png does not exist")
    assert error_message(ours) == "input x.png does not exist"
    assert "out of memory" in error_message(MemoryError()) and "--size" in error_message(MemoryError())
    assert error_message(ValueError("a\n  b")) == "a; b"


@pytest.mark.parametrize(
    "exc, words",
    [
        (
            PermissionError(errno.EACCES, "Permission denied", Path("/runs/o")),
            ["/runs/o", "Permission denied"],
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/o/x.png"),
            ["No space left", "/runs/o/x.png"],
        ),
        (MemoryError("Unable to allocate 74.5 GiB"), ["out of memory", "74.5 GiB"]),
        (
            Image.DecompressionBombError("Image size (10000000000 pixels) exceeds limit"),
            ["exceeds", "downscale"],
        ),
    ],
)
def test_main_reports_os_memory_and_bomb_errors_and_debug_shows_them(
    exc, words, monkeypatch, capsys, tmp_path
):
    import densemtl.predict_commands as commands

    def fail(args):
        raise exc

    monkeypatch.setattr(commands, "_cmd_predict", fail)
    argv = ["predict", "--checkpoint", "m.pt", "x.png", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("densemtl: error: ") and err.count("\n") == 1 and "PosixPath" not in err
    for word in words:
        assert word in err, (word, err)
    for debug in (["--debug", *argv], [*argv, "--debug"]):  # before or after the subcommand
        with pytest.raises(type(exc)):
            main(debug)


def test_broken_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbone: [resnet18\ntrain: {\n")
    assert main(["benchmark", "--config", str(bad), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("densemtl: error: ") and err.count("\n") == 1
    assert "bad.yaml" in err and "YAML" in err and "Traceback" not in err, err


def test_missing_video_prints_the_plain_path(tiny_run, tmp_path, capsys):
    clip = tmp_path / "missing clip.mp4"
    argv = ["video", "--checkpoint", str(tiny_run / "best.pt"), str(clip), "--out", str(tmp_path / "o.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"video {clip} does not exist" in err and "PosixPath" not in err and "camera index" in err
    assert not (tmp_path / "o.mp4").exists()


def _bomb_png(path: Path) -> Path:
    """A valid PNG header claiming 100000x100000 pixels: Pillow refuses it as a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize("bad", ["bomb", "corrupt"])
def test_predict_names_a_bad_input_image(bad, tiny_run, tmp_path, capsys):
    image = tmp_path / f"{bad}.png"
    if bad == "bomb":
        _bomb_png(image)
    else:
        image.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    argv = ["predict", "--checkpoint", str(tiny_run / "best.pt"), str(image), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("densemtl: error: ") and str(image) in err and err.count("\n") == 1


@needs_read_only
@pytest.mark.parametrize("command", ["predict", "export"])
def test_read_only_output_folder_is_refused_before_the_work(command, tiny_run, synthetic_root, capsys):
    out = READ_ONLY / "densemtl-test" / ("m.onnx" if command == "export" else "pred")
    inputs = [str(next((synthetic_root / "val" / "images").iterdir()))] if command == "predict" else []
    argv = [command, "--checkpoint", str(tiny_run / "best.pt"), *inputs, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write into {READ_ONLY}" in err and "choose a writable folder" in err
    assert "exporting" not in err  # refused before the export started


# --------------------------------------------------------------------------- outputs never collide
def test_predict_keeps_same_named_images_apart(tiny_run, synthetic_root, tmp_path, capsys):
    images = sorted((synthetic_root / "val" / "images").iterdir())[:3]
    for name, src in (("dupA", images[0]), ("dupB", images[1])):
        (tmp_path / "in" / name).mkdir(parents=True)
        shutil.copy(src, tmp_path / "in" / name / f"x{src.suffix}")
    shutil.copy(images[2], tmp_path / "in" / "dupA" / "y.png")
    shutil.copy(images[2], tmp_path / "in" / "dupA" / "y.jpg")  # same folder, same stem, other extension
    a, b = (
        tmp_path / "in" / "dupA" / f"x{images[0].suffix}",
        tmp_path / "in" / "dupB" / f"x{images[1].suffix}",
    )
    y_png, y_jpg = tmp_path / "in" / "dupA" / "y.png", tmp_path / "in" / "dupA" / "y.jpg"
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(tiny_run / "best.pt"),
        str(a),
        str(b),
        str(y_png),
        str(y_jpg),
        str(a),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    assert "wrote predictions for 4 image(s)" in capsys.readouterr().out  # a, given twice, counts once
    panels = sorted(p.relative_to(out).as_posix() for p in out.rglob("*_panel.png"))
    assert panels == ["dupA/x_panel.png", "dupA/y_jpg_panel.png", "dupA/y_png_panel.png", "dupB/x_panel.png"]
    first, second = (np.array(Image.open(out / d / "x_panel.png")) for d in ("dupA", "dupB"))
    assert not np.array_equal(first, second)  # two different images' predictions, neither overwritten
    rgb = np.array(Image.open(a).convert("RGB"))
    np.testing.assert_array_equal(first[:, : rgb.shape[1]], rgb)  # the panel starts with the input image


def test_output_stems_are_plain_stems_without_collisions():
    from densemtl.inference import output_stems

    assert output_stems([Path("a/x.png"), Path("b/y.png")]) == ["x", "y"]
    assert output_stems([Path("/d/a/x.png"), Path("/d/b/c/x.png")]) == ["a/x", "b/c/x"]
    assert output_stems([Path("/d/x.png"), Path("/d/x.jpg")]) == ["x_png", "x_jpg"]


# ------------------------------------------------------------------------------- export and quantize
def test_export_refuses_a_folder_or_symlink_and_writes_whole_files(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from densemtl.deploy.quantize import quantize_onnx
    from test_export import export_tiny

    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(OSError, match="not a regular file"):
        export_tiny(tmp_path / "folder.onnx")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / "link.onnx").symlink_to(target)
    with pytest.raises(OSError, match="symlink"):
        export_tiny(tmp_path / "link.onnx")
    assert target.read_text() == "keep me"
    path = tmp_path / "m.onnx"
    export_tiny(path)
    capsys.readouterr()
    quantize_onnx(path, tmp_path / "q.onnx", calib_root=None, n=3)
    err = capsys.readouterr().err
    assert "calibrating on 3 images" in err and "calibration image: 3/3" in err  # plain lines: not a terminal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.onnx", "link.onnx", "m.onnx", "precious.txt",
                                                          "q.onnx"]  # no temp file left  # fmt: skip


def test_export_command_prints_its_stages(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tiny_run / "best.pt"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for stage in (
        "loading",
        "exporting to ONNX at 64x128",
        "checking ONNX Runtime against PyTorch on 4 images",
    ):
        assert stage in err, (stage, err)
    assert out.is_file() and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
