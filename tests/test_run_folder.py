"""The run folder's guarantees (docs/run_folder.md): refusal, lock, resume rules, safe files, early checks."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from densemtl.cli import main
from densemtl.config import load_config
from densemtl.data.format import DatasetFormatError
from densemtl.fileio import UnsafePathError
from densemtl.train import engine
from densemtl.train.checkpoint import (
    CHECKPOINT_FORMAT,
    NonFiniteWeightsError,
    load_checkpoint,
    save_checkpoint,
)
from densemtl.train.engine import config_for_resume, train
from densemtl.train.runfolder import LOCK_NAME, RUN_FILES, RunFolderError, RunLock, RunLockedError
from densemtl.train.runlog import Progress, RunLog
from helpers import make_dataset, records


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, n=4, splits=("train", "val"), size=(32, 32))
    return root


def _sets(data: Path, run: Path, epochs: int = 1, *extra: str) -> list[str]:
    return [
        f"data.root={data}", f"train.out_dir={run}", f"train.epochs={epochs}", "train.batch_size=2",
        "data.crop=[32, 32]", "data.num_workers=0", "model.decoder_channels=16", "model.tasks=[semseg, depth]",
        "model.backbone=mobilenet_v3_small", "train.device=cpu", "train.channels_last=false", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def done_run(data, tmp_path_factory) -> Path:
    """A finished one-epoch run; tests copy it before changing anything."""
    run = tmp_path_factory.mktemp("runs") / "done"
    train(load_config(None, _sets(data, run)))
    return run


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


# Item 1: refusal, overwrite, resume into the checkpoint's folder, lock.


def test_a_new_training_into_a_used_folder_is_refused_and_changes_nothing(data, done_run, capsys):
    before = _snapshot(done_run)
    with pytest.raises(RunFolderError, match=r"not empty .*--resume .*last\.pt.*--overwrite"):
        train(load_config(None, _sets(data, done_run)))
    argv = ["train", *[a for s in _sets(data, done_run) for a in ("--set", s)]]
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert _snapshot(done_run) == before and not (done_run / LOCK_NAME).exists()


def test_overwrite_keeps_everything_until_setup_succeeded(data, done_run, tmp_path):
    run = _copy(done_run, tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(ValueError, match="model.num_classes=5"):  # fails in setup
        train(load_config(None, _sets(data, run, 1, "model.num_classes=5")), overwrite=True)
    assert _snapshot(run) == before  # nothing deleted or replaced: metrics.jsonl, config.yaml, best.pt
    train(load_config(None, _sets(data, run, 2)), overwrite=True)
    assert [r["epoch"] for r in records(run)] == [1, 2]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_resume_of_a_copied_run_continues_in_the_copy(data, done_run, tmp_path, capsys):
    copy = _copy(done_run, tmp_path / "copy")
    original = _snapshot(done_run)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text("")  # killed after saving last.pt, before writing its line
    assert config_for_resume(copy / "last.pt", []).train.out_dir == str(copy)
    assert main(["train", "--resume", str(copy / "last.pt"), "--set", "train.epochs=2"]) == 0
    assert _snapshot(done_run) == original  # the folder stored in the checkpoint is untouched
    assert [r["epoch"] for r in records(copy)] == [1, 2] and records(copy)[0] == json.loads(lines[0])
    assert load_checkpoint(copy / "last.pt")["config"]["train"]["out_dir"] == str(copy)
    # Resuming into another run's folder would mix two runs: refused unless --overwrite.
    argv = ["train", "--resume", str(copy / "last.pt"), "--out", str(done_run), "--set", "train.epochs=3"]
    assert main(argv) == 2 and "is not from that folder" in capsys.readouterr().err
    assert _snapshot(done_run) == original


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pathlib import Path; from densemtl.train.runfolder import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_training_in_a_locked_folder_is_refused_and_a_dead_lock_is_taken_over(data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = _hold_lock(run)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on this machine.*{LOCK_NAME}"):
            train(load_config(None, _sets(data, run)))
    finally:
        proc.kill()
        proc.wait()
    assert (run / LOCK_NAME).is_file()  # kill -9 leaves the lock behind ...
    lock = RunLock(run).acquire()  # ... and it is stale: its pid is gone from this host
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()


def test_stale_lock_rules(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": dead.pid, "host": "another-node"}))
    with pytest.raises(RunLockedError, match=f"pid {dead.pid} on host another-node"):
        RunLock(tmp_path).acquire()  # another machine's process cannot be checked: never taken over
    lock.write_text("")  # torn: its writer was killed between creating and filling it
    with pytest.raises(RunLockedError, match="another training is starting"):
        RunLock(tmp_path).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    RunLock(tmp_path).acquire().release()
    assert not lock.exists()


def test_lock_is_released_when_training_fails(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="model.num_classes"):
        train(load_config(None, _sets(data, run, 1, "model.num_classes=7")))
    assert not (run / LOCK_NAME).exists() and not any(run.iterdir())


# Items 2 and 7: no writing through links; files follow the umask.


@pytest.mark.parametrize("name", [*RUN_FILES, "tb"])
def test_a_planted_symlink_in_the_run_folder_is_refused(data, done_run, tmp_path, name):
    run = _copy(done_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    if (run / name).is_dir():
        shutil.rmtree(run / name)
    else:
        (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    with pytest.raises(UnsafePathError, match=str(run / name)):
        train(load_config(None, _sets(data, run)), overwrite=True)
    with pytest.raises(UnsafePathError):
        train(
            config_for_resume(done_run / "last.pt", ["train.epochs=2", f"train.out_dir={run}"]),
            done_run / "last.pt",
        )
    assert victim.read_text() == "precious" and (run / name).is_symlink()


def test_logs_refuse_a_symlink_planted_while_running(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "steps.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        RunLog(tmp_path)
    (tmp_path / "steps.jsonl").unlink()
    log = RunLog(tmp_path)
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError):
        log.write({"epoch": 1}, 1)
    log.close()
    assert victim.read_text() == "precious"


def test_run_files_follow_the_umask_and_progress_shows_in_logs(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    orphan = run / ".last.pt.x1y2z3.tmp"  # left by a writer killed mid-write
    orphan.write_bytes(b"partial")
    old = os.umask(0o002)
    try:
        train(load_config(None, _sets(data, run)))
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "last.pt", "best.pt"):
        assert (run / name).stat().st_mode & 0o777 == 0o664, name
    assert not orphan.exists()
    err = capsys.readouterr().err  # not a terminal: plain progress lines, where tqdm would print nothing
    assert "epoch 1: 2/2 (100%) loss=" in err and "evaluate: 2/2 (100%)" in err


def test_progress_prints_plain_lines_off_a_terminal_and_a_bar_on_one():
    out = io.StringIO()
    bar = Progress(range(20), "job", stream=out)
    for i in bar:
        bar.set_postfix(i=i)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("job: 2/20 (10%) i=1") and "20/20 (100%)" in lines[-1]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    assert (
        list(Progress(range(3), "job", stream=tty)) == [0, 1, 2] and "job: 3/3 (100%)" not in tty.getvalue()
    )


# Item 3: a non-finite model is never saved.


def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real, calls = engine.train_epoch, []

    def diverges_in_epoch_2(run_, epoch, runlog):
        stats = real(run_, epoch, runlog)
        calls.append(epoch)
        if epoch == 1:
            with torch.no_grad():
                next(run_.model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(engine, "train_epoch", diverges_in_epoch_2)
    with pytest.raises(
        NonFiniteWeightsError, match=r"after epoch 2 \(step 4\).*train\.lr.*grad_clip.*epoch 1"
    ):
        train(load_config(None, _sets(data, run, 2)))
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(run / name)
        assert ckpt["epoch"] == 0 and all(
            torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
        )
    bad = {"format": CHECKPOINT_FORMAT, "model": {"w": torch.tensor([1.0, float("inf")])}, "epoch": 4}
    with pytest.raises(NonFiniteWeightsError, match="after epoch 5"):
        save_checkpoint(tmp_path / "x.pt", bad)
    assert not (tmp_path / "x.pt").exists()


# Item 4: messages instead of tracebacks.


def test_disk_full_while_saving_names_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_save, real_epoch, state = torch.save, engine.train_epoch, {"full": False}

    def save(obj, f, *args, **kwargs):
        if state["full"]:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    def fill_disk_in_epoch_2(run_, epoch, runlog):
        state["full"] = epoch == 1
        return real_epoch(run_, epoch, runlog)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(engine, "train_epoch", fill_disk_in_epoch_2)
    argv = ["train", *[a for s in _sets(data, run, 2) for a in ("--set", s)]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"last good checkpoint is {run / 'last.pt'} (epoch 1)" in err
    assert "Traceback" not in err and load_checkpoint(run / "last.pt")["epoch"] == 0
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_zero_byte_checkpoint_is_a_message(tmp_path, capsys, command):
    ckpt = tmp_path / "bad.pt"
    ckpt.write_bytes(b"")  # e.g. an interrupted copy; the error handler itself used to raise IndexError
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    argv = {
        "train": ["train", "--resume", str(ckpt)],
        "evaluate": ["evaluate", "--checkpoint", str(ckpt)],
        "predict": ["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "out")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "truncated" in err and "weights_only" not in err and "Traceback" not in err


def test_unloadable_checkpoint_message_never_suggests_weights_only_false(tmp_path):
    path = tmp_path / "other.pt"
    path.write_bytes(b"garbage" * 10)  # not a torch file: PyTorch's message advises weights_only=False
    with pytest.raises(ValueError, match="pickled code") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)


def test_pickled_backbone_weights_name_the_file_and_ask_for_a_state_dict(tmp_path):
    import torchvision

    from densemtl.models.backbones import load_local_weights

    path = tmp_path / "backbone.pth"
    torch.save(torchvision.models.mobilenet_v3_small(), path)  # the whole module, not its state dict
    with pytest.raises(ValueError, match=rf"backbone_weights={path}.*plain state dict") as info:
        load_local_weights(torchvision.models.mobilenet_v3_small(), path)
    assert "weights_only" not in str(info.value)


def test_out_dir_that_is_a_file_is_refused(data, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    argv = ["train", *[a for s in _sets(data, target) for a in ("--set", s)]]
    assert main(argv) == 2
    assert f"train.out_dir={target} is an existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


# Item 5: checked before the first step; last.pt before validating, the metrics line after its checkpoint.


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:60])
    return path


def _break(root: Path, case: str) -> str:
    """Break a copy of the dataset; returns what the error must say."""
    from densemtl.data.format import png_bytes

    if case == "corrupt val image":
        return "before training: .*" + re.escape(str(_truncate(root / "val/images/s001.png")))
    if case == "corrupt train image":
        return "before training: .*" + re.escape(str(_truncate(root / "train/images/s003.png")))
    if case == "val label id outside the classes":
        (root / "val/semseg/s002.png").write_bytes(png_bytes(np.full((32, 32), 7, np.uint8)))
        return "before training: .*" + re.escape(str(root / "val/semseg/s002.png")) + ".*label ids \\[7\\]"
    if case == "target of another size":
        (root / "train/semseg/s000.png").write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))
        return "before training: .*" + re.escape(str(root / "train/semseg/s000.png")) + ".* 16x16"
    info = json.loads((root / "dataset.json").read_text())
    info["ignore_index"] = 254
    (root / "dataset.json").write_text(json.dumps(info))
    return "ignore_index.*254"


CASES = [
    "corrupt val image",
    "corrupt train image",
    "val label id outside the classes",
    "target of another size",
    "dataset ignore_index",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_found_before_the_first_step(data, tmp_path, monkeypatch, case):
    root = shutil.copytree(data, tmp_path / "data")
    fragment = _break(root, case)
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("trained before checking"))
    run = tmp_path / "run"
    with pytest.raises(DatasetFormatError, match=fragment):
        train(load_config(None, _sets(root, run)))
    assert not any(run.iterdir())  # nothing written: no config.yaml, logs or checkpoints


def test_unknown_best_metric_is_found_before_the_first_step(data, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "train_one_epoch", lambda *a, **k: pytest.fail("trained before checking"))
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="train.best_metric='semseg/nope'"):
        train(load_config(None, _sets(data, run, 1, "train.best_metric=semseg/nope")))
    assert not run.exists() or not any(run.iterdir())


def test_last_is_saved_before_validating_and_each_line_after_its_checkpoint(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    events: list[str] = []
    real_save, real_write, real_validate = engine.RunCheckpoints.save, RunLog.write, engine.validate

    def save(self, name, payload):
        events.append(f"{name}{'' if payload['validated'] else ' (before validating)'}")
        real_save(self, name, payload)

    def write(self, record, step):
        events.append(f"line {record['epoch']}")
        real_write(self, record, step)

    def validation_crashes(run_, scale):
        events.append("validate")
        raise RuntimeError("killed while validating")

    monkeypatch.setattr(engine.RunCheckpoints, "save", save)
    monkeypatch.setattr(RunLog, "write", write)
    monkeypatch.setattr(engine, "validate", validation_crashes)
    with pytest.raises(RuntimeError, match="killed while validating"):
        train(load_config(None, _sets(data, run, 2)))
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["validated"] is False and not (run / "metrics.jsonl").exists()

    monkeypatch.setattr(
        engine, "validate", lambda run_, scale: events.append("validate") or real_validate(run_, scale)
    )
    events.clear()
    train(config_for_resume(run / "last.pt", []), resume=run / "last.pt")  # validates epoch 1, trains epoch 2
    first, second = records(run)
    best_2 = ["best.pt"] if second["val/score"] > first["val/score"] else []
    assert events == [
        "validate", "best.pt", "last.pt", "line 1",  # the interrupted epoch 1 is validated first
        "last.pt (before validating)", "validate", *best_2, "last.pt", "line 2",
    ]  # fmt: skip
    assert [r["step"] for r in records(run, "steps.jsonl")] == [1, 2, 3, 4]  # epoch 1 was not trained twice
