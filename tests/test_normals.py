"""Surface normals task: unit head, cosine/angular loss, angular-error metrics, baseline, parity, encoding, and
the camera-frame convention pinned against depth (exact synthetic renders) and through a mirror."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from densemtl.data.format import decode_normals
from densemtl.data.transforms import hflip_sample
from densemtl.synth.render import render_sample
from densemtl.tasks.normals import (
    NORMALS,
    NormalsHead,
    NormalsLoss,
    NormalsMetrics,
    angular_error_deg,
    normals_from_depth,
)

FACING = (0.0, 0.0, -1.0)  # a surface straight ahead, facing the camera


def tilted(deg: float, axis: str = "y") -> list[float]:
    """``FACING`` turned by ``deg`` degrees about the camera's y (or x) axis: exactly ``deg`` away from it."""
    s, c = math.sin(math.radians(deg)), math.cos(math.radians(deg))
    return [s, 0.0, -c] if axis == "y" else [0.0, s, -c]


def field(vectors: list[list[float]]) -> torch.Tensor:
    """(1, 3, 1, N) tensor holding one vector per pixel."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, -1)


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle between (..., 3) unit-vector arrays, float64 degrees."""
    return np.degrees(np.arccos(np.clip((a.astype(np.float64) * b).sum(-1), -1.0, 1.0)))


def rotation(axis: list[float], deg: float) -> torch.Tensor:
    """(3, 3) rotation by ``deg`` degrees about ``axis`` (Rodrigues)."""
    k = torch.tensor(axis, dtype=torch.float64)
    k = k / k.norm()
    kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    t = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(t) * kx + (1 - math.cos(t)) * kx @ kx


