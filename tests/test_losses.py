"""Per-task losses: valid-pixel masking, asymmetric batches, each loss against a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densemtl.config import Config, LossConfig, ModelConfig
from densemtl.tasks.depth import DEPTH_LOSSES, DEPTH_SPACES, DepthLoss, berhu, depth_transform
from densemtl.tasks.semseg import SEG_LOSSES, SegLoss
from densemtl.train.losses import WEIGHTINGS, FixedWeighting
from densemtl.train.losses import build_loss as _build_loss


def build_loss(loss: LossConfig, tasks: tuple[str, ...], num_classes: int):
    """The loss of a config with these loss settings, tasks and classes."""
    return _build_loss(Config(loss=loss, model=ModelConfig(tasks=tasks, num_classes=num_classes)))


C = 4


def _outputs(b: int = 2, h: int = 8, w: int = 8, seed: int = 0, std: bool = False) -> dict[str, torch.Tensor]:
    """Random outputs; ``std`` adds the depth head's uncertainty channel (std of ln depth)."""
    g = torch.Generator().manual_seed(seed)
    depth = torch.rand(b, 1, h, w, generator=g) * 20 + 0.5
    if std:
        depth = torch.cat([depth, torch.rand(b, 1, h, w, generator=g) * 0.5 + 0.05], dim=1)
    return {"semseg": torch.randn(b, C, h, w, generator=g).requires_grad_(), "depth": depth.requires_grad_()}


def _targets(b: int = 2, h: int = 8, w: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, C, (b, h, w), generator=g)
    seg[:, 0, :] = 255  # some ignored pixels in every sample
    depth = torch.rand(b, 1, h, w, generator=g) * 30 + 0.5
    depth[:, :, :, 0] = 0.0  # some invalid pixels in every sample
    return {"semseg": seg, "depth": depth}


@pytest.mark.parametrize("seg", SEG_LOSSES)
@pytest.mark.parametrize("depth", DEPTH_LOSSES)
def test_nothing_valid_gives_exact_zero_and_zero_grads(seg: str, depth: str) -> None:
    for space in DEPTH_SPACES:
        loss = build_loss(LossConfig(semseg=seg, depth=depth, depth_space=space), ("semseg", "depth"), C)
        out = _outputs(std=space == "log" or depth.endswith("_nll"))  # also the std's side loss of l1 etc.
        batch = {"semseg": torch.full((2, 8, 8), 255), "depth": torch.zeros(2, 1, 8, 8)}
        terms = loss(out, batch)
        assert terms["semseg"].item() == 0.0 and terms["depth"].item() == 0.0 and terms["total"].item() == 0.0
        terms["total"].backward()
        for t in out.values():
            assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


def test_samples_flagged_unlabelled_contribute_nothing() -> None:
    loss = build_loss(LossConfig(), ("semseg", "depth"), C)
    out, batch = _outputs(), _targets()  # pixels are labelled, but the flags say no sample has labels
    batch["valid_tasks"] = {"semseg": torch.tensor([False, False]), "depth": torch.tensor([False, False])}
    terms = loss(out, batch)
    assert terms["total"].item() == 0.0


@pytest.mark.parametrize("seg,depth", [("ce", "l1"), ("bce", "mse"), ("dice", "berhu"), ("ce+dice", "silog")])
@pytest.mark.parametrize("use_flags", [True, False])
def test_asymmetric_batch_equals_the_labelled_sample_alone(seg: str, depth: str, use_flags: bool) -> None:
    loss = build_loss(LossConfig(semseg=seg, depth=depth, depth_space="log"), ("semseg", "depth"), C)
    out, full = _outputs(), _targets()
    batch = {"semseg": full["semseg"].clone(), "depth": full["depth"].clone()}
    if use_flags:  # labels still present in the pixels: only the flags say to skip them
        batch["valid_tasks"] = {"semseg": torch.tensor([True, False]), "depth": torch.tensor([False, True])}
    else:  # sample 0: segmentation only, sample 1: depth only, said by the pixels
        batch["semseg"][1] = 255
        batch["depth"][0] = 0.0
    terms = loss(out, batch)
    seg_alone = loss.losses["semseg"](out["semseg"][:1], full["semseg"][:1])
    depth_alone = loss.losses["depth"](out["depth"][1:], full["depth"][1:])
    torch.testing.assert_close(terms["semseg"], seg_alone)
    torch.testing.assert_close(terms["depth"], depth_alone)
    assert seg_alone.item() > 0 and depth_alone.item() > 0


