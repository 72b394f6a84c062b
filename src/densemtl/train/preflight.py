"""Checks a training run makes before its first step, so that a mistake costs seconds instead of an epoch.

The dataset's ignore index and the files of both splits: every
validation sample goes through the loader's own checks (``validate_sample``: decoding, sizes, bit depths, class
ids), because the validation split is first read only after an epoch of training; every training sample gets a
quick pass (each file decodes, every target has its image's size), a few seconds for thousands of samples. The
loader checks training files fully as it reads them; ``densemtl data check`` checks everything up front.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from densemtl.data.folder import load_intrinsics, meta_path, task_path, validate_sample
from densemtl.data.format import DatasetFormatError, decoded_size
from densemtl.tasks import IGNORE_INDEX, TASKS

log = logging.getLogger("densemtl")

_SHOWN = 3  # problems quoted in the error; the count says how many there are


def check_ignore_index(info: dict[str, Any], root: str | Path) -> None:
    """Refuse a dataset whose ``ignore_index`` is not the 255 every loss and metric ignores."""
    if info.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise DatasetFormatError(
            f"{Path(root) / 'dataset.json'}: ignore_index is {info['ignore_index']} but densemtl's losses and "
            f"metrics ignore {IGNORE_INDEX}: relabel the void pixels to {IGNORE_INDEX} and set ignore_index to "
            f"{IGNORE_INDEX}"
        )


def quick_problems(image_path: Path, tasks: tuple[str, ...], info: dict[str, Any] | None = None) -> list[str]:
    """Problems of one sample found without decoding its targets fully: unreadable files, mismatched sizes
    (each task's :meth:`~densemtl.tasks.base.Task.quick_check`)."""
    try:
        size = decoded_size(image_path)
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBomb...)
        return [
            f"{image_path}: cannot decode image ({type(e).__name__}: {e}); the file is corrupt or truncated"
        ]
    problems = []
    for task in tasks:
        path = task_path(image_path, task)
        if path.is_file():
            problems += TASKS[task].quick_check(path, size, info or {})
    try:
        load_intrinsics(meta_path(image_path))
    except DatasetFormatError as e:
        problems.append(str(e))
    return problems


def check_split_files(dataset: Any, full: bool) -> None:
    """Check every sample of a ``FolderDataset`` (``full``: the loader's own checks); raise naming the files."""
    start = time.perf_counter()
    problems: list[str] = []
    for path in dataset.image_paths:
        if full:
            problems += validate_sample(path, dataset.info, dataset.tasks)
        else:
            problems += quick_problems(path, dataset.tasks, dataset.info)
    seconds = time.perf_counter() - start
    log.info("checked %d %s samples in %.1f s", len(dataset.image_paths), dataset.split, seconds)
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise DatasetFormatError(
            f"{len(problems)} problem(s) in split '{dataset.split}' found before training: "
            f"{'; '.join(problems[:_SHOWN])}{more}; run `densemtl data check {dataset.root}` for the full "
            "report, then fix or remove those samples"
        )


def check_before_training(cfg: Any, info: dict[str, Any], train_set: Any, val_set: Any) -> None:
    """What would otherwise stop a run after its first epoch (or mid-epoch), checked now.

    ``train.best_metric`` is checked by ``densemtl.metrics.check_best_metric``, also called by the setup.
    """
    check_ignore_index(info, cfg.data.root)
    check_split_files(val_set, full=True)
    check_split_files(train_set, full=False)
