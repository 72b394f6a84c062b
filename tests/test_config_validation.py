"""Config validation at load time: value ranges, hostile or broken YAML, malformed ``--set`` and ``best_metric``.

Every case raises ``ConfigError`` (a ValueError, so ``densemtl`` prints it as one line and exits 2) whose message
names the key or file and says what to do, before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

import densemtl.config as config
from densemtl.config import (
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    ModelConfig,
    PhaseConfig,
    TrainConfig,
    from_dict,
    load_config,
)
from helpers import CLASSES, make_dataset

REPO = Path(__file__).resolve().parents[1]


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------- ranges
RANGES = [  # (override, the key the message names, the rule it states)
    ("train.lr=-1", "train.lr=-1.0", "> 0"),
    ("train.lr=0", "train.lr=0.0", "> 0"),
    ("train.lr=.nan", "train.lr=nan", "finite"),
    ("train.lr=.inf", "train.lr=inf", "finite"),
    ("train.lr=nan", "train.lr=nan", "finite"),  # the string "nan" that float() reads
    ("train.weight_decay=-1e-4", "train.weight_decay", ">= 0"),
    ("train.weight_decay=.inf", "train.weight_decay", "finite"),
    ("train.epochs=-1", "train.epochs=-1", ">= 1"),
    ("train.epochs=0", "train.epochs=0", ">= 1"),
    ("train.batch_size=0", "train.batch_size=0", ">= 1"),
    ("train.encoder_lr_mult=-0.1", "train.encoder_lr_mult", ">= 0"),
    ("train.grad_clip=.nan", "train.grad_clip", "finite"),
    ("train.seed=-1", "train.seed=-1", "in [0, 4.29497e+09]"),
    ("train.max_nonfinite=0", "train.max_nonfinite=0", ">= 1"),
    ("train.log_every=0", "train.log_every=0", ">= 1"),
    ("train.threads=-3", "train.threads=-3", ">= 0"),
    ("train.phases=[{lr: -1}]", "train.phases[0].lr", "> 0"),
    ("train.phases=[{epochs: 0}]", "train.phases[0].epochs", ">= 1"),
    ("train.phases=[{scale: 1}, {batch_size: 0}]", "train.phases[1].batch_size", ">= 1"),
    ("train.phases=[{scale: 0}]", "train.phases[0].scale", "in (0, 4]"),
    ("train.phases=[{scale: 8}]", "train.phases[0].scale", "in (0, 4]"),
    ("data.crop=[0, 64]", "data.crop[0]=0", "in [1, 16384]"),
    ("data.crop=[64, 100000]", "data.crop[1]=100000", "in [1, 16384]"),
    ("data.scale_range=[0, 1]", "data.scale_range[0]", "in (0, 16]"),
    ("data.scale_range=[0.5, .inf]", "data.scale_range[1]", "finite"),
    ("data.color_jitter=-0.2", "data.color_jitter", ">= 0"),
    ("data.eval_depth_min=0", "data.eval_depth_min", "> 0"),
    ("data.eval_depth_max=.nan", "data.eval_depth_max", "finite"),
    ("data.eval_scale=-1", "data.eval_scale", "in [0, 4]"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("data.max_samples=-5", "data.max_samples", ">= 0"),
    ("model.num_classes=-1", "model.num_classes", ">= 0"),
    ("model.freeze_stages=-1", "model.freeze_stages", ">= 0"),
    ("model.decoder_channels=0", "model.decoder_channels", ">= 1"),
    ("model.bn_momentum=1.5", "model.bn_momentum", "in [0, 1]"),
    ("model.min_depth=0", "model.min_depth", "> 0"),
    ("model.max_depth=.inf", "model.max_depth", "finite"),
    ("loss.depth_clip=0", "loss.depth_clip", "> 0"),
    ("loss.silog_lambda=1.5", "loss.silog_lambda", "in [0, 1]"),
    ("loss.silog_scale=-10", "loss.silog_scale", "> 0"),
    ("loss.weights={semseg: -1}", "loss.weights.semseg", ">= 0"),
    ("loss.weights={depth: .nan}", "loss.weights.depth", "finite"),
    ("loss.weighting_args={alpha: .inf}", "loss.weighting_args.alpha", "finite"),
    ("loss.class_weights=[1, -1, 1]", "loss.class_weights[1]", ">= 0"),
    ("loss.objects_class_balance=2", "loss.objects_class_balance", "in [0, 1]"),
]


@pytest.mark.parametrize("override, key, rule", RANGES, ids=[r[0] for r in RANGES])
def test_out_of_range_values_are_refused_with_the_key_and_the_rule(override, key, rule):
    message = _error([override])
    assert key in message and rule in message and "the default is" in message, message


def test_ranges_apply_to_config_files_and_from_dict_too(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: -0.001\n  epochs: 3\n")
    assert "train.lr=-0.001" in _error([], path)
    with pytest.raises(ConfigError, match=re.escape("train.batch_size=0")):
        from_dict(Config, {"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=re.escape("config.train.lr=-1.0")):  # a Config built in Python
        config.check_config(Config(train=TrainConfig(lr=-1.0)))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.scale_range=[1.25, 0.75]", "data.scale_range=[1.25, 0.75]: the first (smallest) zoom"),
        ("data.eval_depth_min=90", "eval_depth_min=90.0 must be < eval_depth_max=80.0"),
        ("model.min_depth=200", "min_depth=200.0 must be < max_depth=100.0"),
        ("train.best_mode=maximum", "train.best_mode='maximum': choose max"),
    ],
)
def test_fields_that_must_agree_are_checked_together(override, fragment):
    assert fragment in _error([override])


def test_every_numeric_field_has_a_rule():
    """A new int/float field needs an entry in BOUNDS (without one it is still checked to be finite)."""

    def numeric(hint: typing.Any) -> bool:
        return hint in (int, float) or any(numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)

    for cls in (DataConfig, ModelConfig, LossConfig, PhaseConfig, TrainConfig):
        hints = typing.get_type_hints(cls)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if numeric(hints[f.name]) and f.name not in config.BOUNDS[cls]
        ]
        assert not missing, f"{cls.__name__}: add a rule for {missing} to densemtl.config.BOUNDS"


def test_a_field_without_a_rule_must_still_be_finite():
    @dataclass(frozen=True)
    class Future:  # e.g. a field added to ModelConfig later, not (yet) in BOUNDS
        width: float = 1.0
        name: str = "x"

    assert from_dict(Future, {"width": -3.0}) == Future(width=-3.0)
    with pytest.raises(ConfigError, match=re.escape("config.width=nan is not a finite number")):
        from_dict(Future, {"width": float("nan")})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_still_loads(path):
    cfg = load_config(path)
    config.check_config(cfg)
    assert from_dict(Config, dataclasses.asdict(cfg)) == cfg


def test_the_defaults_and_sensible_edge_values_load():
    config.check_config(Config())
    cfg = load_config(None, ["train.weight_decay=0", "data.eval_scale=0", "model.num_classes=0",
                             "train.grad_clip=0", "loss.weights={semseg: 0}", "model.bn_momentum=1",
                             "train.best_metric=depth/abs_rel", "train.best_mode=min"])  # fmt: skip
    assert cfg.train.weight_decay == 0.0 and cfg.train.best_metric == "depth/abs_rel"


# --------------------------------------------------------------------------------------------- YAML files
def _bomb(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\ndata:\n  crop: *l{levels - 1}\nloss:\n  weights: *l{levels - 1}\n"


YAML_FILES = [  # (name, bytes, fragments the message must hold besides the file name)
    ("broken.yaml", b"train:\n  lr: 0.1\n  epochs: [3\n", [":4:1", "invalid YAML", "fix the YAML syntax"]),
    ("tabs.yaml", b"train:\n\tlr: 0.1\n", [":2:1", "invalid YAML"]),
    (
        "tag.yaml",
        b"train:\n  lr: !!python/object/apply:os.getcwd []\n",
        [":2:7", "tags such as !!python/object"],
    ),
    ("list.yaml", b"- train\n- model\n", ["top level must be a mapping", "got a list"]),
    ("scalar.yaml", b"42\n", ["top level must be a mapping", "got a int"]),
    (
        "latin1.yaml",
        b"train:\n  out_dir: runs/caf\xe9\n",
        [":2:", "byte 0xe9 is not UTF-8", "save the file as UTF-8"],
    ),
    ("control.yaml", b"train:\n  out_dir: a\x00b\n", [":2:", "U+0000 is not allowed in YAML"]),
    ("cycle.yaml", b"loss:\n  weights: &w {a: *w}\n", ["contains it", "remove the cycle"]),
    ("huge.yaml", b"#" * (1 << 20) + b"\n", ["too large for a YAML config"]),
    ("ignore.yaml", b"data:\n  ignore_index: 0\n", ["data: unknown key(s) ['ignore_index']", "255"]),
]


@pytest.mark.parametrize("name, content, fragments", YAML_FILES, ids=[c[0] for c in YAML_FILES])
def test_broken_or_hostile_yaml_names_the_file_and_the_fix(tmp_path, name, content, fragments):
    path = tmp_path / name
    path.write_bytes(content)
    message = _error([], path)
    assert "\n" not in message
    for fragment in [str(path) if name != "ignore.yaml" else "config.data", *fragments]:
        assert fragment in message, (fragment, message)


def test_python_tags_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'train: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert "tags such as !!python/object are not allowed" in _error([], path)
    assert not marker.exists()


def test_a_billion_laughs_file_is_refused_quickly_and_in_little_memory(tmp_path):
    """Run in a child with 2 GiB of address space and a time limit, so that a regression cannot hang pytest."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from densemtl.config import ConfigError, load_config\n"
        "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("loading an alias bomb took over 60 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(path) in done.stdout and "aliases" in done.stdout and len(done.stdout) < 1000, done.stdout