def test_ce_matches_pytorch_and_ignored_pixels_get_no_gradient() -> None:
    out, batch = _outputs(), _targets()
    ours = SegLoss("ce", C)(out["semseg"], batch["semseg"])
    ref = F.cross_entropy(out["semseg"], batch["semseg"], ignore_index=255)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    assert (out["semseg"].grad[:, :, 0, :] == 0).all()  # row 0 is ignored
    assert (out["semseg"].grad[:, :, 1:, :] != 0).any()


def test_class_weights_hand_example() -> None:
    # two pixels, two classes; log-softmax of [0, 0] is ln(1/2) for both classes, of [2, 0] is [-ln(1+e^-2), ..]
    logits = torch.tensor([[0.0, 2.0], [0.0, 0.0]]).view(1, 2, 1, 2)  # pixel 0: [0, 0], pixel 1: [2, 0]
    target = torch.tensor([[[0, 1]]])
    nll0 = math.log(2.0)  # class 0 at pixel 0
    nll1 = 2.0 + math.log(1 + math.exp(-2.0))  # class 1 at pixel 1: logsumexp(2, 0) - 0
    unweighted = SegLoss("ce", 2)(logits, target)
    assert unweighted.item() == pytest.approx((nll0 + nll1) / 2, rel=1e-6)
    w = torch.tensor([1.0, 3.0])
    weighted = SegLoss("ce", 2, w)(logits, target)
    assert weighted.item() == pytest.approx((1 * nll0 + 3 * nll1) / 4, rel=1e-6)
    assert weighted.item() > unweighted.item()  # the costly pixel is the up-weighted class
    ref = F.cross_entropy(logits, target, weight=w)
    torch.testing.assert_close(weighted, ref)


def test_class_weights_wrong_length_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="3 values but the dataset has 4 classes"):
        build_loss(LossConfig(class_weights=(1.0, 2.0, 3.0)), ("semseg",), C)
    loss = build_loss(LossConfig(class_weights=(1.0, 2.0, 3.0, 4.0)), ("semseg",), C)
    out, batch = _outputs(), _targets()
    ref = F.cross_entropy(
        out["semseg"], batch["semseg"], weight=torch.tensor([1.0, 2, 3, 4]), ignore_index=255
    )
    torch.testing.assert_close(loss(out, batch)["semseg"], ref)


def test_bce_is_mean_one_vs_all_over_valid_pixels() -> None:
    logits = torch.tensor([[1.0, -1.0], [0.5, 2.0], [3.0, 3.0]]).T.reshape(1, 2, 1, 3)  # pixels (C=2,)
    target = torch.tensor([[[0, 1, 255]]])
    sp = lambda x: math.log(1 + math.exp(x))  # noqa: E731  softplus: -log(sigmoid(-x))
    # pixel 0 (logits 1, -1, class 0): -log s(1) - log(1 - s(-1)) = sp(-1) + sp(-1)
    # pixel 1 (logits 0.5, 2, class 1): -log(1 - s(0.5)) - log s(2) = sp(0.5) + sp(-2)
    expected = ((sp(-1) + sp(-1)) / 2 + (sp(0.5) + sp(-2)) / 2) / 2
    assert SegLoss("bce", 2)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_hand_example() -> None:
    # rows are classes, columns pixels: pixel 0 has probs [.5, .5], pixel 1 has [.75, .25]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    # class 0: inter = .5 + .75, sums = 1.25 + 2; class 1: inter = 0, sums = .75 + 0 (smooth = 1)
    d0 = (2 * 1.25 + 1) / (3.25 + 1)
    d1 = (0 + 1) / (0.75 + 1)
    dice = SegLoss("dice", 2)(logits, target)
    assert dice.item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)
    both = SegLoss("ce+dice", 2)(logits, target)
    assert both.item() == pytest.approx(dice.item() + SegLoss("ce", 2)(logits, target).item(), rel=1e-6)


def test_berhu_is_l1_below_c_and_quadratic_above() -> None:
    r = torch.tensor([0.1, -0.3, 0.4, 1.0, -2.0])  # c = 0.2 * 2 = 0.4
    got = berhu(r, torch.ones(5, dtype=torch.bool))
    expected = [0.1, 0.3, 0.4, (1.0 + 0.16) / 0.8, (4.0 + 0.16) / 0.8]
    torch.testing.assert_close(got, torch.tensor(expected))
    target = torch.ones(1, 1, 1, 6)
    target[..., -1] = 0.0  # the huge residual is on an invalid pixel: it must not set c
    pred = (1 + torch.tensor([0.1, -0.3, 0.4, 1.0, -0.9, 50.0])).view(1, 1, 1, 6)
    loss = DepthLoss("berhu", space="metres")(pred, target)
    c = 0.2 * 1.0  # from the largest valid residual
    hand = [
        0.1,
        (0.09 + c * c) / (2 * c),
        (0.16 + c * c) / (2 * c),
        (1.0 + c * c) / (2 * c),
        (0.81 + c * c) / (2 * c),
    ]
    assert loss.item() == pytest.approx(sum(hand) / 5, rel=1e-5)


