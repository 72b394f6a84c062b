"""The run folder's rules: one training at a time (a lock file), no silent reuse, no writing through links.

A run folder (``train.out_dir``) belongs to one run. A new training refuses a folder that already holds
something unless it continues that run (``--resume`` of a checkpoint in it) or is told to replace it
(``--overwrite``). While a training runs it holds ``train.lock`` (created with ``O_CREAT | O_EXCL``, so exactly
one process wins, even on NFS v3+), which records its pid and host; a lock whose process is gone from this host
is stale and taken over. Nothing in the folder is deleted before the run's setup has succeeded: the caller
calls :func:`clear_run_files` (``--overwrite``) only then. See docs/run_folder.md.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from densemtl.fileio import TMP_SUFFIX, UnsafePathError, check_writable_target, remove_orphans

log = logging.getLogger("densemtl")

LOCK_NAME = "train.lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "steps.jsonl", "last.pt", "best.pt")  # what training writes
RUN_DIRS = ("tb",)  # TensorBoard event files
_TORN_LOCK_S = 30.0  # an unreadable lock older than this was left by a process killed while writing it


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message names the folder and the fix."""


class RunLockedError(RunFolderError):
    """Another training holds the run folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """``<folder>/train.lock`` held for the whole run; :meth:`release` removes it only while it is still ours."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}
        self.held = False

    def acquire(self) -> RunLock:
        """Create the lock file or raise :class:`RunLockedError` naming the other process and the file."""
        for _ in range(2):  # a second try after removing a stale lock
            try:
                # O_EXCL: exactly one creator wins, and never through a symlink
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            except OSError as e:
                raise RunFolderError(
                    f"cannot create {self.path} ({e.strerror}): train.out_dir must be a writable folder"
                ) from e
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "started": time.time()}, f)
            self.held = True
            return self
        raise RunLockedError(f"{self.path} keeps reappearing: another training is starting in this folder")

    def _take_over_or_refuse(self) -> None:
        """Remove a stale lock (its pid is dead on this host, or it is torn); otherwise refuse."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - self.path.lstat().st_mtime < _TORN_LOCK_S:
                raise RunLockedError(
                    f"{self.path}: another training is starting in {self.path.parent}; wait for it, or use "
                    "another train.out_dir"
                ) from None
            # Torn long ago: its writer died between creating and filling it.
            log.warning("%s: removing an unreadable lock left by a killed process", self.path)
            self.path.unlink(missing_ok=True)
            return
        if host == self.owner["host"] and pid > 0 and not _pid_alive(pid):
            log.warning("%s: removing the stale lock of pid %d (no longer running)", self.path, pid)
            self.path.unlink(missing_ok=True)
            return
        where = "this machine" if host == self.owner["host"] else f"host {host}"
        raise RunLockedError(
            f"{self.path.parent} is in use by another training (pid {pid} on {where}, lock file {self.path}); "
            "wait for it to finish or choose another train.out_dir; if that process is gone (e.g. a crashed "
            "node), delete the lock file"
        )

    def release(self) -> None:
        """Remove the lock file if it still holds our pid and host (never another process's lock)."""
        if not self.held:
            return
        self.held = False
        try:
            owner = json.loads(self.path.read_text())
            if owner.get("pid") == self.owner["pid"] and owner.get("host") == self.owner["host"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


def _contents(folder: Path) -> list[str]:
    """Entries of ``folder`` that belong to someone: everything but the lock and orphaned temp files."""
    names = []
    for p in sorted(folder.iterdir()):
        orphan = p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()
        if p.name != LOCK_NAME and not orphan:
            names.append(p.name)
    return names


def make_run_folder(out: Path) -> Path:
    """Create ``out`` (and its parents); refuse a path that is an existing file or cannot be created."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(
            f"train.out_dir={out} is an existing file, not a folder: choose a folder path (it is created) "
            "or move the file away"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(
            f"train.out_dir={out}: cannot create the run folder ({e.strerror}); choose a writable folder"
        ) from e
    return out


def check_run_folder(out: Path, resume: Path | None, overwrite: bool) -> None:
    """Refuse a folder that holds something, unless resuming a checkpoint in it or ``overwrite``.

    Also refuses a run file or ``tb/`` that is a symlink (or not what it should be), in every mode: training
    never writes through a link planted in its folder.
    """
    for name in RUN_FILES:
        check_writable_target(out / name)
    for name in RUN_DIRS:
        if (out / name).is_symlink() or ((out / name).exists() and not (out / name).is_dir()):
            raise UnsafePathError(f"{out / name} must be a plain folder (found a link or a file): remove it")
    found = _contents(out)
    own_checkpoint = resume is not None and Path(resume).resolve().parent == out.resolve()
    if not found or overwrite or own_checkpoint:
        return
    listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if resume is not None:
        raise RunFolderError(
            f"train.out_dir={out} already holds {listed}, and {resume} is not from that folder: resume into "
            f"the checkpoint's own folder ({Path(resume).parent}), an empty folder (--out), or pass --overwrite"
        )
    last = out / "last.pt"
    hint = f"continue it with --resume {last}, " if last.is_file() else ""
    raise RunFolderError(
        f"train.out_dir={out} is not empty ({listed}): {hint}pass --overwrite to replace its run, or choose "
        "another train.out_dir"
    )


@contextmanager
def open_run_folder(out: str | Path, resume: Path | None = None, overwrite: bool = False) -> Iterator[Path]:
    """Create ``out``, hold its lock, check the overwrite/resume rules and clear orphaned temp files.

    The lock is released when the block ends, also on errors. Nothing is deleted here except temp files a
    killed writer left (``.<name>.<random>.tmp``).
    """
    out = make_run_folder(Path(out))
    lock = RunLock(out).acquire()
    try:
        check_run_folder(out, resume, overwrite)
        for p in remove_orphans(out):
            log.info("removed %s, left by an interrupted write", p)
        yield out
    finally:
        lock.release()


def clear_run_files(out: Path) -> list[str]:
    """Delete what an earlier run wrote (``RUN_FILES``, ``tb/``), for ``--overwrite``; returns what was removed.

    Call it only once the new run's setup has succeeded. Other files in the folder are left alone.
    """
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (out / name).is_dir() and not (out / name).is_symlink():
            shutil.rmtree(out / name)
            removed.append(name + "/")
    if removed:
        log.warning("--overwrite: removed %s from %s", ", ".join(removed), out)
    return removed
