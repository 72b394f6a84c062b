"""The command line: every subcommand over a real (tiny) run, and clear errors with exit code 2."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from densemtl.cli import build_parser, main
from densemtl.data.format import decode_depth
from densemtl.inference import Predictor
from densemtl.tasks import TASKS


def _val_images(root, n=2):
    return sorted((root / "val" / "images").iterdir())[:n]


def test_predict_writes_every_output_consistent_with_the_python_api(synthetic_root, tiny_run, tmp_path):
    from densemtl.inference import Predictor

    images = _val_images(synthetic_root)
    out = tmp_path / "pred"
    assert (
        main(["predict", "--checkpoint", str(tiny_run / "best.pt"), *map(str, images), "--out", str(out)])
        == 0
    )
    pred = Predictor.from_checkpoint(tiny_run / "best.pt").predict(images[0])
    stem = images[0].stem
    for name in ("semseg", "semseg_color", "overlay", "depth", "depth_color", "panel"):
        assert (out / f"{stem}_{name}.png").is_file(), name
    np.testing.assert_array_equal(np.array(Image.open(out / f"{stem}_semseg.png")), pred["semseg"])
    depth = decode_depth(np.array(Image.open(out / f"{stem}_depth.png")))
    assert np.abs(depth - pred["depth"]).max() <= 0.5 / 256 + 1e-5  # uint16 metres * 256
    panel = np.array(Image.open(out / f"{stem}_panel.png"))
    assert panel.shape == (64, 4 * 128, 3)  # RGB | semseg | depth | depth std


def test_evaluate_matches_training_time_validation_and_report(synthetic_root, tiny_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tiny_run / "last.pt"), "--out", str(out)]) == 0
    result = json.loads((out / "metrics.json").read_text())
    last = json.loads((tiny_run / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("semseg/miou", "depth/abs_rel", "depth/delta1"):
        assert result["summary"][key] == pytest.approx(last[f"val/{key}"], rel=1e-4, abs=1e-6), key
    assert result["num_images"] == 32
    base = result["baseline_summary"]
    assert 0 < base["semseg/miou"] < 0.2  # one class everywhere: IoU of that class / classes present
    assert 0 < base["depth/delta1"] < 1
    assert "| semseg/miou |" in (out / "metrics.md").read_text()

    (tiny_run / "eval_val").mkdir(exist_ok=True)
    for f in out.iterdir():
        (tiny_run / "eval_val" / f.name).write_bytes(f.read_bytes())
    assert main(["report", str(tiny_run)]) == 0
    report = (tiny_run / "report.md").read_text()
    assert "semseg/miou" in report and "trivial baseline" in report
    for link in [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]:
        assert (tiny_run / link).is_file(), link
    for task in ("semseg", "depth"):  # every part that is about a task comes from that task
        assert TASKS[task].baseline_text() in report and f"\n- {task}: loss `" in report
    assert "### Confusion matrix" in report and "### Depth error vs distance" in report


def test_data_synth_and_preview_commands(tmp_path):
    root = tmp_path / "ds"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(root),
                "--train",
                "2",
                "--val",
                "2",
                "--size",
                "32x64",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert json.loads((root / "dataset.json").read_text())["name"] == "synthetic-streets"
    assert (
        main(["data", "preview", str(root), "--split", "val", "-n", "2", "--out", str(tmp_path / "p.png")])
        == 0
    )
    assert Image.open(tmp_path / "p.png").size[0] > 64


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--set", "train.epoch=3"], "unknown key"),
        (["evaluate", "--checkpoint", "nope.pt"], "does not exist"),
        (["predict", "--checkpoint", "nope.pt", "x.png", "--out", "o"], "does not exist"),
        (["train", "--set", "data.root=/nonexistent"], "dataset.json"),
        (["report", "/nonexistent"], "config.yaml"),
    ],
)
def test_errors_exit_2_with_a_message(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_size_argument_is_validated():
    with pytest.raises(SystemExit):
        main(["data", "synth", "--size", "256by512"])


def test_backend_flags_and_their_old_engine_names():
    p = build_parser()
    for flag in ("--backend", "--engine"):
        args = p.parse_args(["predict", "--checkpoint", "m.pt", "x.png", "--out", "o", flag, "onnxruntime"])
        assert args.backend == "onnxruntime"
        args = p.parse_args(
            ["video", "--checkpoint", "m.pt", "clip.mp4", "--out", "o.mp4", flag, "onnxruntime"]
        )
        assert args.backend == "onnxruntime"
    assert p.parse_args(["predict", "--checkpoint", "m.pt", "x.png", "--out", "o"]).backend == "torch"
    for flag in ("--backends", "--engines"):
        assert p.parse_args(["benchmark", flag, "torch,int8"]).backends == "torch,int8"


def test_engine_keyword_is_a_deprecated_name_of_backend(tiny_run):
    with pytest.warns(DeprecationWarning, match="backend="):
        predictor = Predictor.from_checkpoint(tiny_run / "best.pt", engine="torch")
    assert predictor.tasks == ("semseg", "depth")
    with pytest.raises(ValueError, match="backend 'tensorrt'"):
        Predictor.from_checkpoint(tiny_run / "best.pt", backend="tensorrt")


def test_pseudolabel_fills_any_task_from_the_cli(synthetic_root, tiny_run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    removed = sorted((data / "val" / "semseg").iterdir())[:3]
    for f in removed:
        f.unlink()
    teacher = ["pseudolabel", "--teacher", str(tiny_run / "best.pt"), "--data", str(data), "--device", "cpu"]
    argv = [*teacher, "--task", "semseg", "--split", "val", "--min-confidence", "0.5"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "semseg" and result["filled"] == {"val": 3} and result["kept"] == {"val": 29}
    image = next((data / "val" / "images").glob(f"{removed[0].stem}.*"))
    pred = Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu").predict(image)
    expected = np.where(pred["confidence"] < 0.5, 255, pred["semseg"])  # unsure pixels: ignore
    assert (expected == 255).any()  # the tiny teacher is unsure somewhere: the threshold is exercised
    np.testing.assert_array_equal(np.array(Image.open(removed[0])), expected)
    assert json.loads((data / "dataset.json").read_text())["pseudo_labels"]["semseg"]["count"] == 3

    with pytest.raises(SystemExit):  # argparse: the task list comes from densemtl.tasks.TASKS
        main([*teacher, "--task", "nope"])
    assert "unknown task 'nope'" in capsys.readouterr().err
    info = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**info, "classes": info["classes"][::-1]}))
    assert main([*teacher, "--task", "semseg"]) == 2  # a class-list task needs the teacher's classes
    assert "same class list" in capsys.readouterr().err
