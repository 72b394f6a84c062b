"""Pretrained folders (config.json + model.safetensors + README.md): round trip, card, refusals, Hub offline."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

import densemtl
from densemtl.config import Config, DataConfig, ModelConfig, from_dict, to_dict
from densemtl.deploy import hub
from densemtl.deploy.hub import HubUnavailableError
from densemtl.deploy.pretrained import (
    PretrainedError,
    init_from_pretrained,
    load_pretrained,
    model_from_pretrained,
    push_to_hub,
    save_pretrained,
)
from densemtl.inference import Predictor
from densemtl.models import build_model
from densemtl.train.checkpoint import load_checkpoint, make_payload, save_checkpoint
from helpers import CLASSES, PALETTE, make_dataset

OFFLINE_LIMIT_S = 5.0
INFO = {"name": "synthetic-streets", "classes": CLASSES, "palette": PALETTE, "ignore_index": 255}


def _cfg(**model: object) -> Config:
    settings = {"num_classes": 3, "backbone": "mobilenet_v3_small", "decoder_channels": 8, "head_channels": 8}
    return Config(data=DataConfig(crop=(32, 64), eval_scale=0.5), model=ModelConfig(**{**settings, **model}))


def _trained_like(cfg: Config, seed: int = 0) -> torch.nn.Module:
    """A model whose BatchNorm buffers differ from a fresh one's, so a round trip that drops buffers shows."""
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A run folder holding ``best.pt`` (epoch index 2, with its validation summary) and the model in it."""
    model = _trained_like(_cfg())
    payload = make_payload(_cfg(), model, INFO, epoch=2, metrics={"score": 0.5, "semseg/miou": 0.25})
    return save_checkpoint(tmp_path / "run" / "best.pt", payload), model


def _outputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    x = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(x)


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace model.safetensors and update config.json's size and checksum, as a consistent but wrong save."""
    data = safetensors.torch.save(tensors)
    (folder / "model.safetensors").write_bytes(data)
    meta = json.loads((folder / "config.json").read_text())
    meta["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "config.json").write_text(json.dumps(meta))


# --------------------------------------------------------------------------------------------- round trip
def test_save_then_load_reproduces_the_model_exactly(run, tmp_path):
    ckpt_path, model = run
    folder = save_pretrained(ckpt_path, tmp_path / "pre")
    loaded, info, cfg = load_pretrained(folder)
    assert cfg == from_dict(Config, to_dict(_cfg()))
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(ref) and all(torch.equal(got[k], ref[k]) for k in ref)  # buffers included
    a, b = _outputs(model), _outputs(loaded)
    assert set(a) == {"semseg", "depth"} and all(torch.equal(a[t], b[t]) for t in a)
    assert info["classes"] == CLASSES and info["input_scale"] == 0.5
    assert not loaded.training and isinstance(model_from_pretrained(folder), torch.nn.Module)


def test_the_folder_holds_json_markdown_and_safetensors_only(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    json.loads((folder / "config.json").read_text())
    (folder / "README.md").read_text(encoding="utf-8")
    weights = (folder / "model.safetensors").read_bytes()
    assert not weights.startswith((b"\x80", b"PK\x03\x04"))  # neither a pickle nor a torch.save zip
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])  # safetensors: a JSON header, then raw tensor bytes
    assert set(header) - {"__metadata__"} == set(run[1].state_dict())
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the staging folder is gone


