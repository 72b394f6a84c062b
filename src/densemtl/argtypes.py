"""``argparse`` ``type=`` functions of the ``densemtl`` command line: each bad value is refused at parse time.

A bad value exits with status 2, the usage line and ``argument --FLAG: <what is wrong and what to give>``
instead of a traceback minutes into a job. Only the standard library is imported here, so that
``densemtl --help`` stays instant; the library functions behind the flags check the same values again with a
``ValueError`` for callers from Python.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

# Pixels per image side. The networks take any size (no multiple of 32 needed); this bounds memory.
MAX_SIDE = 8192
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def parse_size(text: str) -> tuple[int, int]:
    """``"256x512"`` -> ``(256, 512)`` as (height, width), each side in 1..:data:`MAX_SIDE`."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH like 256x512, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is too large: each side must be at most {MAX_SIDE} pixels (e.g. 480x640)"
        )
    return h, w


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A ``type=`` accepting integers in ``[low, high]`` (no upper bound when ``high`` is None)."""
    bound = f">= {low}" if high is None else f"in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def float_range(
    low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A ``type=`` accepting finite floats between ``low`` and ``high`` (each bound inclusive unless open).

    NaN and infinity are always refused: ``float()`` parses them, and either turns a computation into garbage.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    bound = " and ".join(parts)
    want = f"a finite number {bound}".rstrip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_range(1)
nonnegative_int = int_range(0)
finite_float = float_range()
positive_float = float_range(0.0, low_open=True)
nonnegative_float = float_range(0.0)
field_of_view = float_range(0.0, 180.0, low_open=True, high_open=True)


def device_name(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (checked without importing torch)."""
    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def output_file(example: str) -> Callable[[str], Path]:
    """A ``type=`` for a file to write (created or replaced): it refuses a folder or a symlink at that path and a
    file where one of its folders should be; ``example`` (e.g. ``model.onnx``) names a file in the messages."""

    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_symlink():
            raise argparse.ArgumentTypeError(
                f"{path} is a symlink; densemtl never writes through links: remove it or choose another path"
            )
        if path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{path} is a folder; give the path of a file to write, e.g. {path / example}"
            )
        _check_parents(path)
        return path

    parse.__name__ = "path"
    return parse


def output_folder(text: str) -> Path:
    """A folder to write into (created when missing): refuse an existing file there."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is an existing file, not a folder: give a folder path (it is created) or remove the file"
        )
    _check_parents(path)
    return path


def _check_parents(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(
                    f"{parent} is a file, so {path} cannot be created: choose another path"
                )
            return
