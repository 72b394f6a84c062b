"""The accuracy-per-millisecond benchmarks: real-frame loading, the capacity test and the Pareto bookkeeping.

Smoke runs only (a few steps on tiny inputs): the benchmarks' figures come from ``benchmarks/real_fit.py`` and
``benchmarks/pareto.py`` themselves, never from timed assertions here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densemtl.config import ModelConfig
from densemtl.models import build_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SHARED = Path(__file__).resolve().parents[2] / "shared"
needs_real = pytest.mark.skipif(
    not (SHARED / "data" / "nyu_label13").is_dir() or not (SHARED / "weights").is_dir(),
    reason="../shared/data and ../shared/weights sit beside the checkout",
)


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_every_variant_builds_and_default_is_model_config_default() -> None:
    variants = _load("variants")
    base = variants.variant_config("default", "mobilenet_v3_large")
    fields = ("decoder", "decoder_channels", "decoder_taper", "crp_stages", "head", "head_channels")
    assert all(getattr(base, f) == getattr(ModelConfig(), f) for f in fields)
    x = torch.rand(1, 3, 64, 64)
    for name in variants.VARIANTS:
        model = build_model(variants.variant_config(name, "mobilenet_v3_small", num_classes=4)).eval()
        with torch.no_grad():
            out = model(x)
        assert out["semseg"].shape == (1, 4, 64, 64) and torch.isfinite(out["depth"]).all(), name


@needs_real
def test_real_frames_are_metric_and_labelled() -> None:
    real_fit = _load("real_fit")
    frames = real_fit.load_frames(scale=0.125)
    assert len(frames) == 6
    for f in frames:
        assert f["image"].shape == (3, 60, 80) and f["image"].min() >= 0 and f["image"].max() <= 1
        ids = set(np.unique(f["semseg"].numpy()).tolist())
        assert ids <= set(range(13)) | {255} and len(ids - {255}) >= 3  # real scenes hold several classes
        valid = f["depth"][f["depth"] > 0]
        assert valid.numel() > 0.5 * f["depth"].numel() and valid.min() > 0.3 and valid.max() < 11  # metres


@needs_real
@pytest.mark.slow
def test_real_fit_smoke_trains_both_models_and_writes_json(tmp_path: Path) -> None:
    real_fit = _load("real_fit")
    out = tmp_path / "fit.json"
    args = ["--steps", "12", "--frames", "2", "--batch", "2", "--scale", "0.125", "--lr", "3e-3"]
    result = real_fit.main([*args, "--variants", "default", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == {"plain", "default"}
    for name, r in result["results"].items():
        assert 0 <= r["semseg/miou"] <= 1 and r["train_images_per_s"] > 0, name
    assert math.isfinite(result["results"]["default"]["depth/abs_rel"])
    assert result["results"]["plain"]["semseg/miou"] > 0.15  # 12 steps on 2 frames: it learned something


def test_pareto_front_rank_correlation_and_table() -> None:
    pareto = _load("pareto")
    pts = {"a": (10.0, 0.5), "b": (20.0, 0.7), "c": (25.0, 0.6), "d": (30.0, 0.8)}
    assert pareto.pareto_front(pts) == ["a", "b", "d"]  # c is slower and worse than b
    assert pareto.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pareto.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    lat = {f"mobilenet_v2 {n}": {"params_m": 1.0, "gflops": 2.0, "ort_ms": ms, "vs_lraspp": ms / 40}
           for n, (ms, _) in zip(("default", "paper256"), ((10.0, 0), (30.0, 0)), strict=True)}  # fmt: skip
    lat[pareto.REFERENCE] = {"params_m": 3.2, "gflops": 1.0, "ort_ms": 40.0, "vs_lraspp": 1.0}
    fit = {"plain": {"semseg/miou": 0.8}, "default": {"semseg/miou": 0.6, "depth/abs_rel": 0.1},
           "paper256": {"semseg/miou": 0.75, "depth/abs_rel": 0.08}}  # fmt: skip
    syn = {"default": {"semseg/miou": 0.4, "depth/abs_rel": 0.3}, "paper256": {"semseg/miou": 0.5,
           "depth/abs_rel": 0.2}}  # fmt: skip
    result = pareto.report({"latency": lat, "fit": fit, "synthetic": syn})
    assert result["pareto_front_real_fit"] == ["default", "paper256"]
    table = result["markdown"].splitlines()
    assert table[0].startswith("| variant") and any(r.startswith("| paper256 |") and "0.750" in r for r in table)
    assert any("plain loop" in r and "0.800" in r for r in table)


@pytest.mark.export
def test_pareto_latency_smoke(tmp_path: Path) -> None:
    pareto = _load("pareto")
    lat = pareto.measure_latency(["mobilenet_v3_small"], ["default"], (64, 64), threads=1, runs=1)
    assert set(lat) == {"mobilenet_v3_small default", pareto.REFERENCE}
    assert all(v["ort_ms"] > 0 and v["gflops"] > 0 for v in lat.values())
    assert lat[pareto.REFERENCE]["vs_lraspp"] == 1.0


def test_presets_load_build_and_default_is_model_config() -> None:
    from densemtl.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    presets = {n: load_config(configs / f"{n}.yaml").model for n in ("realtime", "default", "accurate", "paper")}
    assert presets["default"] == ModelConfig()  # the file says what `densemtl train` builds with no config
    assert presets["realtime"].backbone == "mobilenet_v3_small" and not presets["accurate"].decoder_taper
    params = {}
    for name, mc in presets.items():
        model = build_model(dataclasses.replace(mc, num_classes=4))
        params[name] = sum(p.numel() for p in model.parameters())
    assert params["realtime"] < params["default"] < params["accurate"] < params["paper"]
