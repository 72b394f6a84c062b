"""The multi-task loss: each task's own loss (owned by its module in ``densemtl.tasks``) plus the weighting.

Every task's term is ``sum over valid pixels / max(count, 1)``: a batch in which no pixel is labelled for a task gives
exactly 0 with zero gradients (never NaN), and samples that lack a task's label (asymmetric annotations, see
``batch["valid_tasks"]``) contribute nothing to that task. ``build_loss`` is the only function that reads
``LossConfig``; the pieces receive plain arguments. Task weightings live in ``densemtl.train.weighting``
(re-exported here).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densemtl.config import Config
from densemtl.tasks import TASKS, check_tasks
from densemtl.tasks.base import masked_mean  # noqa: F401 (public here too)
from densemtl.train.weighting import WEIGHTINGS, FixedWeighting, TaskWeighting, build_weighting  # noqa: F401


def _sample_mask(batch: dict, task: str, like: Tensor) -> Tensor:
    """(B,) bool: which samples carry labels for ``task`` (all True when the batch does not say)."""
    valid = batch.get("valid_tasks", {}).get(task)
    if valid is None:
        return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
    return torch.as_tensor(valid, dtype=torch.bool, device=like.device).reshape(-1)


# ------------------------------------------------------------------------------------------------ combined
class MultiTaskLoss(nn.Module):
    """Per-task losses plus their weighted total.

    Args:
        losses: ``{task: module}``; each module is called as ``module(pred, target, sample_mask)``.
        weighting: turns the per-task terms into ``"total"``.
    """

    def __init__(self, losses: dict[str, nn.Module], weighting: TaskWeighting) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weighting = weighting

    def forward(self, outputs: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """``{task: scalar, ..., "total": scalar}`` from model outputs and a collated batch."""
        terms: dict[str, Tensor] = {}
        for task, loss_fn in self.losses.items():
            if task not in outputs or task not in batch:
                raise KeyError(f"task {task!r} needs outputs[{task!r}] and batch[{task!r}]")
            pred = outputs[task]
            terms[task] = loss_fn(pred, batch[task].to(pred.device), _sample_mask(batch, task, pred))
        terms["total"] = self.weighting(terms)
        return terms


def build_loss(cfg: Config) -> MultiTaskLoss:
    """The multi-task loss for ``cfg.model.tasks``: each task's own loss (``Task.make_loss``) and the weighting."""
    tasks = check_tasks(cfg.model.tasks)
    losses = {t: TASKS[t].make_loss(cfg) for t in tasks}
    lc = cfg.loss
    return MultiTaskLoss(losses, build_weighting(lc.weighting, tasks, lc.weights, lc.weighting_args))
