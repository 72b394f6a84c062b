"""The MTL study script end to end on its smoke preset, and its Δm / latency-goal bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "mtl_study.py"
THREE = ("semseg", "depth", "normals")


def _study():
    spec = importlib.util.spec_from_file_location("mtl_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mtl_study"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """One work folder for both smoke studies: the three-task study reuses the two-task study's runs."""
    return tmp_path_factory.mktemp("mtl_study_work")


SEG = {"semseg/miou": 0.5, "semseg/pixel_acc": 0.8, "weights": {}}
DEPTH = {"depth/abs_rel": 0.2, "depth/rmse": 5.0, "depth/delta1": 0.7, "weights": {}}
NORMALS = {
    "normals/mean_deg": 20.0,
    "normals/median_deg": 15.0,
    "normals/within_11_25": 0.4,
    "normals/within_22_5": 0.6,
    "weights": {},
}


def test_aggregate_delta_m_and_latency_goal() -> None:
    study = _study()
    seg, depth = SEG, DEPTH
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


def test_two_and_three_task_delta_m_and_latency_use_their_own_singles() -> None:
    study = _study()
    three = "mtl shared: a [semseg+depth+normals]"
    mixed = {**SEG, **DEPTH, **NORMALS, "semseg/miou": 0.55, "normals/mean_deg": 18.0}
    mixed["normals/within_11_25"] = 0.3  # +10% mIoU, 10% lower mean error (better), -25% within 11.25
    runs = {
        "single: semseg": [SEG, SEG],
        "single: depth": [DEPTH, DEPTH],
        "single: normals": [NORMALS, {**NORMALS, "normals/mean_deg": 18.0}],  # seed 1's single is as good
        "mtl shared: fixed": [{**SEG, **DEPTH, "semseg/miou": 0.45}] * 2,  # no normals: never asked for
        three: [mixed, mixed],
    }
    latency = {
        "single: semseg": {"torch_ms": 10.0, "ort_ms": 4.0},
        "single: depth": {"torch_ms": 10.0, "ort_ms": 4.0},
        "single: normals": {"torch_ms": 20.0},  # no ORT figure: no ORT ratio for models that need it
        "mtl shared": {"torch_ms": 11.0, "ort_ms": 4.0},
        "mtl shared [semseg+depth+normals]": {"torch_ms": 16.0, "ort_ms": 5.0},
    }
    table = study.aggregate(runs, latency)
    two, tri = table["mtl shared: fixed"], table[three]
    assert two["tasks"] == "semseg+depth" and tri["tasks"] == "semseg+depth+normals"
    assert two["delta_m"] == pytest.approx(-100 * 0.1 / 5)  # its five metrics vs semseg + depth singles
    assert not any(k.startswith("normals/") for k in two)
    per_seed = [100 * (0.1 + 0.1 - 0.25) / 9, 100 * (0.1 + 0.0 - 0.25) / 9]  # Δm over nine metrics
    assert tri["delta_m"] == pytest.approx(sum(per_seed) / 2)
    assert tri["delta_m_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))
    assert two["torch_vs_singles"] == pytest.approx(11 / 20) and two["ort_vs_singles"] == pytest.approx(0.5)
    assert tri["torch_vs_singles"] == pytest.approx(16 / 40) and "ort_vs_singles" not in tri
    assert not two["goal_met"] and not tri["goal_met"]  # Δm < 0 for both
    md = study.markdown(table, "t", study.PRESETS["smoke"], 60.0)
    assert "normals/mean_deg" in md and "tasks semseg, depth, normals" in md


def test_three_task_variants_names_folders_and_results() -> None:
    study = _study()
    smoke = study.PRESETS["smoke"]
    names = study.variants(smoke, THREE, ("fixed", "uncertainty"))
    suffix = " [semseg+depth+normals]"
    assert list(names)[:4] == ["single: semseg", "single: depth", "single: normals", "mtl shared: fixed"]
    assert {
        f"mtl shared: fixed{suffix}",
        f"mtl shared: uncertainty{suffix}",
        f"mtl split: fixed{suffix}",
    } <= set(names)
    assert not any("pcgrad" in n for n in names)
    assert names[f"mtl split: fixed{suffix}"][0] == "model.tasks=[semseg, depth, normals]"
    for name in names:
        single = name.removeprefix("single: ")
        expected = (single,) if single != name else THREE if name.endswith("]") else ("semseg", "depth")
        assert study.tasks_of(name) == expected, name
    assert study.architecture(f"mtl shared: fixed, imagenet{suffix}") == f"mtl shared{suffix}"
    assert study.architecture("mtl shared: fixed") == "mtl shared"
    # the shared runs are the two-task study's very folders (reused), the three-task ones are new
    two = study.variants(smoke)
    assert set(two) >= {"single: semseg", "single: depth", "mtl shared: fixed"}
    assert "model.tasks=[semseg, depth]" in names["mtl shared: fixed"]
    assert study.run_folder("mtl shared: fixed", 0) == "mtl_shared_fixed_s0"
    assert study.run_folder(f"mtl shared: fixed{suffix}", 1) == "mtl_shared_fixed_semseg+depth+normals_s1"
    assert study.results_stem("cpu", ("semseg", "depth"), study.PRESETS["cpu"].weightings) == "mtl_study_cpu"
    stem = study.results_stem("cpu", THREE, ("fixed", "uncertainty"))
    assert stem == "mtl_study_cpu_semseg-depth-normals_fixed-uncertainty"
    assert study.task_keys(["normals"]) == (
        "normals/mean_deg",
        "normals/median_deg",
        "normals/within_11_25",
        "normals/within_22_5",
    )


@pytest.mark.parametrize(
    "argv", [["--tasks", "semseg"], ["--tasks", "semseg,colour"], ["--weightings", "fixed,magic"]]
)
def test_bad_tasks_or_weightings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _study().parse_args(argv)


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, work) -> None:
    """Every variant trains, is evaluated and timed; JSON and Markdown are written (~40 s on 2 cores)."""
    study = _study()
    result = study.main(["--preset", "smoke", "--work", str(work), "--out", str(tmp_path)])
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


