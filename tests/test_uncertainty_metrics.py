"""Uncertainty metrics against hand-computed cases and an exact sort: sparsification (AUSE/AURG), calibration
(ECE/NLL/Brier), temperature and std-scale fits, and their plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densemtl.tasks.uncertainty_metrics import (
    Calibration,
    Sparsification,
    fit_std_scale,
    fit_temperature,
)
from densemtl.viz.uncertainty_plots import plot_reliability, plot_sparsification


def _scalars(r: dict) -> dict[str, float]:
    return {k: v for k, v in r.items() if isinstance(v, float)}


def _depth(pred: np.ndarray, s: np.ndarray, gt: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D arrays -> (1, 2, 1, N) prediction (depth, s) and (1, 1, 1, N) target."""
    p = torch.from_numpy(np.stack([pred, s]).astype(np.float64))[None, :, None]
    return p, torch.from_numpy(gt.astype(np.float64))[None, None, None]


def _random_scene(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth in [1, 80] m; predictions whose log error has std ~ s (a noisy, informative uncertainty)."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(1, 80, n)
    s = np.exp(rng.normal(np.log(0.1), 0.6, n))
    pred = np.clip(gt * np.exp(s * np.exp(rng.normal(0, 0.5, n)) * rng.normal(0, 1, n)), 1e-3, 80)
    return pred, s, gt


def _run(pred: np.ndarray, s: np.ndarray, gt: np.ndarray, **kw) -> dict:
    acc = Sparsification(**kw)
    acc.update(*_depth(pred, s, gt))
    return acc.compute()


# --------------------------------------------------------------------------------------------- sparsification
def test_sparsification_hand_computed_curves_with_a_reversed_ranking() -> None:
    # 4 valid pixels (gt 1 m) + 3 skipped ones (gt 0, NaN, beyond max_depth); s ranks the best pixel as the worst
    gt = np.array([1.0, 1.0, 1.0, 1.0, 0.0, np.nan, 90.0])
    pred = np.array([1.1, 1.2, 1.3, 1.5, 5.0, 5.0, 5.0])
    s = np.array([0.4, 0.3, 0.2, 0.1, 9.0, 9.0, 9.0])
    r = _run(pred, s, gt, intervals=4)
    c = r["sparsification"]
    assert c["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # AbsRel 0.1, 0.2, 0.3, 0.5: the model removes 0.1 first, the oracle 0.5 first; every curve ends at 0
    assert c["abs_rel"]["model"] == pytest.approx([0.275, 1 / 3, 0.4, 0.5, 0.0])
    assert c["abs_rel"]["oracle"] == pytest.approx([0.275, 0.2, 0.15, 0.1, 0.0])
    assert c["abs_rel"]["random"] == pytest.approx([0.275] * 4 + [0.0])
    area = lambda y: 0.25 * (y[0] / 2 + y[1] + y[2] + y[3] + y[4] / 2)  # noqa: E731
    model, oracle = [0.275, 1 / 3, 0.4, 0.5, 0], [0.275, 0.2, 0.15, 0.1, 0]
    assert r["ause_abs_rel"] == pytest.approx(area(model) - area(oracle))  # 0.1958
    assert r["aurg_abs_rel"] == pytest.approx(area([0.275] * 4 + [0]) - area(model))  # -0.1021 < 0
    # RMSE ranked by depth * s = 0.44, 0.36, 0.26, 0.15 (also reversed); squared errors 0.01, 0.04, 0.09, 0.25
    assert c["rmse"]["model"] == pytest.approx(np.sqrt([0.39 / 4, 0.38 / 3, 0.34 / 2, 0.25, 0]).tolist())
    assert c["rmse"]["oracle"] == pytest.approx(np.sqrt([0.39 / 4, 0.14 / 3, 0.05 / 2, 0.01, 0]).tolist())
    # delta1 outliers (ratio >= 1.25): the last two pixels
    assert c["delta1"]["model"] == pytest.approx([0.5, 2 / 3, 1.0, 1.0, 0.0])
    assert c["delta1"]["oracle"] == pytest.approx([0.5, 1 / 3, 0.0, 0.0, 0.0])
    assert all(r[f"aurg_{m}"] < 0 for m in ("abs_rel", "rmse", "delta1"))
    json.dumps(r)  # JSON-able as it is


def test_tied_uncertainties_give_up_a_linear_share() -> None:
    # two tied pairs: s = 0.5 for AbsRel 0.2, 0.6 and s = 0.1 for AbsRel 0.1, 0.3; removing 1 of 4 pixels takes
    # half of the top pair (the expectation over random tie-breaking), not all or none of it
    gt = np.ones(4)
    r = _run(np.array([1.2, 1.6, 1.1, 1.3]), np.array([0.5, 0.5, 0.1, 0.1]), gt, intervals=4)
    assert r["sparsification"]["abs_rel"]["model"] == pytest.approx([0.3, (0.4 + 0.4) / 3, 0.2, 0.2, 0.0])


def test_perfect_ranking_gives_zero_ause() -> None:
    pred, _, gt = _random_scene(20_000, seed=0)
    rel, err = np.abs(pred - gt) / gt, np.abs(pred - gt)
    assert _run(pred, rel, gt)["ause_abs_rel"] == 0.0  # same bins as the oracle's histogram: exactly 0
    r = _run(pred, 3 * rel, gt)  # proportional: other bin edges, still ~0 against an AbsRel of ~0.1
    assert abs(r["ause_abs_rel"]) < 1e-4 * r["sparsification"]["abs_rel"]["random"][0]
    assert r["aurg_abs_rel"] > 0.03
    r = _run(pred, 2 * err / pred, gt)  # std in metres = pred * s = 2 |error|: the RMSE oracle's ranking
    assert abs(r["ause_rmse"]) < 1e-3 * r["sparsification"]["rmse"]["random"][0]


def test_constant_uncertainty_is_the_random_curve() -> None:
    pred, _, gt = _random_scene(5_000, seed=1)
    relative = _run(pred, np.full_like(pred, 0.2), gt)  # constant s: AbsRel and delta1 rank by it
    metres = _run(pred, 0.5 / pred, gt)  # constant std in metres (pred * s = 0.5): RMSE ranks by it
    for m, r in (("abs_rel", relative), ("delta1", relative), ("rmse", metres)):
        assert abs(r[f"aurg_{m}"]) < 1e-9
        assert r["sparsification"][m]["model"] == pytest.approx(r["sparsification"][m]["random"], rel=1e-12)
        assert r[f"ause_{m}"] > 0  # the oracle still does better


def test_reversed_ranking_has_negative_aurg() -> None:
    pred, _, gt = _random_scene(5_000, seed=2)
    r = _run(pred, gt / np.maximum(np.abs(pred - gt), 1e-9), gt)  # s = 1 / AbsRel: most certain where worst
    assert r["aurg_abs_rel"] < 0 and r["aurg_rmse"] < 0 and r["aurg_delta1"] < 0


def _exact(pred: np.ndarray, s: np.ndarray, gt: np.ndarray, intervals: int = 50) -> dict[str, float]:
    """AUSE and AURG by sorting every pixel (the reference the histograms approximate)."""
    err = np.abs(pred - gt)
    ratio = np.maximum(pred / gt, gt / pred)
    x = np.linspace(0, 1, intervals + 1)
    n = len(pred)

    def curve(values: np.ndarray, rank: np.ndarray, root: bool) -> np.ndarray:
        v = values[np.argsort(-rank, kind="stable")]
        y = np.array([v[round(f * n) :].mean() for f in x[:-1]] + [0.0])
        return np.sqrt(y) if root else y

    out = {}
    for m, values, rank, oracle_rank, root in (
        ("abs_rel", err / gt, s, err / gt, False),
        ("rmse", err**2, pred * s, err, True),
        ("delta1", (ratio >= 1.25).astype(float), s, ratio, False),
    ):
        model, oracle = curve(values, rank, root), curve(values, oracle_rank, root)
        random = np.append(np.full(intervals, np.sqrt(values.mean()) if root else values.mean()), 0.0)
        area = lambda y: float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)  # noqa: E731
        out[f"ause_{m}"], out[f"aurg_{m}"] = area(model) - area(oracle), area(random) - area(model)
    return out


def test_histograms_match_an_exact_sort() -> None:
    pred, s, gt = _random_scene(50_000, seed=3)
    got, want = _scalars(_run(pred, s, gt)), _exact(pred, s, gt)
    assert got == pytest.approx(want, rel=0.01)
    assert want["ause_rmse"] > 0.5 and want["aurg_abs_rel"] > 0.01  # a case where the numbers mean something


def test_sparsification_merge_of_halves_equals_whole() -> None:
    pred, gt = _depth(*_random_scene(4_000, seed=4))
    whole, a, b = Sparsification(), Sparsification(), Sparsification()
    whole.update(pred, gt)
    a.update(pred[..., :1500], gt[..., :1500])
    b.update(pred[..., 1500:], gt[..., 1500:])
    a.merge(b)
    for k, v in whole.state().items():
        if v.dtype == torch.int64:
            assert torch.equal(a.state()[k], v), k
        else:
            assert torch.allclose(a.state()[k], v, rtol=1e-12, atol=0), k
    assert _scalars(a.compute()) == pytest.approx(_scalars(whole.compute()), rel=1e-10)


def test_sparsification_without_uncertainty_or_data_is_empty() -> None:
    acc = Sparsification()
    assert acc.compute() == {}
    acc.update(torch.full((2, 1, 4, 4), 5.0), torch.full((2, 1, 4, 4), 4.0))  # a model without an std channel
    assert acc.compute() == {}
    acc.update(torch.full((1, 2, 4, 4), 5.0), torch.zeros(1, 1, 4, 4))  # no valid ground truth
    assert acc.compute() == {}
    with pytest.raises(ValueError, match="does not match"):
        acc.update(torch.ones(1, 2, 4, 4), torch.ones(1, 1, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, 1 or 2, H, W\)"):
        acc.update(torch.ones(1, 3, 4, 4), torch.ones(1, 1, 4, 4))


# ------------------------------------------------------------------------------------------------ calibration
def _calibration_case() -> tuple[torch.Tensor, torch.Tensor]:
    """6 pixels of 2 classes: p = (0.9, 0.1) right and wrong, 0.7 right twice, one ignored, one id out of range."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3], [0.5, 0.5], [0.99, 0.01]])
    logits = probs.double().log().T.reshape(1, 2, 2, 3)  # softmax(log p) = p
    target = torch.tensor([0, 1, 1, 0, 255, 7]).reshape(1, 2, 3)
    return logits, target


def test_calibration_hand_computed() -> None:
    acc = Calibration(num_classes=2)
    acc.update(*_calibration_case())
    r = acc.compute()
    assert r["pixels"] == 4
    # bins of width 1/15: 0.9 -> bin 13 (acc 1/2, conf 0.9), 0.7 -> bin 10 (acc 1, conf 0.7)
    assert r["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.7))  # 0.35
    assert r["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.7)) / 4)
    assert r["brier"] == pytest.approx(
        (0.02 + 1.62 + 0.18 + 0.18) / 4
    )  # 2 * 0.1^2, 2 * 0.9^2, 2 * 0.3^2, ...
    rel = r["reliability"]
    assert len(rel["edges"]) == 16 and rel["edges"][0] == 0.0 and rel["edges"][-1] == 1.0
    assert rel["count"] == [0] * 10 + [2, 0, 0, 2, 0]
    assert rel["accuracy"][13] == pytest.approx(0.5) and rel["confidence"][10] == pytest.approx(0.7)
    assert rel["accuracy"][0] is None and rel["confidence"][14] is None  # empty bins: JSON null


def test_calibration_empty_and_merge() -> None:
    empty = Calibration(num_classes=3).compute()
    assert math.isnan(empty["ece"]) and math.isnan(empty["nll"]) and math.isnan(empty["brier"])
    assert empty["pixels"] == 0
    g = torch.Generator().manual_seed(5)
    logits, target = torch.randn(4, 3, 8, 8, generator=g) * 3, torch.randint(0, 3, (4, 8, 8), generator=g)
    target[0, :2] = 255
    whole, a, b = Calibration(3), Calibration(3), Calibration(3)
    whole.update(logits, target)
    a.update(logits[:1], target[:1])
    b.update(logits[1:], target[1:])
    a.merge(b)
    assert _scalars(a.compute()) == pytest.approx(_scalars(whole.compute()), rel=1e-12)
    assert a.compute()["reliability"]["count"] == whole.compute()["reliability"]["count"]
    with pytest.raises(ValueError, match="logits"):
        whole.update(torch.randn(1, 4, 8, 8), target[:1])


# ------------------------------------------------------------------------------------------------------ fits
def _calibrated_logits(n: int = 40_000, c: int = 5, seed: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from their own softmax: calibrated at T = 1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 2
    return z, torch.multinomial(z.softmax(dim=1), 1, generator=g)[:, 0]


def test_fit_temperature_undoes_over_and_under_confidence() -> None:
    z, y = _calibrated_logits()
    t = fit_temperature(3 * z, y)  # over-confident
    assert t == pytest.approx(3.0, rel=0.05)
    assert F.cross_entropy(3 * z / t, y) < F.cross_entropy(3 * z, y)
    t = fit_temperature(z / 3, y)  # under-confident
    assert t < 1 and t == pytest.approx(1 / 3, rel=0.05)
    assert fit_temperature(1000 * z, y) == pytest.approx(20.0)  # stays within its bounds
    with pytest.raises(ValueError, match="no pixels"):
        fit_temperature(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be in"):
        fit_temperature(z, torch.full_like(y, 255))


@pytest.mark.parametrize("dist", ["laplace", "gaussian"])
def test_fit_std_scale_recovers_a_factor_two(dist: str) -> None:
    g = torch.Generator().manual_seed(7)
    std = 0.05 + 0.2 * torch.rand(100_000, generator=g, dtype=torch.float64)  # the true std of ln depth
    if dist == "gaussian":
        r = std * torch.randn(100_000, generator=g, dtype=torch.float64)
    else:  # Laplace with scale b = std / sqrt(2), by inverse CDF
        u = torch.rand(100_000, generator=g, dtype=torch.float64) - 0.5
        r = -std / math.sqrt(2) * u.sign() * torch.log1p(-2 * u.abs())
    assert fit_std_scale(r, std / 2, dist) == pytest.approx(2.0, rel=0.05)
    assert fit_std_scale(r, std, dist) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="no pixels"):
        fit_std_scale(r[:0], std[:0], dist)
    with pytest.raises(ValueError, match="'gaussian' or 'laplace'"):
        fit_std_scale(r, std, "cauchy")


# ------------------------------------------------------------------------------------------------------ plots
def test_plots_write_png_files(tmp_path: Path) -> None:
    curves = _run(*_random_scene(2_000, seed=8))["sparsification"]
    cal = Calibration(num_classes=2)
    cal.update(*_calibration_case())
    reliability = json.loads(
        json.dumps(cal.compute()["reliability"]).replace("NaN", "null")
    )  # None for empty
    for path in (plot_sparsification(curves, tmp_path / "sparsification.png"),
                 plot_reliability(reliability, tmp_path / "sub" / "reliability.png", title="semseg")):  # fmt: skip
        data = path.read_bytes()
        assert path.parent.is_dir() and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