def test_missing_file_folder_and_empty_file(tmp_path):
    assert "does not exist; see configs/" in _error([], tmp_path / "nope.yaml")
    assert f"{tmp_path} is a folder, not a YAML file" in _error([], tmp_path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\ntrain:\n")
    assert load_config(empty) == Config()  # an empty file, or an empty section, means the defaults


# ------------------------------------------------------------------------------------------------- --set
SETS = [  # (override, fragments the message must hold)
    ("train.epochs", ["--set 'train.epochs'", "expected KEY=VALUE"]),
    ("train.epoch=3", ["config.train: unknown key(s) ['epoch']", "did you mean 'epochs'"]),
    ("trian.lr=0.1", ["unknown key(s) ['trian']", "did you mean 'train'"]),
    (
        "data.ignore_index=0",
        ["unknown key(s) ['ignore_index']", "always uses 255", "map your void id to 255"],
    ),
    ("train..lr=0.1", ["--set 'train..lr=0.1'", "not a dotted key"]),
    ("=3", ["--set '=3'", "not a dotted key"]),
    ("train.epochs=three", ["config.train.epochs: expected int, got 'three'"]),
    ("train.epochs=2.5", ["config.train.epochs: expected int, got 2.5"]),
    ("train.lr=fast", ["config.train.lr: expected float, got 'fast'"]),
    ("train.amp=1", ["config.train.amp: expected true/false, got 1"]),
    ("data.crop=[1, 2, 3]", ["config.data.crop: expected 2 values"]),
    ("loss.weights=[1, 2]", ["config.loss.weights: expected a mapping"]),
    ("train=5", ["config.train: expected a mapping, got 5"]),
    ("train.epochs=5.lr=1", ["config.train.epochs: expected int"]),
    ("train.lr=[0.1", ["--set 'train.lr=[0.1':1:", "invalid YAML"]),
    ("train.lr=!!python/name:os.system", ["--set", "tags such as !!python/object are not allowed"]),
]


@pytest.mark.parametrize("override, fragments", SETS, ids=[s[0] for s in SETS])
def test_malformed_overrides_name_the_key_and_the_expected_type(override, fragments):
    message = _error([override])
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    from densemtl.cli import main

    out = tmp_path / "run"
    assert main(["train", "--set", "train.epochs=-1", "--set", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("densemtl: error: config.train.epochs=-1 is out of range") and "\n" not in err
    assert not out.exists()


# -------------------------------------------------------------------------------------------- best_metric
@pytest.mark.parametrize("name", ["mIoU", "semseg", "semseg/", "normals/mean_deg", "/miou", "depth.abs_rel"])
def test_best_metric_must_name_score_or_a_task_of_the_model(name):
    message = _error([f"train.best_metric={name}", "model.tasks=[semseg, depth]"])
    assert (
        f"train.best_metric={name!r}" in message and "'score'" in message and "'<task>/<metric>'" in message
    )


def _untouched(run: Path) -> bool:
    """Nothing of a run was written (the run folder may have been created and locked, and is empty again)."""
    return not run.exists() or not any(run.iterdir())


def _tiny_cfg(root: Path, *sets: str) -> Config:
    return load_config(None, [f"data.root={root}", f"train.out_dir={root / 'run'}", "data.num_workers=0",
                              f"model.num_classes={len(CLASSES)}", "model.backbone=mobilenet_v3_small",
                              "model.decoder_channels=16", "data.crop=[24, 32]", "train.epochs=1", *sets])  # fmt: skip


@pytest.mark.parametrize(
    "sets, fragments",
    [
        (["train.best_metric=semseg/mIoU"], ["not an evaluation key", "'semseg/miou'", "'depth/abs_rel'"]),
        (["train.best_metric=depth/delta4"], ["not an evaluation key", "'depth/delta3'"]),
        (["train.best_metric=depth/abs_rel"], ["lower-is-better", "set train.best_mode=min"]),
        (
            ["train.best_metric=semseg/miou", "train.best_mode=min"],
            ["higher-is-better", "train.best_mode=max"],
        ),
    ],
)
def test_train_refuses_an_unknown_best_metric_before_anything_is_written(tmp_path, sets, fragments):
    from densemtl.train.engine import train

    make_dataset(tmp_path, n=1, splits=("train", "val"))
    cfg = _tiny_cfg(tmp_path, *sets)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert _untouched(tmp_path / "run")


def test_best_metric_checks_accept_what_evaluation_reports(tmp_path):
    from densemtl.metrics import check_best_metric

    info = {"classes": CLASSES}
    for sets in (["train.best_metric=score"], ["train.best_metric=semseg/miou"],
                 ["train.best_metric=depth/rmse", "train.best_mode=min"]):  # fmt: skip
        check_best_metric(_tiny_cfg(tmp_path, *sets), info)  # no error


def test_train_refuses_a_config_built_in_python_with_a_bad_value(tmp_path):
    from densemtl.train.engine import train

    cfg = _tiny_cfg(tmp_path)
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=0))
    with pytest.raises(ConfigError, match=re.escape("config.train.batch_size=0 is out of range")):
        train(bad)
    assert _untouched(tmp_path / "run")