@pytest.mark.slow
def test_three_task_smoke_end_to_end(tmp_path, work) -> None:
    """Three singles, the two-task and the three-task models in one run, each Δm against its own singles
    (~1 min on 2 cores alone; less after the two-task smoke study, whose runs it reuses)."""
    study = _study()
    argv = ["--preset", "smoke", "--tasks", ",".join(THREE), "--weightings", "fixed"]
    study.main([*argv, "--work", str(work), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "mtl_study_smoke_semseg-depth-normals_fixed.json").read_text())
    table, suffix = saved["table"], " [semseg+depth+normals]"
    assert set(table) == set(study.variants(study.PRESETS["smoke"], THREE, ("fixed",)))
    assert {"single: semseg", "single: depth", "single: normals", "mtl shared: fixed"} <= set(table)
    assert {f"mtl shared: fixed{suffix}", f"mtl split: fixed{suffix}"} <= set(table)
    assert saved["tasks"] == list(THREE) and saved["config"]["weightings"] == ["fixed"]
    assert {f"mtl shared{suffix}", f"mtl split{suffix}", "mtl shared", "single: normals"} <= set(
        saved["latency"]
    )
    for name, row in table.items():
        assert row["params_m"] > 0 and row["images_per_s"] > 0 and row["torch_ms"] > 0, name
        if name.startswith("mtl"):
            assert math.isfinite(row["delta_m"]) and isinstance(row["goal_met"], bool), name
            assert 0.1 < row["torch_vs_singles"] < 2.0, name
    assert math.isfinite(table["single: normals"]["normals/mean_deg"])
    assert "normals/mean_deg" not in table["mtl shared: fixed"]
    assert math.isfinite(table[f"mtl shared: fixed{suffix}"]["normals/mean_deg"])
    md = (tmp_path / "mtl_study_smoke_semseg-depth-normals_fixed.md").read_text()
    assert all(f"| {name} |" in md for name in table)


def test_seeds_option_defaults_to_the_preset_and_parses_a_subset() -> None:
    study = _study()
    assert study.parse_args(["--preset", "cpu"]).seeds == study.PRESETS["cpu"].seeds
    assert study.parse_args(["--preset", "cpu", "--seeds", "0"]).seeds == (0,)
    assert study.parse_args(["--seeds", "3,1"]).seeds == (3, 1)
