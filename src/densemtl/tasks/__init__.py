"""What a task is: its name, what the network outputs for it, and which sample key holds its target.

Everything in densemtl is keyed by these names (model outputs, losses, metrics, checkpoints). Adding a task
(normals, edges) means adding an entry here, a head, a loss and a metric; the training loop does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = 255  # segmentation pixels with this id carry no label
INVALID_DEPTH = 0.0  # depth pixels with this value carry no measurement


@dataclass(frozen=True)
class TaskSpec:
    """Static facts about one dense prediction task."""

    name: str
    description: str
    dense_kind: str  # "classes" (per-pixel ids) or "regression" (per-pixel values)


TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semseg", "semantic segmentation: per-pixel class logits (B, C, H, W)", "classes"),
    "depth": TaskSpec("depth", "metric depth in metres (B, 1, H, W), 0 = invalid in targets", "regression"),
}


def out_channels(task: str, num_classes: int) -> int:
    """Channels a head must produce for ``task``."""
    if task == "semseg":
        if num_classes < 2:
            raise ValueError(f"semseg needs at least 2 classes, got num_classes={num_classes}")
        return num_classes
    if task == "depth":
        return 1
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")


def check_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a task list and return it as a tuple (order preserved)."""
    if not tasks:
        raise ValueError("at least one task is needed, e.g. tasks: [semseg, depth]")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    return tuple(tasks)
