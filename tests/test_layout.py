"""The package layout holds the design: no import cycles, and only task modules name a task."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CYCLES_TOOL = ROOT.parent / "shared" / "tools" / "import_cycles.py"
MAX_TASK_LITERALS = 25  # issue #13: string constants naming a task outside tasks/, datasets/, synth/


def test_no_import_cycles_among_package_modules() -> None:
    if not CYCLES_TOOL.is_file():
        pytest.skip(f"{CYCLES_TOOL} (the shared import-cycle checker) is not beside this checkout")
    run = subprocess.run(
        [sys.executable, str(CYCLES_TOOL), str(ROOT / "src"), "densemtl"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "0 import cycle" in run.stdout, run.stdout + run.stderr


def test_task_names_stay_inside_the_task_modules() -> None:
    tool = runpy.run_path(str(ROOT / "tools" / "task_literals.py"))
    names = tool["task_names"]()
    assert {"semseg", "depth", "normals"} <= names  # the counter sees every built-in task
    hits = tool["literals"](names)
    assert sum(len(v) for v in hits.values()) <= MAX_TASK_LITERALS, hits


def test_the_literal_counter_finds_planted_literals_and_skips_docstrings(tmp_path: Path) -> None:
    tool = runpy.run_path(str(ROOT / "tools" / "task_literals.py"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.py").write_text('KEY = "toy"\n')  # inside tasks/: allowed
    (tmp_path / "use.py").write_text(
        'def f(out):\n    """Reads out["toy"]."""\n    return out["toy"], "toy"\n'
    )
    assert tool["literals"]({"toy"}, tmp_path) == {"use.py": [(3, "toy"), (3, "toy")]}
