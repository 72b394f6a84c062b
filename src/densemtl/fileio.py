"""The one way densemtl writes a file: a temp file beside it, fsync, atomic rename, never through a symlink.

Every run file, checkpoint, dataset file and export goes through :func:`atomic_write`, so a crash (even
``kill -9``) or a full disk leaves either the old file or the new one, never half of one, and a symlink planted
where a run file goes is refused instead of overwriting what it points at. New files get the permissions the
user's umask allows (like ``open()``), not ``mkstemp``'s private 0600, so teammates on a shared cluster can read
runs. Temp files are named ``.<name>.<random>.tmp``; :func:`remove_orphans` clears the ones a killed process left.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


class UnsafePathError(OSError):
    """A file densemtl is about to write is a symlink (or not a regular file)."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def check_writable_target(path: Path) -> None:
    """Raise :class:`UnsafePathError` unless ``path`` is absent or a regular file that is not a symlink."""
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a symlink (to {os.readlink(path)}); densemtl never writes through links: "
            "remove the link or choose another folder"
        )
    if path.exists() and not path.is_file():
        raise UnsafePathError(f"{path} exists and is not a regular file (a folder?): choose another path")


def check_output(path: str | Path, *, folder: bool = False) -> Path:
    """Fail before a long job, not after it, when ``path`` (a file, or a ``folder`` to write into) cannot be written.

    Refuses a symlink or a folder where a file goes (a file where a folder goes), a file among its parents, and a
    nearest existing folder the process cannot create files in: probed with a real temp file, so read-only
    mounts and root are judged right.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{path} is a file, not a folder: choose a folder path "
                                 "(it is created) or remove the file", str(path))  # fmt: skip
    if not folder:
        check_writable_target(path)
    candidates = (path, *path.parents) if folder else path.parents
    base = next(p for p in candidates if p.exists())  # the nearest folder that exists already
    if not base.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, f"{base} is a file, so {path} cannot be created: choose another path", str(base)
        )
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".densemtl-probe.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise OSError(e.errno, f"cannot write into {base} ({e.strerror}): choose a writable "
                      f"folder for {path}", str(base)) from e  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    return path


def atomic_write(
    path: str | Path, data: bytes | Callable[[IO[bytes]], object], *, fsync: bool = True
) -> Path:
    """Write ``data`` (bytes, or a function that writes to a binary file object) to ``path`` atomically.

    The parent folder is created. On any failure (including ``ENOSPC``) the temp file is removed, the previous
    ``path`` is left untouched and the error says which file could not be written.
    """
    path = Path(path)
    check_writable_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {path}; the previous file (if any) is "
                "unchanged: free disk space and retry",
                str(path),
            ) from exc
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """:func:`atomic_write` for UTF-8 text."""
    return atomic_write(path, text.encode("utf-8"), fsync=fsync)


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (a log), refusing a symlink there; new files follow the umask."""
    with open_append(path) as f:
        f.write(text)


def open_append(path: str | Path) -> IO[str]:
    """An append-mode text handle on ``path`` that refuses to follow a symlink (for logs kept open)."""
    path = Path(path)
    check_writable_target(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    return os.fdopen(os.open(path, flags, 0o666), "a", encoding="utf-8")


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temp files (``.<name>.*.tmp``) a killed writer left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
