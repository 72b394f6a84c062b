#!/usr/bin/env python3
"""Count the string constants that name a task outside tasks/, datasets/ and synth/ (docstrings excluded).

Usage: ``python tools/task_literals.py [-v]`` from the repository root. Issue #13's design rule: only the task
modules (and the dataset converters and the renderer, which produce task files) name a task; everything else
loops over ``model.tasks``. The remaining literals are listed with ``-v``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "densemtl"
ALLOWED = {"tasks", "datasets", "synth"}


def task_names() -> set[str]:
    """Names of the built-in tasks, read from the task modules' ``name = "..."`` class attributes."""
    names = set()
    for path in (PACKAGE / "tasks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    target = stmt.targets[0] if isinstance(stmt, ast.Assign) and stmt.targets else None
                    if (
                        isinstance(target, ast.Name)
                        and target.id == "name"
                        and isinstance(stmt.value, ast.Constant)
                    ):
                        names.add(stmt.value.value)
    return {n for n in names if n}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def literals(names: set[str] | None = None, package: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    """``{relative file: [(line, name), ...]}`` for every task-name string constant outside the allowed folders."""
    names = names or task_names()
    hits: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.parts[0] in ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        found = [
            (node.lineno, node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs
        ]
        if found:
            hits[str(rel)] = sorted(found)
    return hits


def main() -> int:
    hits = literals()
    for rel, found in sorted(hits.items(), key=lambda kv: -len(kv[1])):
        where = " ".join(f"{line}:{name}" for line, name in found) if "-v" in sys.argv else ""
        print(f"{len(found):4d} {rel} {where}")
    print(f"total {sum(len(v) for v in hits.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
