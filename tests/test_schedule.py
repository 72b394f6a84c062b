"""Phases and the one-cycle cosine schedule."""

from __future__ import annotations

import pytest

from densemtl.config import PhaseConfig, TrainConfig
from densemtl.train.schedule import StepSchedule, one_cycle, phase_for_epoch, resolve_phases, total_epochs


def test_one_cycle_shape():
    assert one_cycle(0.0) == pytest.approx(0.04)
    assert one_cycle(0.1) == pytest.approx(1.0)
    assert one_cycle(1.0) == pytest.approx(1e-3)
    values = [one_cycle(i / 100) for i in range(101)]
    peak = values.index(max(values))
    assert all(a <= b + 1e-12 for a, b in zip(values[:peak], values[1:peak + 1], strict=True))  # rises
    assert all(a >= b - 1e-12 for a, b in zip(values[peak:-1], values[peak + 1:], strict=True))  # then falls


def test_phases_resolve_and_lookup():
    cfg = TrainConfig(phases=(PhaseConfig(0.25, 2, 16, 1e-3), PhaseConfig(0.5, 1, 8, 5e-4),
                              PhaseConfig(1.0, 3, 4, 2e-4)))
    phases = resolve_phases(cfg)
    assert total_epochs(phases) == 6
    assert [phase_for_epoch(phases, e).scale for e in range(6)] == [0.25, 0.25, 0.5, 1.0, 1.0, 1.0]
    with pytest.raises(IndexError):
        phase_for_epoch(phases, 6)
    single = resolve_phases(TrainConfig(epochs=4, batch_size=2, lr=0.1))
    assert len(single) == 1 and single[0].epochs == 4 and single[0].lr == 0.1


def test_step_schedule_restarts_each_phase_at_its_peak_lr():
    cfg = TrainConfig(lr=1e-3, phases=(PhaseConfig(0.5, 1, 8, 1e-3), PhaseConfig(1.0, 1, 8, 2e-4)))
    phases = resolve_phases(cfg)
    sched = StepSchedule(phases, [10, 20], base_lr=1e-3)
    lrs = [sched(s) * 1e-3 for s in range(30)]
    assert max(lrs[:10]) == pytest.approx(1e-3, rel=0.05)
    assert max(lrs[10:]) == pytest.approx(2e-4, rel=0.05)
    assert lrs[9] < 1e-4 and lrs[10] < lrs[12]  # annealed at the end of phase 0, warming up in phase 1


def test_invalid_phase_is_rejected():
    with pytest.raises(ValueError, match=r"train.phases\[0\]"):
        resolve_phases(TrainConfig(phases=(PhaseConfig(0.5, 0, 8, 1e-3),)))
