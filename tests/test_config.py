"""Config: YAML + overrides, strict keys and types, round trip through a plain dict."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from densemtl.config import Config, ConfigError, PhaseConfig, from_dict, load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_types():
    cfg = load_config(None, ["train.epochs=3", "data.crop=[64, 128]", "model.backbone=resnet18",
                             "train.phases=[{scale: 0.25, epochs: 2}, {scale: 1, epochs: 1, lr: 0.01}]",
                             "train.lr=1e-3"])
    assert cfg.train.epochs == 3
    assert cfg.data.crop == (64, 128)
    assert cfg.model.backbone == "resnet18"
    assert cfg.train.phases == (PhaseConfig(scale=0.25, epochs=2), PhaseConfig(scale=1.0, epochs=1, lr=0.01))
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "override, fragment",
    [("train.epoch=3", "unknown key(s) ['epoch']"), ("train.epochs=three", "train.epochs: expected int"),
     ("data.crop=[1, 2, 3]", "expected 2 values"), ("train.amp=1", "expected true/false"), ("nokey", "KEY=VALUE")],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override])


def test_frozen_and_round_trip():
    cfg = load_config(None, ["loss.weights={semseg: 2.0, depth: 0.5}"])
    with pytest.raises(AttributeError):
        cfg.train.epochs = 5  # type: ignore[misc]
    again = from_dict(Config, to_dict(cfg))
    assert again == cfg
    assert again.loss.weights == {"semseg": 2.0, "depth": 0.5}


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ must hold at least the synthetic demo config"
    for f in files:
        assert isinstance(load_config(f), Config), f


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