def test_blog_transform_and_l1_in_blog_space() -> None:
    d = torch.tensor([0.5, 10.0, 80.0, 200.0])
    expected = torch.tensor([math.log(0.5), math.log(10.0), math.log(80.0), math.log(80.0)]) / 5
    torch.testing.assert_close(depth_transform(d, "blog", clip=80.0), expected)
    torch.testing.assert_close(depth_transform(d, "log"), d.log())
    torch.testing.assert_close(depth_transform(d, "metres"), d)
    pred = torch.tensor([1.0, 20.0, 300.0]).view(1, 1, 1, 3)
    gt = torch.tensor([2.0, 10.0, 100.0]).view(1, 1, 1, 3)  # both beyond the clip on the last pixel -> 0
    hand = (abs(math.log(1 / 2)) + abs(math.log(20 / 10)) + 0.0) / 5 / 3
    assert DepthLoss("l1", space="blog", clip=80.0)(pred, gt).item() == pytest.approx(hand, rel=1e-6)


def test_mse_and_l1_in_metres_and_log() -> None:
    pred = torch.tensor([2.0, 3.0, 9.0]).view(1, 1, 1, 3)
    gt = torch.tensor([1.0, 3.0, 0.0]).view(1, 1, 1, 3)  # last pixel invalid
    assert DepthLoss("l1", space="metres")(pred, gt).item() == pytest.approx(0.5)
    assert DepthLoss("mse", space="metres")(pred, gt).item() == pytest.approx(0.5)
    assert DepthLoss("mse", space="log")(pred, gt).item() == pytest.approx(math.log(2) ** 2 / 2, rel=1e-6)


def test_silog_hand_value_and_scale_invariance() -> None:
    g = torch.Generator().manual_seed(3)
    gt = torch.rand(2, 1, 6, 6, generator=g) * 10 + 1
    pred = gt * torch.exp(0.3 * torch.randn(2, 1, 6, 6, generator=g))
    gt[0, 0, 0] = 0.0  # invalid row
    valid = gt > 0
    d = (pred.log() - gt.clamp_min(1e-3).log())[valid].double()
    hand = 10 * math.sqrt(float((d**2).mean() - 0.85 * d.mean() ** 2))
    assert DepthLoss("silog")(pred, gt).item() == pytest.approx(hand, rel=1e-5)
    invariant = DepthLoss("silog", silog_lambda=1.0)
    torch.testing.assert_close(invariant(pred * 3.7, gt), invariant(pred, gt), rtol=1e-4, atol=1e-5)
    assert DepthLoss("silog")(pred * 3.7, gt).item() > hand  # lambda < 1 keeps some scale supervision
    # silog always works in log space, whatever depth_space says
    torch.testing.assert_close(DepthLoss("silog", space="metres")(pred, gt), DepthLoss("silog")(pred, gt))


def test_total_is_weighted_sum_and_missing_weights_are_one() -> None:
    loss = build_loss(LossConfig(weights={"semseg": 2.5}), ("semseg", "depth"), C)
    terms = loss(_outputs(), _targets())
    torch.testing.assert_close(terms["total"], 2.5 * terms["semseg"] + terms["depth"])
    assert loss.weighting.current_weights() == {"semseg": 2.5, "depth": 1.0}
    only_depth = build_loss(LossConfig(), ("depth",), C)  # the default weights also name semseg: fine
    terms = only_depth(_outputs(), _targets())
    assert set(terms) == {"depth", "total"}
    assert isinstance(only_depth.weighting, FixedWeighting) and "fixed" in WEIGHTINGS


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("semseg", "focal", "ce\\+dice"),
        ("depth", "huber", "berhu"),
        ("depth_space", "disparity", "blog"),
        ("weighting", "nash_mtl", "fixed"),
        ("weights", {"edges": 1.0}, "known tasks"),
    ],
)
def test_unknown_names_are_clear_errors(field: str, value: object, match: str) -> None:
    cfg = LossConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        build_loss(cfg, ("semseg", "depth"), C)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        SegLoss("ce", C)(torch.randn(1, C, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
