"""What a long export or quantisation is doing: one ``densemtl: <stage>`` line on stderr per stage.

Counters (calibration image i/N) use :func:`densemtl.data.progress.track`: a tqdm bar on a terminal, plain lines
in logs (nohup, SLURM, CI), where ``tqdm(disable=None)`` would print nothing.
"""

from __future__ import annotations

import sys


def stage(message: str, enabled: bool = True) -> None:
    """Print one ``densemtl: <message>`` line to stderr (flushed: logs show it at once)."""
    if enabled:
        print(f"densemtl: {message}", file=sys.stderr, flush=True)
