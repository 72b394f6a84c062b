"""Progressive-resolution phases and the one-cycle cosine learning-rate schedule.

Training may run in phases (e.g. 1/4, 1/2, then full resolution), each with its own epochs, batch size and peak
LR; inside each phase the LR follows a one-cycle cosine curve (warm up, then anneal). The schedule is a pure
function of the global step, so resuming from a checkpoint reproduces it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from densemtl.config import Config, TrainConfig


@dataclass(frozen=True)
class Phase:
    """A resolved phase: ``scale`` of the crop size, epochs [first_epoch, first_epoch + epochs)."""

    index: int
    scale: float
    epochs: int
    batch_size: int
    lr: float
    first_epoch: int


def resolve_phases(train: TrainConfig) -> list[Phase]:
    """The config's phases, or a single full-resolution phase built from epochs/batch_size/lr."""
    raw = train.phases or ()
    if not raw:
        return [Phase(0, 1.0, train.epochs, train.batch_size, train.lr, 0)]
    phases, first = [], 0
    for i, p in enumerate(raw):
        if p.epochs < 1 or p.batch_size < 1 or p.lr <= 0 or not 0 < p.scale <= 4:
            raise ValueError(
                f"train.phases[{i}] is invalid ({p}); epochs/batch_size >= 1, lr > 0, 0 < scale <= 4"
            )
        phases.append(Phase(i, p.scale, p.epochs, p.batch_size, p.lr, first))
        first += p.epochs
    return phases


def total_epochs(phases: list[Phase]) -> int:
    """Number of epochs across all phases."""
    return sum(p.epochs for p in phases)


def phase_for_epoch(phases: list[Phase], epoch: int) -> Phase:
    """The phase that contains ``epoch`` (0-based)."""
    for p in phases:
        if p.first_epoch <= epoch < p.first_epoch + p.epochs:
            return p
    raise IndexError(f"epoch {epoch} is past the last phase")


def one_cycle(t: float, warmup: float = 0.1, start: float = 0.04, end: float = 1e-3) -> float:
    """One-cycle cosine factor at progress ``t`` in [0, 1]: start -> 1 over ``warmup``, then 1 -> end."""
    t = min(max(t, 0.0), 1.0)
    if t < warmup:
        return start + (1.0 - start) * (1.0 - math.cos(math.pi * t / warmup)) / 2.0
    u = (t - warmup) / max(1.0 - warmup, 1e-8)
    return end + (1.0 - end) * (1.0 + math.cos(math.pi * u)) / 2.0


class StepSchedule:
    """Global-step -> LR multiplier for ``torch.optim.lr_scheduler.LambdaLR``.

    ``steps_per_epoch[i]`` is the number of optimiser steps in one epoch of phase i. The multiplier is relative to
    ``base_lr`` (the optimiser's configured LR), so param groups with an LR multiplier keep their ratio.
    """

    def __init__(self, phases: list[Phase], steps_per_epoch: list[int], base_lr: float) -> None:
        self.bounds: list[tuple[int, int, float]] = []  # (first step, steps, peak lr) per phase
        first = 0
        for p, n in zip(phases, steps_per_epoch, strict=True):
            self.bounds.append((first, p.epochs * n, p.lr))
            first += p.epochs * n
        self.base_lr = base_lr

    def __call__(self, step: int) -> float:
        for first, n, peak in self.bounds:
            if step < first + n:
                return peak / self.base_lr * one_cycle((step - first) / max(n, 1))
        first, n, peak = self.bounds[-1]
        return peak / self.base_lr * one_cycle(1.0)


def eval_scale(cfg: Config) -> float:
    """Input scale for evaluation and prediction: ``data.eval_scale``, or else the last phase's scale."""
    return cfg.data.eval_scale if cfg.data.eval_scale > 0 else resolve_phases(cfg.train)[-1].scale
