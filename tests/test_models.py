"""Model zoo tests: every backbone x decoder x sharing, decoder blocks, weights, freezing, depth heads, table."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from densemtl.config import ModelConfig
from densemtl.models import BACKBONES, DECODERS, build_model
from densemtl.models import backbones as bb
from densemtl.models.decoders import ASPP, CRP, LWRefineNet, UNet, max_pool5
from densemtl.models.zoo import describe, format_model_table
from densemtl.tasks.depth import DEPTH_PARAMS, DepthHead, depth_from_raw, raw_for_depth

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenet_v2_imagenet_features.pth"
SMALL = dict(num_classes=5, decoder_channels=16, min_depth=0.5, max_depth=50.0)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never touch the network: any connection attempt fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(bb.socket, "create_connection", refuse)


def _cfg(**changes) -> ModelConfig:
    return ModelConfig(**{**SMALL, **changes})


@pytest.mark.parametrize("sharing", ["shared", "split"])
@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_model_forward_backward_odd_sizes_and_state_dict(
    backbone: str, decoder: str, sharing: str
) -> None:
    torch.manual_seed(0)
    cfg = _cfg(backbone=backbone, decoder=decoder, sharing=sharing)
    model = build_model(cfg)
    assert model.tasks == ("semseg", "depth")
    assert len(model.decoders) == (1 if sharing == "shared" else 2)

    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert set(out) == {"semseg", "depth"}
    # depth: metres and the std of ln depth (model.uncertainty is on by default)
    assert out["semseg"].shape == (2, 5, 64, 64) and out["depth"].shape == (2, 2, 64, 64)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["depth"][:, 0].min() >= cfg.min_depth and out["depth"][:, 0].max() <= cfg.max_depth
    assert out["depth"][:, 1].min() > 0
    (out["semseg"].square().mean() + out["depth"].log().mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    model.eval()
    odd = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        y = model(odd)
        assert y["semseg"].shape == (1, 5, 97, 130) and y["depth"].shape == (1, 2, 97, 130)
        torch.manual_seed(1)
        clone = build_model(cfg).eval()
        clone.load_state_dict(model.state_dict())
        y2 = clone(odd)
    for task in model.tasks:
        torch.testing.assert_close(y2[task], y[task], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_channels_and_strides(name: str) -> None:
    backbone = BACKBONES[name]().eval()
    assert backbone.strides == (4, 8, 16, 32)
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 70, 96))
    assert [f.shape[1] for f in feats] == list(backbone.out_channels)
    assert [tuple(f.shape[-2:]) for f in feats] == [
        (math.ceil(70 / s), math.ceil(96 / s)) for s in backbone.strides
    ]


def test_aspp_and_transposed_unet_on_odd_sizes() -> None:
    for decoder, upsample in (("unet", "transposed"), ("lwrefinenet", "bilinear")):
        cfg = _cfg(backbone="mobilenet_v3_small", decoder=decoder, upsample=upsample, aspp=True)
        model = build_model(cfg).eval()
        assert isinstance(next(iter(model.decoders.values())).context, ASPP)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 97, 130))
        assert out["semseg"].shape == (1, 5, 97, 130) and torch.isfinite(out["semseg"]).all()
    with pytest.raises(ValueError, match="upsample"):
        build_model(_cfg(decoder="lwrefinenet", upsample="transposed"))


def test_fast_max_pool_equals_max_pool2d() -> None:
    x = torch.randn(2, 7, 23, 30)
    torch.testing.assert_close(max_pool5(x), nn.MaxPool2d(5, 1, 2)(x), rtol=0, atol=0)
    x = -torch.rand(1, 3, 9, 11)  # all negative: the padding must act like -inf, not 0
    torch.testing.assert_close(max_pool5(x), nn.MaxPool2d(5, 1, 2)(x), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_crp_receptive_field_is_4k_plus_1(k: int) -> None:
    crp = CRP(1, k)
    for conv in crp.convs:
        nn.init.ones_(conv.weight)  # identity 1x1 conv on one channel
    x = torch.zeros(1, 1, 31, 31)
    x[0, 0, 15, 15] = 1.0
    with torch.no_grad():
        support = crp(x)[0, 0] != 0
    expected = torch.zeros(31, 31, dtype=torch.bool)
    expected[15 - 2 * k : 16 + 2 * k, 15 - 2 * k : 16 + 2 * k] = True
    assert torch.equal(support, expected)


def test_lwrefinenet_and_unet_shapes() -> None:
    chans, sizes = (8, 12, 16, 20), [(25, 33), (13, 17), (7, 9), (4, 5)]
    feats = [torch.randn(2, c, *s) for c, s in zip(chans, sizes, strict=True)]
    lw = LWRefineNet(chans, 24, crp_stages=(1, 1, 2, 4))
    assert lw(feats).shape == (2, 24, 25, 33) and lw.out_channels == 24
    for upsample in ("bilinear", "transposed"):
        unet = UNet(chans, 32, upsample)
        assert unet(feats).shape == (2, unet.out_channels, 25, 33) and unet.out_channels == 8


def _tv_features(sd: dict) -> nn.Module:
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(sd, strict=False)
    return tv.features.eval()


@pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"offline ImageNet MobileNetV2 weights not found at {WEIGHTS}"
)
def test_local_pretrained_weights_match_torchvision() -> None:
    sd = torch.load(WEIGHTS, weights_only=True)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a features-only file is complete for the backbone: no warning
        loaded = build_model(_cfg(backbone="mobilenet_v2", backbone_weights=str(WEIGHTS))).backbone.eval()
    with torch.no_grad():
        ours = loaded(x)[-1]
        torch.testing.assert_close(ours, _tv_features(sd)(x))
        random = bb.mobilenet_v2().eval()(x)[-1]
    assert not torch.allclose(ours, random, atol=1e-3)


def test_full_torchvision_state_dict_partial_and_wrong_files(tmp_path: Path) -> None:
    tv = torchvision.models.mobilenet_v3_small()
    full = tmp_path / "full.pth"
    torch.save({"state_dict": tv.state_dict()}, full)
    backbone = bb.mobilenet_v3_small(weights_path=str(full)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x)[-1], tv.features.eval()(x))

    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in tv.state_dict().items() if not k.startswith("features.12")}, partial)
    with pytest.warns(UserWarning, match="missing"):
        bb.mobilenet_v3_small(weights_path=str(partial))

    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="wrong.pth"):
        bb.mobilenet_v3_small(weights_path=str(wrong))
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        bb.mobilenet_v3_small(weights_path=str(tmp_path / "absent.pth"))


def test_offline_imagenet_fails_fast_with_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # empty cache
    assert bb._online() is False  # the autouse fixture refuses connections
    start = time.perf_counter()
    with pytest.raises(bb.WeightsUnavailableError, match=r"model\.backbone_weights=PATH"):
        build_model(_cfg(backbone="mobilenet_v3_small", pretrained="imagenet"))
    assert time.perf_counter() - start < 5.0


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _train_step(model: nn.Module) -> None:
    model.train()
    params = list(model.encoder_parameters()) + list(model.decoder_parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    (out["semseg"].mean() + out["depth"].mean()).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["none", "all", "bn", "first_n_stages"])
def test_freezing(mode: str) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(backbone="mobilenet_v3_small", freeze=mode, freeze_stages=2))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    enc, dec = {id(p) for p in model.encoder_parameters()}, {id(p) for p in model.decoder_parameters()}
    assert enc.isdisjoint(dec) and enc | dec == trainable
    before = _snapshot(model.backbone)
    _train_step(model)
    after = model.backbone.state_dict()
    bns = {n for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    stage = {k: int(k.split(".")[1]) for k in before}
    is_bn = {k: k.rsplit(".", 1)[0] in bns for k in before}
    frozen = {
        "none": lambda k: False,
        "all": lambda k: True,
        "bn": lambda k: is_bn[k],
        "first_n_stages": lambda k: stage[k] < 2,
    }[mode]
    keys = [k for k in before if not k.endswith("num_batches_tracked")]
    for k in keys:
        if frozen(k):
            assert torch.equal(before[k], after[k]), f"{mode}: {k} changed"
        elif k.endswith("running_mean"):  # every BatchNorm that is not frozen updates its statistics
            assert not torch.equal(before[k], after[k]), f"{mode}: {k} did not change"
    trained = [k for k in keys if not frozen(k) and k.endswith("weight")]
    assert all(frozen(k) for k in keys) or any(not torch.equal(before[k], after[k]) for k in trained)
    frozen_bn = [m for n, m in model.backbone.named_modules() if n in bns and not m.training]
    assert len(frozen_bn) == sum(frozen(f"{n}.running_mean") for n in bns)


def test_depth_parameterisations_bounded_with_gradients() -> None:
    lo, hi = 0.5, 50.0
    for param in DEPTH_PARAMS:
        raw = torch.linspace(-30, 30, 101, requires_grad=True)
        d = depth_from_raw(raw, param, lo, hi)
        assert torch.isfinite(d).all() and d.min() >= lo and d.max() <= hi
        assert (d[1:] >= d[:-1]).all() or (d[1:] <= d[:-1]).all()  # monotone
        d.sum().backward()
        assert raw.grad[45:56].abs().min() > 0  # gradients flow in the working range
        for target in (0.7, 3.0, 40.0):
            got = depth_from_raw(torch.tensor(raw_for_depth(target, param, lo, hi)), param, lo, hi)
            assert math.isclose(float(got), target, rel_tol=1e-4)
        head = DepthHead(8, param, lo, hi)
        with torch.no_grad():
            init = head(torch.randn(2, 8, 5, 6), (10, 12))
        assert init.shape == (2, 1, 10, 12)
        torch.testing.assert_close(init, torch.full_like(init, math.sqrt(lo * hi)), rtol=0.05, atol=0)


def test_config_errors_and_single_task() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model(_cfg(num_classes=0))
    with pytest.raises(ValueError, match="model.backbone"):
        build_model(_cfg(backbone="vgg"))
    model = build_model(_cfg(tasks=("depth",), num_classes=0, backbone="mobilenet_v3_small")).eval()
    assert model.tasks == ("depth",) and set(model(torch.randn(1, 3, 32, 32))) == {"depth"}


def test_model_table_counts() -> None:
    small = describe(_cfg(backbone="mobilenet_v3_small"), (64, 64))
    big = describe(_cfg(backbone="resnet50"), (64, 64))
    real = build_model(_cfg(backbone="mobilenet_v3_small"))
    assert math.isclose(small["params_m"], sum(p.numel() for p in real.parameters()) / 1e6)
    assert 0 < small["gflops"] < big["gflops"]
    text = format_model_table([small, big])
    assert "resnet50" in text and "GFLOPs @ 64x64" in text and len(text.splitlines()) == 4
    assert dataclasses.asdict(_cfg())["decoder_channels"] == 16


def test_batchnorm_momentum_follows_the_config():
    """torchvision's MobileNetV3 ships momentum 0.01; short runs would evaluate with stale running stats."""
    from densemtl.config import ModelConfig
    from densemtl.models import build_model

    for momentum in (0.1, 0.05):
        model = build_model(ModelConfig(backbone="mobilenet_v3_small", num_classes=3, decoder_channels=16,
                                        bn_momentum=momentum))
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns and all(m.momentum == momentum for m in bns)


