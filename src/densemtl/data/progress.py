"""Progress for long jobs that also shows in logs: a tqdm bar on a terminal, plain lines everywhere else.

``tqdm(disable=None)`` hides all progress when stderr is not a terminal (nohup, SLURM, CI logs), so a job that
runs for an hour says nothing until it ends. :func:`track` wraps an iterable: on a terminal it is a tqdm
bar; otherwise it prints one line (``desc: 1200/5000 (24%), 310 s, 3.9/s``) every ``every`` items or every
``interval`` seconds, whichever comes first, and a last line when the job ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

LINE_EVERY = 1000  # items between two plain progress lines (at most)
LINE_INTERVAL = 30.0  # seconds between two plain progress lines (at most)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def track(
    items: Iterable[T],
    desc: str,
    total: int | None = None,
    *,
    enabled: bool = True,
    unit: str = "file",
    every: int = LINE_EVERY,
    interval: float = LINE_INTERVAL,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Yield ``items`` while reporting progress on ``stream`` (default stderr); ``enabled=False``: silent.

    Args:
        items: what to iterate over.
        desc: the job's name, the first word of every line.
        total: the number of items (default ``len(items)`` when it has one; else counts without a total).
        unit: what an item is, for the tqdm bar.
        every, interval: a plain line at least every ``every`` items and every ``interval`` seconds.
    """
    stream = stream if stream is not None else sys.stderr
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
    elif _is_terminal(stream):
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, total=total, unit=unit, file=stream, mininterval=1.0)
    else:
        yield from _plain_lines(items, desc, total, every, interval, stream)


def _plain_lines(
    items: Iterable[T], desc: str, total: int | None, every: int, interval: float, stream: IO[str]
) -> Iterator[T]:
    """The non-terminal progress: a line every ``every`` items or ``interval`` seconds, and one at the end."""
    start = last = time.monotonic()
    done = shown = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done % max(every, 1) == 0 or now - last >= interval:
            _line(stream, desc, done, total, now - start)
            last, shown = now, done
    if shown != done or done == 0:
        _line(stream, desc, done, total, time.monotonic() - start)


def _line(stream: IO[str], desc: str, done: int, total: int | None, seconds: float) -> None:
    of = f"/{total} ({100 * done / total:.0f}%)" if total else ""
    rate = f", {done / seconds:.1f}/s" if seconds > 0 else ""
    print(f"{desc}: {done}{of}, {seconds:.0f} s{rate}", file=stream, flush=True)
