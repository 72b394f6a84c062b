"""What a training run leaves behind for people and tools: JSONL records, TensorBoard scalars, console lines.

``metrics.jsonl`` holds one line per epoch (mean losses, task weights, speed, validation metrics), ``steps.jsonl``
one line per optimiser step (task losses and weights: adaptive weightings change them every step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densemtl.config import Config
from densemtl.fileio import append_text, atomic_write_text, open_append
from densemtl.tasks import TASKS
from densemtl.train.schedule import Phase


class RunLog:
    """Where a run's human- and machine-readable records go: JSONL lines and TensorBoard scalars."""

    def __init__(self, out_dir: Path, resume_step: int | None = None) -> None:
        """``resume_step``: the checkpoint's global step when resuming; step lines written after it by the
        interrupted run (they will be trained again) are dropped, so the file reads like an uninterrupted run."""
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = out_dir / "metrics.jsonl"
        if resume_step is not None:
            _truncate_steps(out_dir / "steps.jsonl", resume_step)
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


def _truncate_steps(path: Path, last_step: int) -> None:
    """Keep the complete lines of ``path`` up to ``last_step`` (a killed run may leave a torn last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", last_step + 1) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))  # the old file stays whole until the new one is complete


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
