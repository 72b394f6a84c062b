"""One-line messages for the errors a user can cause (a bad file, flag, disk or image), for ``densemtl`` to print.

Our own errors (``ValueError``, ``FileNotFoundError`` and other ``OSError`` subclasses) already name the file or
flag and the fix. The operating system's (``PermissionError``, ``IsADirectoryError``, ``ENOSPC``, ...) name the
file in ``OSError.filename``; they get it printed as a plain path with a hint by ``errno``. ``MemoryError``,
Pillow's ``DecompressionBombError`` and YAML syntax errors get the fix they lack. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import errno
import os

_OS_HINTS = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "free disk space and retry",
    errno.EDQUOT: "disk quota exceeded: free space and retry",
    errno.EISDIR: "it is a folder: give a file path",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.ENOENT: "check the path",
    errno.EEXIST: "it exists already: remove it or choose another path",
    errno.ENAMETOOLONG: "use a shorter path",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types ``densemtl`` reports as a one-line message (exit status 2) instead of a traceback."""
    import yaml
    from PIL import Image

    return (OSError, ValueError, MemoryError, Image.DecompressionBombError, yaml.YAMLError)


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_message(exc: OSError) -> str:
    if exc.filename is None or exc.strerror is None:
        return str(exc)  # ours: the message is all there is (FileNotFoundError("input x.png does not exist"))
    name = os.fsdecode(exc.filename) if isinstance(exc.filename, bytes) else os.fspath(exc.filename)
    text = exc.strerror
    if name not in text:
        text = f"{name}: {text}"
    if exc.filename2 is not None:
        text += f" (and {os.fspath(exc.filename2)})"
    hint = _OS_HINTS.get(exc.errno) if exc.errno is not None else None
    if hint is not None and exc.strerror == os.strerror(exc.errno):  # the system's bare message, no fix yet
        text += f"; {hint}"
    return text


def _yaml_message(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    if mark is None or problem is None:
        return f"invalid YAML: {exc}; fix the file"
    where = "" if str(mark.name).startswith("<") else f"{mark.name}: "  # "<unicode string>" names no file
    return f"{where}invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}; fix the file"


def error_message(exc: BaseException) -> str:
    """``exc`` (one of :func:`user_errors`) as one line naming the file or flag and, where known, the fix."""
    from PIL import Image

    if isinstance(exc, OSError):
        text = _os_message(exc)
    elif isinstance(exc, MemoryError):
        detail = str(exc)
        generic = f"out of memory{f' ({detail})' if detail else ''}: use a smaller --size or smaller inputs"
        text = detail if "out of memory" in detail else generic  # ours name the file and the fix already
    elif isinstance(exc, Image.DecompressionBombError):
        text = f"{exc}; downscale the image (or raise PIL.Image.MAX_IMAGE_PIXELS for files you trust)"
    elif isinstance(exc, ValueError):
        text = str(exc)
    else:  # yaml.YAMLError (imported only when one happens)
        text = _yaml_message(exc)  # type: ignore[arg-type]
    return _one_line(text)