def random_normals(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """(B, 3, H, W) random unit vectors."""
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(shape, generator=g)
    return n / n.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------ head
@pytest.mark.parametrize("features", ["zeros", "random"])
def test_head_outputs_unit_vectors_with_finite_gradients(features: str) -> None:
    torch.manual_seed(0)
    head = NormalsHead(8)
    x = torch.zeros(2, 8, 5, 7) if features == "zeros" else torch.randn(2, 8, 5, 7)
    x.requires_grad_(True)
    out = head(x, (20, 28))
    assert out.shape == (2, 3, 20, 28)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 20, 28), atol=1e-5)
    target = random_normals((2, 3, 20, 28))
    NormalsLoss("angular")(out, target).backward()
    grads = [x.grad] + [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert head.out.weight.grad.abs().sum() > 0  # the loss reaches the head


def test_head_is_safe_when_its_raw_output_is_exactly_zero() -> None:
    head = NormalsHead(4)
    with torch.no_grad():
        head.out.bias.zero_()  # with zero features the 1x1 conv then outputs exactly (0, 0, 0)
    x = torch.zeros(1, 4, 3, 3, requires_grad=True)
    out = head(x, (6, 6))
    assert torch.isfinite(out).all()
    for kind in ("cosine", "angular"):
        head.zero_grad()
        x.grad = None
        NormalsLoss(kind)(head(x, (6, 6)), random_normals((1, 3, 6, 6))).backward()
        assert all(torch.isfinite(p.grad).all() for p in head.parameters()) and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize(
    ("kind", "expected"),
    [("cosine", (1.0 + 0.5 + 2.0) / 3), ("angular", (math.pi / 2 + math.pi / 3 + math.pi) / 3)],
)
def test_loss_hand_computed_and_invalid_pixels_ignored(kind: str, expected: float) -> None:
    # errors of 90, 60 and 180 degrees on valid pixels; the last pixel's target is invalid (0, 0, 0)
    pred = field(
        [[3.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]]
    )  # lengths do not matter
    target = field([list(FACING), tilted(60), list(FACING), [0.0, 0.0, 0.0]])
    assert NormalsLoss(kind)(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_angular_loss_is_exact_for_small_angles() -> None:
    pred, target = field([tilted(0.01)]), field([list(FACING)])  # acos of a float32 cosine would give 0
    assert NormalsLoss("angular")(pred, target).item() == pytest.approx(math.radians(0.01), rel=1e-3)
    assert NormalsLoss("angular")(target, target).item() == 0.0


@pytest.mark.parametrize("kind", ["cosine", "angular"])
def test_loss_pools_valid_pixels_and_drops_masked_samples(kind: str) -> None:
    # sample 0: one valid pixel at 90 degrees; sample 1: three valid pixels at 0 degrees
    target = torch.zeros(2, 3, 1, 3)
    target[0, :, 0, 0] = torch.tensor(FACING)
    target[1] = torch.tensor(FACING).view(3, 1, 1)
    pred = torch.zeros(2, 3, 1, 3)
    pred[0] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    pred[1] = torch.tensor(FACING).view(3, 1, 1)
    per_pixel = 1.0 if kind == "cosine" else math.pi / 2
    loss = NormalsLoss(kind)
    assert loss(pred, target).item() == pytest.approx(per_pixel / 4, rel=1e-5)  # pooled, not per-sample means
    assert loss(pred, target, torch.tensor([True, False])).item() == pytest.approx(per_pixel, rel=1e-5)
    assert loss(pred, target, torch.tensor([False, True])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "angular"])
@pytest.mark.parametrize("case", ["no valid pixel", "all samples masked"])
def test_loss_is_zero_with_zero_gradients_when_nothing_is_valid(kind: str, case: str) -> None:
    pred = torch.cat([torch.zeros(1, 3, 4, 4), torch.randn(1, 3, 4, 4)]).requires_grad_(
        True
    )  # zeros included
    target = torch.zeros(2, 3, 4, 4) if case == "no valid pixel" else random_normals((2, 3, 4, 4))
    mask = None if case == "no valid pixel" else torch.tensor([False, False])
    loss = NormalsLoss(kind)(pred, target, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


@pytest.mark.parametrize("kind", ["cosine", "angular"])
def test_loss_gradients_finite_at_zero_exact_and_opposite_predictions(kind: str) -> None:
    target = field([list(FACING)] * 3)
    pred = field([[0.0, 0.0, 0.0], list(FACING), [0.0, 0.0, 1.0]]).requires_grad_(True)
    loss = NormalsLoss(kind)(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_loss_rejects_unknown_kind_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="unknown normals loss"):
        NormalsLoss("l2")
    with pytest.raises(ValueError, match="does not match"):
        NormalsLoss()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_hand_computed() -> None:
    errors = [5.0, 10.0, 20.0, 25.0, 40.0, 90.0]
    pred = field([tilted(e, "y" if i % 2 else "x") for i, e in enumerate(errors)] + [[1.0, 0.0, 0.0]])
    target = field([list(FACING)] * len(errors) + [[0.0, 0.0, 0.0]])  # the last pixel is invalid
    m = NormalsMetrics()
    m.update(pred, target)
    r = m.compute()
    assert r["pixels"] == 6
    assert r["mean_deg"] == pytest.approx(np.mean(errors), abs=1e-4)
    assert r["median_deg"] == pytest.approx(22.5, abs=0.01)  # even count: mean of the middle two (20, 25)
    assert r["rmse_deg"] == pytest.approx(math.sqrt(np.mean(np.square(errors))), abs=1e-4)
    assert (r["within_11_25"], r["within_22_5"], r["within_30"]) == pytest.approx((2 / 6, 3 / 6, 4 / 6))
    assert (
        len(r["cdf"]) == 180 and r["cdf"][9] == pytest.approx(1 / 6) and r["cdf"][-1] == 1.0
    )  # under 10, 180
    m.update(field([tilted(60)]), field([list(FACING)]))  # 7 errors: the median is the 4th, 25
    assert m.compute()["median_deg"] == pytest.approx(25.0, abs=0.01)


def test_metrics_merge_of_halves_equals_whole_and_empty_is_nan() -> None:
    pred, target = random_normals((4, 3, 6, 8), seed=1), random_normals((4, 3, 6, 8), seed=2)
    target[:, :, :2] = 0  # some invalid pixels
    whole, a, b = NormalsMetrics(), NormalsMetrics(), NormalsMetrics()
    whole.update(pred, target)
    a.update(pred[:2], target[:2])
    b.update(pred[2:], target[2:])
    a.merge(b)
    ra, rw = a.compute(), whole.compute()
    assert rw["pixels"] == 4 * 4 * 8
    for key in rw:
        assert ra[key] == pytest.approx(rw[key], rel=1e-12), key
    empty = NormalsMetrics().compute()
    assert empty["pixels"] == 0 and math.isnan(empty["mean_deg"]) and math.isnan(empty["median_deg"])


def test_angular_error_is_float64_and_orientation_free() -> None:
    err = angular_error_deg(field([tilted(33.0)]) * 5, field([list(FACING)]))
    assert err.dtype == torch.float64 and err.item() == pytest.approx(33.0, abs=1e-5)


# ------------------------------------------------------------------------------- baseline and parity
def test_fit_baseline_is_the_normalised_mean_of_valid_training_normals() -> None:
    a = torch.zeros(3, 1, 8)
    a[:, 0, :7] = torch.tensor(FACING).view(3, 1)
    a[:, 0, 3] = torch.tensor([1.0, 0.0, 0.0])  # seven facing, one pointing right, one invalid
    b = torch.zeros(3, 2, 2)
    b[1] = -1.0  # four floor pixels (y up)
    stats = NORMALS.fit_baseline([a, b], cfg=None)
    mean = np.array([1.0, -4.0, -6.0])
    assert stats["mean_normal"] == pytest.approx(list(mean / np.linalg.norm(mean)), abs=1e-9)
    out = NORMALS.baseline_output(stats, torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 3, 4, 5) and torch.allclose(out[1, :, 3, 4], torch.tensor(stats["mean_normal"]))
    assert NORMALS.fit_baseline([torch.zeros(3, 2, 2)], cfg=None)["mean_normal"] == list(FACING)


@pytest.mark.parametrize(("deg", "passed"), [(0.0, True), (0.1, True), (1.0, False)])
def test_parity_passes_equal_outputs_and_fails_a_one_degree_rotation(deg: float, passed: bool) -> None:
    ref = random_normals((2, 3, 8, 8))
    got = torch.einsum("ij,bjhw->bihw", rotation([0.3, -1.0, 0.5], deg), ref.double()).float()
    figures, ok = NORMALS.parity(ref, got)
    assert ok is passed
    assert figures["normals_max_err_deg"] == pytest.approx(deg, abs=0.01)


# ----------------------------------------------------------------------------- encoding and mirroring
def test_encode_rejects_nan_and_wrong_shapes_and_stores_directions() -> None:
    with pytest.raises(ValueError, match="NaN"):
        NORMALS.encode(np.full((2, 2, 3), np.nan, np.float32))
    for shape in [(4, 4), (4, 4, 4), (4, 4, 3, 1)]:
        with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
            NORMALS.encode(np.zeros(shape, np.float32))
    n = random_normals((1, 3, 4, 4))[0].permute(1, 2, 0).numpy()
    n[0, 0] = 0.0
    raw = NORMALS.encode(3.0 * n)  # too long: the direction is stored, not a clipped vector
    assert raw.dtype == np.uint8 and (raw[0, 0] == 0).all()
    back = decode_normals(raw)
    assert (back[0, 0] == 0).all() and angles_deg(back.reshape(-1, 3)[1:], n.reshape(-1, 3)[1:]).max() < 1.0


def test_flip_negates_x_of_one_target_and_of_a_batch() -> None:
    n = random_normals((2, 3, 4, 5))
    for t in (n[0], n):
        f = NORMALS.flip(t)
        assert torch.equal(f[..., 0, :, :], -t[..., 0, :, :]) and torch.equal(
            f[..., 1:, :, :], t[..., 1:, :, :]
        )


def test_hflip_sample_mirrors_pixels_and_negates_x() -> None:
    n = random_normals((1, 3, 4, 6))[0]
    sample = {"image": torch.rand(3, 4, 6), "normals": n, "intrinsics": torch.tensor([5.0, 5.0, 2.0, 1.5])}
    out = hflip_sample(sample)["normals"]
    mirrored = n.flip(-1)
    assert torch.equal(out[0], -mirrored[0]) and torch.equal(out[1:], mirrored[1:])


# ------------------------------------------------------------------- the convention, pinned by geometry
def test_normals_from_depth_is_exact_on_a_plane_and_masks_edges() -> None:
    k = (60.0, 62.0, 19.5, 15.0)
    n = np.array([0.3, -0.8, -0.5])
    n /= np.linalg.norm(n)  # faces the camera (n_z < 0) and tilts up, like a floor seen from above
    v, u = np.mgrid[0:32, 0:40].astype(np.float64)
    rays = np.stack([(u - k[2]) / k[0], (v - k[3]) / k[1], np.ones_like(u)], -1)
    depth = -2.0 / (rays @ n)  # the plane n . P = -2: 2 m from the camera
    depth[:, 30:] = 0.7 * depth[:, 30:]  # a depth step (an edge) at column 30
    est, mask = normals_from_depth(depth, k)
    assert mask[1:-1, 1:29].all() and mask[1:-1, 31:-1].all()  # both sides of the step are planes
    assert not mask[:, 29:31].any()  # the stencil straddles the step
    assert not (mask[[0, -1]].any() or mask[:, [0, -1]].any())  # no full stencil at the border
    assert angles_deg(est[mask], n).max() < 1e-6 and (est[~mask] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_renderer_normals_agree_with_normals_from_its_depth(seed: int) -> None:
    s = render_sample(seed, "val", 0, (96, 160))
    est, planar = normals_from_depth(s["depth"], s["meta"]["intrinsics"])
    assert planar.mean() > 0.3 and not planar[s["depth"] == 0].any()  # enough planar pixels; never sky
    err = angles_deg(est[planar], s["normals"][planar])
    assert np.median(err) < 2.0 and np.percentile(err, 95) < 2.0  # measured: median 0.0, 99th pct < 0.1


def test_mirrored_sample_normals_still_agree_with_its_depth() -> None:
    """Mirroring is a physical operation: the flipped normals must match normals from the flipped depth."""
    s = render_sample(0, "val", 0, (96, 160))
    sample = {
        "image": torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255,
        "depth": torch.from_numpy(s["depth"])[None],
        "normals": torch.from_numpy(s["normals"]).permute(2, 0, 1),
        "intrinsics": torch.tensor(s["meta"]["intrinsics"], dtype=torch.float32),
    }
    out = hflip_sample(sample)
    est, planar = normals_from_depth(out["depth"][0].numpy(), out["intrinsics"].tolist())
    flipped = out["normals"].permute(1, 2, 0).numpy()
    assert planar.mean() > 0.3 and np.median(angles_deg(est[planar], flipped[planar])) < 2.0