def test_depth_head_respects_bounds_after_upsampling() -> None:
    """Metres are resized after the mapping: sharp near/far edges must stay inside the bounds at full size."""
    lo, hi = 0.5, 50.0
    for param in DEPTH_PARAMS:
        head = DepthHead(4, param, lo, hi)
        with torch.no_grad():
            head.out.weight.fill_(0.0)
            head.out.bias.fill_(0.0)
            head.out.weight[0, 0], head.out.weight[0, 1] = 100.0, -100.0
            x = torch.zeros(1, 4, 6, 8)
            x[:, 0, :, ::2] = 5.0  # raw +500 on even columns, -500 on odd ones: far beyond both bounds
            x[:, 1, :, 1::2] = 5.0
            head.trunk[0].weight.fill_(0.0)
            head.trunk[0].bias.fill_(0.0)
            head.trunk[0].weight[:, :, 1, 1] = 1.0  # identity depthwise 3x3
            out = head(x, (24, 32))
        assert out.shape == (1, 1, 24, 32)
        assert out.min() >= lo and out.max() <= hi
        assert out.max() - out.min() > 0.5 * (hi - lo)  # the edges really are sharp and near the bounds


def test_decoder_widths_crp_stages_and_head_trunks_follow_the_config() -> None:
    from densemtl.models.decoders import lw_widths
    from densemtl.models.heads import make_trunk

    assert lw_widths(128) == (32, 64, 128, 128) and lw_widths(128, taper=False) == (128,) * 4
    assert lw_widths(16) == (8, 8, 16, 16)  # never thinner than 8
    uniform = build_model(_cfg(decoder_channels=24, decoder_taper=False, crp_stages=(1, 0, 0, 3)))
    dec = uniform.decoders["shared"]
    assert dec.out_channels == 24 and [len(c.convs) for c in dec.crp] == [1, 0, 0, 3]
    conv = build_model(_cfg(head="conv", head_channels=40))
    for task, head in conv.heads.items():
        assert isinstance(head.trunk[1], nn.BatchNorm2d) and head.trunk[0].out_channels == 40, task
        assert head.out.in_channels == 40
    out = conv(torch.rand(2, 3, 64, 96))
    assert out["semseg"].shape == (2, 5, 64, 96) and torch.isfinite(out["depth"]).all()
    trunk, width = make_trunk(12, "conv")
    assert width == 12 and trunk[0].kernel_size == (3, 3)
    assert make_trunk(12, "light")[1] == 12
    for bad, key in (({"crp_stages": (1, 2)}, "model.crp_stages"), ({"head": "huge"}, "model.head"),
                     ({"head": "conv", "head_channels": -1}, "model.head_channels")):  # fmt: skip
        with pytest.raises(ValueError, match=key):
            build_model(_cfg(**bad))
