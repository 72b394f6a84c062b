"""What a training run leaves behind for people and tools: JSONL records, TensorBoard scalars, console lines.

``metrics.jsonl`` holds one line per epoch (mean losses, task weights, speed, validation metrics), written after
the checkpoint it describes; ``steps.jsonl`` one line per optimiser step (task losses and weights: adaptive
weightings change them every step). :class:`Progress` shows how far an epoch or an evaluation is, also when the
output is a log file (nohup, SLURM, CI), where a tqdm bar shows nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from densemtl.config import Config, to_dict
from densemtl.fileio import append_text, atomic_write_text, open_append
from densemtl.tasks import TASKS
from densemtl.train.runfolder import clear_run_files
from densemtl.train.schedule import Phase


class RunLog:
    """Where a run's human- and machine-readable records go: JSONL lines and TensorBoard scalars."""

    def __init__(
        self,
        out_dir: Path,
        resume_step: int | None = None,
        resume_epochs: int | None = None,
        resume_record: dict[str, Any] | None = None,
    ) -> None:
        """Open the run's logs; when resuming, make them read like the uninterrupted run up to the checkpoint.

        Args:
            out_dir: the run folder.
            resume_step: the checkpoint's global step; step lines after it (they will be trained again) go.
            resume_epochs: epochs the checkpoint holds; epoch lines after them go (resuming an older one).
            resume_record: the checkpoint's own epoch line, added back when a kill between writing the
                checkpoint and its line lost it.
        """
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = out_dir / "metrics.jsonl"
        if resume_step is not None:
            _keep_lines(out_dir / "steps.jsonl", "step", resume_step)
        if resume_epochs is not None:
            _keep_lines(self.jsonl, "epoch", resume_epochs, resume_record)
        self.steps = open_append(out_dir / "steps.jsonl")
        self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict[str, Any], step: int) -> None:
        append_text(self.jsonl, json.dumps(record) + "\n")
        for k, v in record.items():
            if isinstance(v, int | float) and k != "epoch":
                self.tb.add_scalar(k, v, step)
        self.tb.flush()
        self.steps.flush()

    def step(self, record: dict[str, float], step: int) -> None:
        """One optimiser step's losses and task weights: ``steps.jsonl`` and TensorBoard ``step/...``."""
        self.steps.write(json.dumps({"step": step, **record}) + "\n")
        for k, v in record.items():
            self.tb.add_scalar(f"step/{k}", v, step)

    def close(self) -> None:
        self.steps.close()
        self.tb.close()


def open_run_files(
    out: Path, cfg: Config, ckpt: dict[str, Any] | None, overwrite: bool, resume_step: int
) -> RunLog:
    """Make the run folder this run's, once its setup has succeeded: clear it for ``overwrite``, write
    ``config.yaml`` (unless resuming in a folder that has one), trim a resumed run's logs to its checkpoint
    ``ckpt`` (global step ``resume_step``) and open them."""
    if overwrite:
        clear_run_files(out)
    if ckpt is None or not (out / "config.yaml").is_file():  # a fresh run, or resumed into a new folder
        atomic_write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if ckpt is None:
        return RunLog(out)
    done = ckpt["epoch"] + 1 if ckpt.get("validated", True) else ckpt["epoch"]
    return RunLog(out, resume_step, done, ckpt.get("record"))


def _keep_lines(path: Path, key: str, last: int, record: dict[str, Any] | None = None) -> None:
    """Keep the complete lines of ``path`` whose ``key`` is at most ``last`` (a killed run may leave a torn
    last line); append ``record`` when its ``key`` equals ``last`` and no kept line has it."""
    kept, seen = [], set()
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            value = json.loads(line).get(key, last + 1)
            keep = value <= last
        except (json.JSONDecodeError, AttributeError, TypeError):
            continue
        if keep:
            kept.append(line + "\n")
            seen.add(value)
    if record is not None and record.get(key) == last and last not in seen:
        kept.append(json.dumps(record) + "\n")
    if kept or path.is_file():
        atomic_write_text(path, "".join(kept))  # the old file stays whole until the new one is complete


class Progress:
    """Progress over an iterable: a tqdm bar on a terminal; elsewhere a plain line to the log.

    tqdm shows nothing when its output is not a terminal (nohup, SLURM, CI), so there a line like
    ``epoch 3: 120/480 (25%) loss=0.512 lr=1.0e-03 [41 s, eta 123 s]`` is printed at every tenth of the way
    and at least every ``every_s`` seconds. Under torchrun only rank 0 reports.
    """

    def __init__(
        self, iterable: Iterable, desc: str, every_s: float = 30.0, stream: IO[str] | None = None
    ) -> None:
        self.iterable, self.desc, self.every_s = iterable, desc, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.postfix: dict[str, Any] = {}
        self.enabled = os.environ.get("RANK", "0") == "0"
        isatty = getattr(self.stream, "isatty", None)
        self.bar = None
        if self.enabled and callable(isatty) and isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(iterable, desc=desc, leave=False, mininterval=1.0, file=self.stream)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (``loss=..., lr=...``)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def __iter__(self) -> Iterator:
        if self.bar is not None or not self.enabled:
            yield from self.bar if self.bar is not None else self.iterable
            return
        start = last = time.perf_counter()
        tenth = math.ceil(self.total / 10) if self.total else 0
        for n, item in enumerate(self.iterable, 1):
            yield item
            now = time.perf_counter()
            if n == self.total or now - last >= self.every_s or (tenth and n % tenth == 0):
                print(self._line(n, now - start), file=self.stream, flush=True)
                last = now

    def _line(self, n: int, elapsed: float) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        if not self.total:
            return f"{self.desc}: {n}{extra} [{elapsed:.0f} s]"
        eta = elapsed / n * (self.total - n)
        done = f"{n}/{self.total} ({100 * n / self.total:.0f}%)"
        return f"{self.desc}: {done}{extra} [{elapsed:.0f} s, eta {eta:.0f} s]"


def out_of_memory_message(phase: Phase, cfg: Config, out: Path) -> str:
    """What to do when a training batch does not fit on the device."""
    crop = [max(1, round(c * phase.scale)) for c in cfg.data.crop]
    return (
        f"out of memory training phase {phase.index} (batch {phase.batch_size}, crops {crop[0]}x{crop[1]}): "
        "lower the batch size (train.batch_size or train.phases[i].batch_size), the crop (data.crop) or the "
        f"phase scale, or enable train.amp; the last completed epoch is in {out / 'last.pt'} (--resume)"
    )


def epoch_line(
    epoch: int, total: int, phase: Phase, stats: dict[str, float], summary: dict[str, float]
) -> str:
    """The line printed after every epoch: loss, each task's console metrics (``Task.console``), speed."""
    keys = [
        f"{name}/{m}"
        for name, t in TASKS.items()
        for m in (t.console or (t.headline,))
        if f"{name}/{m}" in summary
    ]
    metrics = "  ".join(f"{k} {summary[k]:.3f}" for k in keys)
    return (
        f"epoch {epoch + 1}/{total} [scale {phase.scale:g}, bs {phase.batch_size}] "
        f"loss {stats.get('loss/total', float('nan')):.3f} | {metrics} | {stats['images_per_s']:.1f} img/s, "
        f"{stats['train_seconds']:.0f} s"
    )
