"""The MTL study script end to end on its smoke preset, and its Δm / latency-goal bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "mtl_study.py"


def _study():
    spec = importlib.util.spec_from_file_location("mtl_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtl_study"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_aggregate_delta_m_and_latency_goal() -> None:
    study = _study()
    seg = {"semseg/miou": 0.5, "semseg/pixel_acc": 0.8, "weights": {}}
    depth = {"depth/abs_rel": 0.2, "depth/rmse": 5.0, "depth/delta1": 0.7, "weights": {}}
    better = {**seg, **depth, "semseg/miou": 0.55, "weights": {"weight/semseg": 1.0}}
    worse = {**seg, **depth, "depth/abs_rel": 0.3, "weights": {}}
    runs = {
        "single: semseg": [seg],
        "single: depth": [depth],
        "mtl shared: a": [better],
        "mtl split: b": [worse],
    }
    latency = {
        "single: semseg": {"torch_ms": 10.0, "ort_ms": 5.0},
        "single: depth": {"torch_ms": 10.0, "ort_ms": 5.0},
        "mtl shared": {"torch_ms": 11.0, "ort_ms": 5.5},
        "mtl split": {"torch_ms": 15.0, "ort_ms": 7.0},
    }
    table = study.aggregate(runs, latency)
    shared, split = table["mtl shared: a"], table["mtl split: b"]
    assert shared["delta_m"] == pytest.approx(100 * 0.1 / 5)  # +10% mIoU on one of five metrics
    assert split["delta_m"] == pytest.approx(-100 * 0.5 / 5)  # AbsRel 50% worse (lower is better)
    assert shared["torch_vs_singles"] == pytest.approx(0.55) and shared["ort_vs_singles"] == pytest.approx(
        0.55
    )
    assert split["ort_vs_singles"] == pytest.approx(0.7)
    assert shared["goal_met"] and not split["goal_met"]
    assert "Goal (≤ 0.6x latency and Δm ≥ 0) met by: mtl shared: a" in study.markdown(
        table, "t", study.PRESETS["smoke"], 60.0
    )


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path) -> None:
    """Every variant trains, is evaluated and timed; JSON and Markdown are written (~30 s on 2 cores)."""
    study = _study()
    result = study.main(["--preset", "smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mtl_study_smoke.json").read_text())
    expected = set(study.variants(study.PRESETS["smoke"]))
    assert set(saved["table"]) == expected == set(result["table"])
    assert {"single: semseg", "single: depth", "mtl shared: pcgrad", "mtl split: fixed"} <= expected
    assert set(saved["latency"]) == {"single: semseg", "single: depth", "mtl shared", "mtl split"}
    for name, row in saved["table"].items():
        assert row["params_m"] > 0 and row["images_per_s"] > 0 and row["torch_ms"] > 0, name
        if name.startswith("mtl"):
            assert math.isfinite(row["delta_m"]) and isinstance(row["goal_met"], bool), name
            assert 0.2 < row["torch_vs_singles"] < 2.0, name
    md = (tmp_path / "mtl_study_smoke.md").read_text()
    assert all(f"| {name} |" in md for name in expected)