def test_a_predictor_built_from_the_folder_predicts_like_the_checkpoint(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    model, info, _ = load_pretrained(folder)
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    want = Predictor.from_checkpoint(run[0], "cpu").predict(image)
    got = Predictor(model, info, "cpu", None, info["input_scale"]).predict(image)  # what from_pretrained does
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_predictor_from_pretrained(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    want = Predictor.from_checkpoint(run[0], "cpu").predict(image)
    predictor = Predictor.from_pretrained(folder, device="cpu")
    got = predictor.predict(image)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    again = save_pretrained(predictor, tmp_path / "again")  # it knows its config: no config= needed
    assert json.loads((again / "config.json").read_text())["config"] == to_dict(_cfg())


def test_a_predictor_or_a_checkpoint_dict_can_be_saved(run, tmp_path):
    predictor = Predictor(run[1], INFO, "cpu", None, 0.5)  # built from a bare model: it has no config
    with pytest.raises(PretrainedError, match="does not know its config"):
        save_pretrained(predictor, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    folder = save_pretrained(predictor, tmp_path / "p", config=_cfg())
    assert torch.equal(_outputs(model_from_pretrained(folder))["depth"], _outputs(run[1])["depth"])
    meta = json.loads((save_pretrained(load_checkpoint(run[0]), tmp_path / "d") / "config.json").read_text())
    assert meta["input_scale"] == 0.5 and meta["classes"] == CLASSES
    with pytest.raises(PretrainedError, match="load_checkpoint"):
        save_pretrained({"model": {}}, tmp_path / "x")


def test_an_older_checkpoint_is_saved_as_the_model_it_loads_as(run, tmp_path):
    """Saving goes through the rebuilt model: what an older file lacks (filled in on load) is in the folder."""
    from densemtl.train.checkpoint import model_from_checkpoint

    old = load_checkpoint(run[0])
    old["version"] = 3  # before heads had calibration buffers, which loading fills with the identity
    old["model"] = {k: v for k, v in old["model"].items() if not k.rsplit(".", 1)[-1].startswith("calib_")}
    save_checkpoint(tmp_path / "old.pt", old)
    want = _outputs(model_from_checkpoint(load_checkpoint(tmp_path / "old.pt")))
    got = _outputs(model_from_pretrained(save_pretrained(tmp_path / "old.pt", tmp_path / "pre")))
    assert all(torch.equal(got[t], want[t]) for t in want)


def test_non_finite_weights_are_never_saved(run, tmp_path):
    ckpt = load_checkpoint(run[0])
    next(v for v in ckpt["model"].values() if v.is_floating_point())[0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_pretrained(ckpt, tmp_path / "pre")
    assert not (tmp_path / "pre").exists()


# ---------------------------------------------------------------------------------------- config and card
def test_config_json_says_what_the_predictor_needs(run, tmp_path):
    meta = json.loads((save_pretrained(run[0], tmp_path / "pre") / "config.json").read_text())
    assert meta["format"] == "densemtl-pretrained" and meta["format_version"] == 1
    assert meta["tasks"] == ["semseg", "depth"] and meta["classes"] == CLASSES and meta["palette"] == PALETTE
    assert meta["input_scale"] == 0.5 and meta["dataset"]["name"] == "synthetic-streets"
    assert meta["densemtl_version"] and meta["config"] == to_dict(_cfg())
    weights = (tmp_path / "pre" / "model.safetensors").read_bytes()
    assert meta["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_model_card_has_hub_front_matter_classes_and_the_checkpoint_metrics(run, tmp_path, monkeypatch):
    from densemtl.tasks import TASKS

    monkeypatch.setattr(type(TASKS["semseg"]), "hub_pipeline_tag", "image-segmentation", raising=False)
    front, body = _card(save_pretrained(run[0], tmp_path / "pre", license="mit"))
    assert front["library_name"] == "densemtl" and front["license"] == "mit"
    assert front["pipeline_tag"] == "image-segmentation"
    assert {"densemtl", "semseg", "depth", "mobilenet_v3_small"} <= set(front["tags"])
    assert "| 1 | car | `#00008e` |" in body  # PALETTE[1] = (0, 0, 142)
    assert "| semseg | `semseg`, `confidence`, `entropy` |" in body
    assert "stored in the checkpoint" in body and "| semseg/miou | 0.2500 |" in body
    assert "**synthetic**" in body and "Not measured" in body


def test_the_card_prefers_the_runs_evaluation_of_the_same_epoch(run, tmp_path):
    ckpt_path = run[0]
    result = {"summary": {"score": 0.75, "depth/delta1": 0.875}, "split": "val", "num_images": 32, "epoch": 2}
    (ckpt_path.parent / "eval_val").mkdir()
    (ckpt_path.parent / "eval_val" / "metrics.json").write_text(json.dumps(result))
    _, body = _card(save_pretrained(ckpt_path, tmp_path / "a"))
    assert "eval_val/metrics.json`, val split, 32 images" in body and "| depth/delta1 | 0.8750 |" in body
    assert "| semseg/miou |" not in body
    result["epoch"] = 5  # an evaluation of another checkpoint (e.g. last.pt) is not this model's
    (ckpt_path.parent / "eval_val" / "metrics.json").write_text(json.dumps(result))
    (ckpt_path.parent / "metrics.jsonl").write_text(
        json.dumps({"epoch": 3, "val/score": 0.625}) + "\n" + json.dumps({"epoch": 4, "val/score": 0.0}) + "\n"
    )
    _, body = _card(save_pretrained(ckpt_path, tmp_path / "b"))
    assert "metrics.jsonl" in body and "| score | 0.6250 |" in body and "0.7500" not in body


def test_the_card_says_not_evaluated_and_shows_benchmark_latency(run, tmp_path):
    ckpt = load_checkpoint(run[0])
    del ckpt["metrics"]
    bench = {"size": [480, 640], "threads": 2, "runs": 30, "cpu": "x86_64", "batch": 1, "engines": {
        "densemtl onnxruntime": {"model": "densemtl", "engine": "onnxruntime", "median_ms": 12.5, "p90_ms": 13.0,
                                 "fps": 80.0}}}  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    _, body = _card(save_pretrained(ckpt, tmp_path / "pre", benchmark_json=tmp_path / "bench.json"))
    assert "Not evaluated" in body
    assert "480x640 input, 2 threads" in body and "| densemtl | onnxruntime | 12.5000 | 13.0000 | 80.0000 |" in body
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a densemtl benchmark JSON"):
        save_pretrained(ckpt, tmp_path / "other", benchmark_json=tmp_path / "bad.json")
    assert not (tmp_path / "other").exists()  # refused before anything was written


@pytest.mark.export
def test_onnx_export_goes_into_the_folder_and_the_card(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre", onnx=True)
    assert (folder / "model.onnx").stat().st_size > 0 and "`model.onnx`: opset 18" in _card(folder)[1]
    save_pretrained(run[0], folder)  # saved again without ONNX: the old graph must not stay beside new weights
    assert not (folder / "model.onnx").exists()


# ----------------------------------------------------------------------------------------------- refusals
def test_an_interrupted_save_leaves_the_previous_folder_as_it_was(run, tmp_path, monkeypatch):
    import densemtl.deploy.pretrained as pretrained

    folder = save_pretrained(run[0], tmp_path / "pre")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(*args, **kwargs):  # dies after the new weights were written, before the card and config.json
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "model_card", crash)
    other = make_payload(_cfg(), _trained_like(_cfg(), seed=1), INFO, epoch=3)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(other, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    assert torch.equal(_outputs(model_from_pretrained(folder))["depth"], _outputs(run[1])["depth"])


def test_a_foreign_non_empty_folder_is_not_overwritten(run, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a densemtl pretrained folder"):
        save_pretrained(run[0], other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_pretrained(run[0], tmp_path / "file")
    folder = save_pretrained(run[0], tmp_path / "pre")
    (folder / "extra.txt").write_text("a user's note")
    assert save_pretrained(run[0], folder) == folder and (folder / "extra.txt").is_file()  # ours: updated


def test_tensors_that_do_not_fit_the_config_are_named_with_their_shapes(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    tensors = safetensors.torch.load((folder / "model.safetensors").read_bytes())  # not mmapped: rewritten below
    name = next(k for k, v in tensors.items() if v.ndim == 4)
    shape = tuple(tensors[name].shape)
    _rewrite_weights(folder, {**tensors, name: torch.zeros(shape[0] + 1, *shape[1:])})
    with pytest.raises(PretrainedError, match=rf"'{name}' is \({shape[0] + 1}, .*needs \({shape[0]}, "):
        load_pretrained(folder)
    _rewrite_weights(folder, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(PretrainedError, match=rf"'{name}' .* is missing"):
        load_pretrained(folder)
    _rewrite_weights(folder, {**tensors, "head.extra": torch.zeros(2)})
    with pytest.raises(PretrainedError, match=r"unexpected tensor 'head.extra' \(2,\)"):
        load_pretrained(folder)


def test_a_truncated_or_corrupt_weights_file_is_refused_with_the_fix(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    path, data = folder / "model.safetensors", (folder / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cut = rf"truncated .*{len(data) // 2} of {len(data)} bytes.*re-download or re-save"
    with pytest.raises(PretrainedError, match=cut):
        load_pretrained(folder)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one flipped byte in the last tensor
    with pytest.raises(PretrainedError, match="SHA-256 differs.*re-download or re-save"):
        load_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    del meta["files"]  # a hand-made config.json: the safetensors reader itself finds the cut
    (folder / "config.json").write_text(json.dumps(meta))
    path.write_bytes(data[:-100])
    with pytest.raises(PretrainedError, match="not a readable safetensors file.*re-download or re-save"):
        load_pretrained(folder)


def test_folders_of_other_libraries_and_versions_are_refused(run, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    with pytest.raises(PretrainedError, match="no config.json.*save-pretrained"):
        load_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    safetensors.torch.save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(PretrainedError, match="no \"format\": \"densemtl-pretrained\" tag .*'bert'.*another library"):
        load_pretrained(folder)
    ours = save_pretrained(run[0], tmp_path / "pre")
    meta = json.loads((ours / "config.json").read_text())
    (ours / "config.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(PretrainedError, match="format_version 2.*upgrade densemtl"):
        load_pretrained(ours)
    with pytest.raises(PretrainedError, match="is a file"):
        load_pretrained(run[0])
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub model id"):
        load_pretrained(tmp_path / "no" / "such" / "folder")


# -------------------------------------------------------------------------------------------- init_from
def test_init_from_copies_every_tensor_that_fits(run, tmp_path):
    folder = save_pretrained(run[0], tmp_path / "pre")
    cfg = _cfg(num_classes=4)  # fine-tuning on a dataset with another class list
    model = build_model(cfg.model)
    report = init_from_pretrained(model, folder, cfg.model)
    theirs, ours = run[1].state_dict(), model.state_dict()
    assert report["skipped"] and all(ours[k].shape != theirs[k].shape for k in report["skipped"])
    assert all(torch.equal(ours[k], theirs[k]) for k in report["loaded"])
    assert len(report["loaded"]) + len(report["skipped"]) == len(ours)
    other = _cfg(backbone="resnet18")
    with pytest.raises(PretrainedError, match="backbone 'mobilenet_v3_small' but model.backbone is 'resnet18'"):
        init_from_pretrained(build_model(other.model), folder, other.model)


# ------------------------------------------------------------------------------------------ Hub, offline
@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def _timed(fn, exc, match):
    start = time.perf_counter()
    with pytest.raises(exc, match=match):
        fn()
    return time.perf_counter() - start


def test_a_hub_id_fails_fast_on_this_offline_machine(tmp_path, no_proxy):
    host, port = hub._probe_target()
    if hub._reachable(host, port, timeout=1.0):
        pytest.skip(f"{host} is reachable: this checks a machine without network")
    fix = r"`hf download nobody/densemtl-none --local-dir DIR` .*pass DIR"
    took = _timed(lambda: load_pretrained("nobody/densemtl-none", cache_dir=tmp_path), HubUnavailableError, fix)
    assert took < OFFLINE_LIMIT_S


def test_an_unreachable_or_silent_hub_fails_within_the_limit(tmp_path, no_proxy, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    took = _timed(lambda: load_pretrained("org/name", cache_dir=tmp_path), HubUnavailableError, "127.0.0.1:9")
    assert took < OFFLINE_LIMIT_S

    def hang(*args, **kwargs):  # a firewall that drops packets, or a DNS lookup that never answers
        time.sleep(30)

    monkeypatch.setattr(socket, "create_connection", hang)
    took = _timed(lambda: load_pretrained("org/name", cache_dir=tmp_path), HubUnavailableError, "at most 3 s")
    assert took < OFFLINE_LIMIT_S


def test_hf_hub_offline_uses_the_cache_and_names_the_cause_without_it(run, tmp_path, no_proxy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    took = _timed(lambda: load_pretrained("org/name", cache_dir=tmp_path), HubUnavailableError, "HF_HUB_OFFLINE")
    assert took < OFFLINE_LIMIT_S
    commit = "0" * 40  # the Hugging Face cache layout that snapshot_download leaves behind
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(save_pretrained(run[0], tmp_path / "pre"), repo / "snapshots" / commit)
    model, info, _ = load_pretrained("org/name", cache_dir=tmp_path)
    assert torch.equal(_outputs(model)["depth"], _outputs(run[1])["depth"]) and info["classes"] == CLASSES


def test_push_fails_fast_offline(run, tmp_path, no_proxy, monkeypatch):
    from huggingface_hub import constants

    folder = save_pretrained(run[0], tmp_path / "pre")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for source in (folder, run[0]):
        took = _timed(lambda s=source: push_to_hub(s, "org/name"), HubUnavailableError, "cannot push .*--pretrained")
        assert took < OFFLINE_LIMIT_S
    with pytest.raises(ValueError, match="org/name"):
        push_to_hub(folder, "not a repo id")


class FakeApi:
    """Records what push_to_hub asks of ``huggingface_hub.HfApi`` (no network)."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        FakeApi.calls.append(("upload_folder", files, kwargs))
        return type("Commit", (), {"commit_url": "https://hub/commit/1"})()


def test_push_creates_the_repo_and_uploads_a_checked_folder(run, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    assert push_to_hub(run[0], "org/name", private=True, token="t") == "https://hub/commit/1"
    (create, repo, create_kw), (upload, files, upload_kw) = FakeApi.calls
    assert create == "create_repo" and repo == "org/name"
    assert create_kw == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert files == ["README.md", "config.json", "model.safetensors"]  # saved from the checkpoint first
    assert upload_kw["repo_id"] == "org/name" and set(upload_kw["allow_patterns"]) == set(files)
    folder = save_pretrained(run[0], tmp_path / "pre")
    (folder / "model.safetensors").write_bytes(b"cut")
    FakeApi.calls = []
    with pytest.raises(PretrainedError, match="truncated"):  # a folder that would not load is never published
        push_to_hub(folder, "org/name")
    assert FakeApi.calls == []


# ------------------------------------------------------------------------- wiring (cli, engine, package)
def _tiny_train_cfg(root: Path, out: Path, *extra: str) -> Config:
    from densemtl.config import load_config

    sets = [f"data.root={root}", f"train.out_dir={out}", "train.epochs=1", "train.batch_size=2", "data.crop=[32, 64]",
            "data.num_workers=0", "model.backbone=mobilenet_v3_small", "model.decoder_channels=8",
            "model.head_channels=8", "model.tasks=[semseg, depth]", "model.uncertainty=false", "train.amp=false",
            *extra]  # fmt: skip
    return load_config(None, sets)


def test_training_starts_from_init_from_and_a_resume_does_not_read_it_again(run, tmp_path):
    from densemtl.train.engine import setup, train

    make_dataset(tmp_path / "data", n=4, splits=("train", "val"), size=(32, 64))
    model = _trained_like(_cfg(uncertainty=False))  # the architecture the tiny training config builds
    folder = save_pretrained(make_payload(_cfg(uncertainty=False), model, INFO), tmp_path / "pre")
    cfg = _tiny_train_cfg(tmp_path / "data", tmp_path / "r", f"model.init_from={folder}")
    theirs = model.state_dict()
    started = setup(cfg, check_files=False).model.state_dict()
    assert all(torch.equal(started[k].cpu(), theirs[k]) for k in theirs)  # same class list: every tensor
    train(cfg)
    shutil.rmtree(folder)  # gone: a resume must not need it
    result = train(_tiny_train_cfg(tmp_path / "data", tmp_path / "r", f"model.init_from={folder}",
                                   "train.epochs=2"), resume=tmp_path / "r" / "last.pt")  # fmt: skip
    assert result["out_dir"] == str(tmp_path / "r")


def test_a_checkpoint_from_before_init_from_still_resumes(tmp_path):
    from densemtl.train.engine import config_for_resume, train

    make_dataset(tmp_path / "data", n=4, splits=("train", "val"), size=(32, 64))
    train(_tiny_train_cfg(tmp_path / "data", tmp_path / "r"))
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    del ckpt["config"]["model"]["init_from"]  # what a checkpoint written before the field holds
    torch.save(ckpt, tmp_path / "r" / "last.pt")
    cfg = config_for_resume(tmp_path / "r" / "last.pt", ["train.epochs=2"])
    assert train(cfg, resume=tmp_path / "r" / "last.pt")["out_dir"] == str(tmp_path / "r")


def test_cli_save_pretrained_and_push_to_hub_offline(run, tmp_path, capsys, monkeypatch, no_proxy):
    from huggingface_hub import constants

    from densemtl.cli import main

    assert main(["save-pretrained", "--checkpoint", str(run[0]), "--out", str(tmp_path / "pre")]) == 0
    assert "config.json, model.safetensors" in capsys.readouterr().out
    assert torch.equal(_outputs(model_from_pretrained(tmp_path / "pre"))["depth"], _outputs(run[1])["depth"])
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    assert main(["push-to-hub", "--pretrained", str(tmp_path / "pre"), "--repo", "org/name"]) == 2
    assert time.perf_counter() - start < OFFLINE_LIMIT_S
    assert "densemtl: error: cannot push" in capsys.readouterr().err


def test_densemtl_save_pretrained_is_the_library_function():
    assert densemtl.save_pretrained is save_pretrained
