"""The tasks densemtl knows, in one plain dict from name to :class:`~densemtl.tasks.base.Task`.

Everything is keyed by these names (model outputs, sample dicts, losses, metrics, checkpoints, ONNX outputs).
A task is a plug-in: subclass ``Task`` in one module and add an instance here (or, from your own code,
``TASKS["mytask"] = MyTask()`` before building a model); see docs/tasks.md.
"""

from __future__ import annotations

from densemtl.tasks.base import IGNORE_INDEX, INVALID_DEPTH, Task
from densemtl.tasks.depth import DEPTH
from densemtl.tasks.normals import NORMALS
from densemtl.tasks.objects import OBJECTS
from densemtl.tasks.semseg import SEMSEG

TASKS: dict[str, Task] = {SEMSEG.name: SEMSEG, DEPTH.name: DEPTH, NORMALS.name: NORMALS, OBJECTS.name: OBJECTS}

__all__ = ["IGNORE_INDEX", "INVALID_DEPTH", "TASKS", "Task", "check_tasks", "get_task"]


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name is an error that lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def check_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a task list and return it as a tuple (order preserved)."""
    if not tasks:
        raise ValueError("at least one task is needed, e.g. model.tasks: [semseg, depth]")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"model.tasks lists a task twice: {list(tasks)}")
    return tuple(tasks)
