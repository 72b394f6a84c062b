"""Checkpoints: atomic writes, safe loading, clear refusals."""

from __future__ import annotations

import collections

import pytest
import torch

from densemtl.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def _payload(value: float) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "config": {},
        "dataset": {},
        "model": {"w": torch.full((3,), value)},
    }


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _payload(1.0))

    def broken_save(obj, f):  # dies half-way through writing, like a crash or a full disk
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, _payload(2.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((3,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left behind


def test_missing_and_foreign_files_are_refused_with_a_fix(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    plain = tmp_path / "plain.pt"
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="backbone_weights"):
        load_checkpoint(plain)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, _payload(1.0))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)


def test_pickled_code_is_never_executed(tmp_path):
    evil = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": CHECKPOINT_FORMAT, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_newer_version_is_refused(tmp_path):
    path = tmp_path / "new.pt"
    save_checkpoint(path, {**_payload(0.0), "version": 99})
    with pytest.raises(CheckpointError, match="newer densemtl"):
        load_checkpoint(path)


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    path = tmp_path / "rng.pt"
    save_checkpoint(path, {**_payload(0.0), "rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_ordered_dict_state_dicts_load(tmp_path):
    path = tmp_path / "od.pt"
    save_checkpoint(path, {**_payload(0.0), "model": collections.OrderedDict(w=torch.ones(2))})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_incomplete_or_old_checkpoint_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "version": 0, "model": {}})
    with pytest.raises(CheckpointError, match=r"lacks \['config', 'dataset'\].*older densemtl"):
        load_checkpoint(path)


def test_version_1_checkpoints_are_converted_on_load(tmp_path):
    """Version 1 models took ImageNet-normalised input; loaded now, they take RGB in [0, 1] and give the same."""
    from densemtl.config import Config, ModelConfig, to_dict
    from densemtl.models import build_model
    from densemtl.train.checkpoint import CHECKPOINT_VERSION, make_payload, model_from_checkpoint

    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(num_classes=3, backbone="mobilenet_v3_small", decoder_channels=8))
    model = build_model(cfg.model).eval()
    old = make_payload(cfg, model, {"classes": ["a", "b", "c"]})
    old["version"] = 1
    for key in ("pixel_mean", "pixel_std"):  # a version-1 file has no normalisation buffers
        del old["model"][key]
    save_checkpoint(tmp_path / "v1.pt", old)
    ckpt = load_checkpoint(tmp_path / "v1.pt")
    assert ckpt["version"] == CHECKPOINT_VERSION == 5 and ckpt["config"] == to_dict(cfg)
    loaded = model_from_checkpoint(ckpt).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.equal(loaded.pixel_mean.flatten(), mean) and torch.equal(loaded.pixel_std.flatten(), std)
    rgb = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        new = loaded(rgb)
        # What the version-1 network computed: the backbone fed (rgb - mean) / std by the caller.
        loaded.pixel_mean.zero_()
        loaded.pixel_std.fill_(1.0)
        before = loaded((rgb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    for task in new:
        assert torch.allclose(new[task], before[task], atol=1e-5), task


def test_version_2_checkpoints_keep_their_decoder_and_heads_whatever_the_defaults(tmp_path):
    """A version-2 config does not name the decoder layout; loading fills in the one it was built with, so
    changing ModelConfig's defaults (widths, CRP stages, heads) never breaks an old checkpoint."""
    from densemtl.config import Config, ModelConfig, to_dict
    from densemtl.models import build_model
    from densemtl.train.checkpoint import V2_MODEL_LAYOUT, make_payload, model_from_checkpoint

    layout = {"decoder_taper": True, "crp_stages": (0, 2, 2, 4), "head": "light", "head_channels": 0}
    cfg = Config(model=ModelConfig(num_classes=3, backbone="mobilenet_v3_small", decoder_channels=8, **layout))
    model = build_model(cfg.model).eval()
    old = make_payload(cfg, model, {"classes": ["a", "b", "c"]})
    old["version"] = 2
    for key in V2_MODEL_LAYOUT:  # a version-2 file's config has no such keys
        del old["config"]["model"][key]
    save_checkpoint(tmp_path / "v2.pt", old)
    ckpt = load_checkpoint(tmp_path / "v2.pt")
    assert ckpt["config"]["model"] == to_dict(cfg)["model"]
    loaded = model_from_checkpoint(ckpt).eval()  # strict load: the same architecture
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["depth"], model(x)["depth"])


def test_a_checkpoint_whose_head_meant_something_else_is_refused_naming_the_task(tmp_path):
    """Version-4 objects heads regressed metres, not metres per focal length: such a file is refused (no exact
    conversion exists); a version-4 file without that head loads and is upgraded."""
    from densemtl.config import Config, ModelConfig
    from densemtl.models import build_model
    from densemtl.tasks.objects import OBJECTS
    from densemtl.train.checkpoint import CHECKPOINT_VERSION, make_payload

    cfg = Config(model=ModelConfig(num_classes=3, backbone="mobilenet_v3_small", decoder_channels=8))
    old = make_payload(cfg, build_model(cfg.model), {"classes": ["a", "b", "c"]})
    old["version"] = 4
    save_checkpoint(tmp_path / "dense.pt", old)
    assert load_checkpoint(tmp_path / "dense.pt")["version"] == CHECKPOINT_VERSION
    with_objects = {**old, "config": {**old["config"], "model": {**old["config"]["model"], "tasks": [
        *cfg.model.tasks, OBJECTS.name]}}}  # fmt: skip
    save_checkpoint(tmp_path / "objects.pt", with_objects)
    with pytest.raises(CheckpointError, match=rf"objects.pt.*'{OBJECTS.name}' head.*version 4.*retrain"):
        load_checkpoint(tmp_path / "objects.pt")
