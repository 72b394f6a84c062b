"""Pretrained folders in the Hugging Face layout: ``config.json`` + ``model.safetensors`` + a ``README.md`` card.

A folder holds everything a checkpoint holds for inference and nothing that can run code: the typed config and
dataset facts as JSON, the weights (every tensor of the state dict, buffers included) as safetensors, and a
model card whose YAML front matter the Hub reads. ``config.json`` records the weights' size and SHA-256, so a
truncated download or a file from another save is refused instead of loaded. A folder can be read locally or
fetched by Hub id (``org/name``, :mod:`densemtl.deploy.hub`), and seeds training with ``model.init_from``.

Layout (format version 1)::

    config.json        {"format": "densemtl-pretrained", "format_version": 1, "config": {...}, "dataset": {...},
                        "tasks", "classes", "palette", "input_scale", "files": {"model.safetensors": ...}}
    model.safetensors  the state dict, contiguous CPU tensors
    README.md          the model card
    model.onnx         optional: the ONNX export (dynamic axes, parity-checked)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from densemtl.config import Config, ConfigError, ModelConfig, from_dict, replace
from densemtl.deploy import hub
from densemtl.deploy.model_card import benchmark_lines, model_card, read_metrics
from densemtl.fileio import atomic_write, atomic_write_text
from densemtl.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    check_finite_weights,
    check_heads_current,
    input_scale,
    load_checkpoint,
    make_payload,
    model_from_checkpoint,
    save_checkpoint,
)

log = logging.getLogger("densemtl")

PRETRAINED_FORMAT = "densemtl-pretrained"
PRETRAINED_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, ONNX_FILE = "config.json", "model.safetensors", "README.md", "model.onnx"
OWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, ONNX_FILE)
DOWNLOAD_FILES = [CONFIG_FILE, WEIGHTS_FILE, CARD_FILE]  # what loading needs (the ONNX file is not)


class PretrainedError(ValueError):
    """A pretrained folder (or a source for one) that cannot be used; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------------ save
def save_pretrained(
    source: str | Path | dict[str, Any] | Any,
    out_dir: str | Path,
    onnx: bool = False,
    benchmark_json: str | Path | None = None,
    *,
    config: Config | None = None,
    license: str | None = None,
) -> Path:
    """Write a pretrained folder for ``source`` into ``out_dir``; returns the folder.

    Args:
        source: a checkpoint file (``best.pt``), a checkpoint dict (``load_checkpoint``'s), or a ``Predictor``
            with a torch model (its config comes from ``config`` or the predictor's ``config`` attribute).
        out_dir: created; an existing non-empty folder must be a densemtl pretrained folder (it is updated).
        onnx: also export ``model.onnx`` (dynamic axes, parity-checked against PyTorch).
        benchmark_json: a ``densemtl benchmark --json`` file whose latencies go into the card.
        config: the model's config, for a ``Predictor`` source only.
        license: an SPDX id for the card's front matter (e.g. ``mit``, ``apache-2.0``); omitted when None.

    The files are written into a temporary folder beside ``out_dir`` and moved in at the end, ``config.json``
    last: an interrupted save leaves the previous folder loadable or refused (checksum), never half-new.
    """
    out = Path(os.path.abspath(out_dir))  # "." has no name to stage beside
    _check_target(out)
    ckpt, path = _as_checkpoint(source, config)
    latency = benchmark_lines(Path(benchmark_json)) if benchmark_json is not None else []  # bad JSON: fail now
    check_finite_weights(ckpt, out / WEIGHTS_FILE)
    # The state dict of the model rebuilt from the config: what loading will build, with whatever an older
    # checkpoint lacked filled in on load, and a config that does not fit the weights refused now.
    state = model_from_checkpoint(ckpt, path or "the checkpoint").state_dict()
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}  # each with its own storage
    weights = safetensors.torch.save(tensors, metadata={"format": "pt", "densemtl": PRETRAINED_FORMAT})
    meta = _metadata(ckpt, weights)
    metrics, metrics_source = read_metrics(ckpt, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would hide the folder from teammates
        atomic_write(staging / WEIGHTS_FILE, weights)
        onnx_note = _export_onnx(ckpt, path, staging / ONNX_FILE) if onnx else None
        card = model_card(meta, metrics, metrics_source, latency, license, onnx_note)
        atomic_write_text(staging / CARD_FILE, card)
        atomic_write_text(staging / CONFIG_FILE, json.dumps(meta, indent=2, allow_nan=False) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(out_dir)


def _check_target(out: Path) -> None:
    """Refuse a symlink, a file, or a non-empty folder that is not a densemtl pretrained one (temp files aside)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a folder (or is a symlink): choose another --out")
    if not out.is_dir():
        return
    names = [p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))]
    if names and not _is_pretrained(out):  # config.json is replaced last, so an interrupted save still has it
        raise FileExistsError(
            f"{out} is a non-empty folder that is not a densemtl pretrained folder (it holds {sorted(names)[:5]}); "
            "choose an empty or new --out: nothing in it is replaced"
        )


def _is_pretrained(folder: Path) -> bool:
    try:
        return json.loads((folder / CONFIG_FILE).read_text()).get("format") == PRETRAINED_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _as_checkpoint(source: Any, config: Config | None) -> tuple[dict[str, Any], Path | None]:
    """The checkpoint dict for ``source`` and its file (None for a dict or a Predictor)."""
    if isinstance(source, str | Path):
        return load_checkpoint(source), Path(source)
    if isinstance(source, dict):
        if source.get("format") != CHECKPOINT_FORMAT or source.get("version") != CHECKPOINT_VERSION:
            raise PretrainedError(
                f"the checkpoint dict is not a current densemtl checkpoint (format {source.get('format')!r}, "
                f"version {source.get('version')!r}); load it with densemtl.train.checkpoint.load_checkpoint"
            )
        return source, None
    model, cfg = getattr(source, "model", None), config or getattr(source, "config", None)
    if not isinstance(model, nn.Module):
        raise PretrainedError(
            f"cannot save a {type(source).__name__}: give a checkpoint path, a checkpoint dict or a Predictor "
            "with a torch model (an ONNX Runtime Predictor holds no PyTorch weights: save its checkpoint)"
        )
    if cfg is None:
        raise PretrainedError("this Predictor does not know its config: pass config=, or save its checkpoint")
    return make_payload(cfg, model, source.info, input_scale=float(source.scale)), None


def _metadata(ckpt: dict[str, Any], weights: bytes) -> dict[str, Any]:
    """config.json: format tag, what the Predictor needs, the full config, the weights' size and checksum."""
    from densemtl import __version__

    dataset = ckpt["dataset"]
    return {
        "format": PRETRAINED_FORMAT,
        "format_version": PRETRAINED_VERSION,
        "densemtl_version": __version__,
        "checkpoint_version": CHECKPOINT_VERSION,
        "tasks": list(ckpt["config"]["model"]["tasks"]),
        "classes": list(dataset.get("classes", [])),
        "palette": [list(map(int, c)) for c in dataset.get("palette", [])],
        "input_scale": float(input_scale(ckpt)),
        "epoch": ckpt.get("epoch"),
        "dataset": dataset,
        "config": ckpt["config"],
        "files": {WEIGHTS_FILE: {"bytes": len(weights), "sha256": hashlib.sha256(weights).hexdigest()}},
    }


def _export_onnx(ckpt: dict[str, Any], path: Path | None, out: Path) -> str:
    """Export ``model.onnx`` (from ``path``, or a temporary checkpoint of ``ckpt``); returns the card's note."""
    from densemtl.deploy.export import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            path = save_checkpoint(Path(tmp) / "model.pt", ckpt)
        report = export_checkpoint(path, out, dynamic=True, progress=False)
    parity = report.get("parity", {})
    return (
        f"`{ONNX_FILE}`: opset 18, dynamic batch and size, input `image` (B, 3, H, W) RGB in [0, 1]; ONNX Runtime "
        f"matched PyTorch on {parity.get('images', 0)} images ({parity.get('inputs', 'random')})"
    )


def _publish(staging: Path, out: Path) -> None:
    """Move the finished folder in: one rename for a new or empty ``out``, else file by file, config.json last."""
    if not out.exists() or not any(out.iterdir()):
        os.replace(staging, out)
        return
    names = {p.name for p in staging.iterdir()}
    for name in sorted(names - {CONFIG_FILE}):
        os.replace(staging / name, out / name)
    for stale in set(OWN_FILES) - names:  # e.g. an old model.onnx that no longer matches the weights
        (out / stale).unlink(missing_ok=True)
    os.replace(staging / CONFIG_FILE, out / CONFIG_FILE)
    staging.rmdir()


# ------------------------------------------------------------------------------------------------------ load
def resolve_folder(path_or_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of ``path_or_id``: a folder as it is, a Hub id ``org/name`` downloaded (or cached)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise PretrainedError(
            f"{path} is a file: pass the folder holding {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(a .pt checkpoint loads with Predictor.from_checkpoint)"
        )
    if not hub.looks_like_repo_id(str(path_or_id)):
        raise FileNotFoundError(f"{path} is neither a folder nor a Hub model id (org/name): check the path")
    return hub.download(str(path_or_id), DOWNLOAD_FILES, revision, cache_dir)


def read_config(folder: Path) -> dict[str, Any]:
    """``folder``'s config.json, refused unless it is a densemtl pretrained folder this version can read."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PretrainedError(
            f"{folder} has no {CONFIG_FILE}: it is not a densemtl pretrained folder; write one with "
            f"`densemtl save-pretrained --checkpoint best.pt --out {folder}`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path} is not valid JSON ({e}): re-download or re-save the folder") from e
    if not isinstance(meta, dict) or meta.get("format") != PRETRAINED_FORMAT:
        owner = meta.get("model_type") or meta.get("library_name") if isinstance(meta, dict) else None
        hint = f" (it describes a {owner!r} model)" if owner else ""
        raise PretrainedError(
            f"{path} has no \"format\": \"{PRETRAINED_FORMAT}\" tag{hint}: the folder comes from another "
            "library; densemtl loads only folders written by densemtl save-pretrained"
        )
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > PRETRAINED_VERSION:
        raise PretrainedError(
            f"{path} has format_version {meta.get('format_version')!r}; this densemtl reads version "
            f"{PRETRAINED_VERSION}: upgrade densemtl"
        )
    return meta


def read_weights(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``model.safetensors`` of ``folder``, refused when its size or SHA-256 differs from config.json's."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise PretrainedError(f"{folder} has no {WEIGHTS_FILE}: re-download or re-save the folder")
    data, want = path.read_bytes(), meta.get("files", {}).get(WEIGHTS_FILE, {})
    if "bytes" in want and len(data) != want["bytes"]:
        raise PretrainedError(
            f"{path} is truncated or incomplete ({len(data)} of {want['bytes']} bytes; an interrupted download "
            "or copy?): re-download or re-save it"
        )
    if "sha256" in want and hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise PretrainedError(
            f"{path} is corrupt or from another save (its SHA-256 differs from {CONFIG_FILE}'s): re-download "
            "or re-save the folder"
        )
    try:
        return safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
        raise PretrainedError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: re-download or "
            "re-save it"
        ) from e


def check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise :class:`PretrainedError` naming the first tensor that is missing, unexpected or of another shape."""
    expected = model.state_dict()
    for name, ref in expected.items():
        got = tensors.get(name)
        if got is None:
            problem = f"tensor {name!r} {tuple(ref.shape)} is missing"
        elif got.shape != ref.shape or got.dtype != ref.dtype:
            need = f"{tuple(ref.shape)} {ref.dtype}"
            problem = f"tensor {name!r} is {tuple(got.shape)} {got.dtype}, the model needs {need}"
        else:
            continue
        break
    else:
        extra = [k for k in tensors if k not in expected]
        if not extra:
            return
        problem = f"unexpected tensor {extra[0]!r} {tuple(tensors[extra[0]].shape)} ({len(extra)} in all)"
    raise PretrainedError(
        f"{where}: {problem}: {WEIGHTS_FILE} does not fit the model {CONFIG_FILE} describes (edited, or mixed "
        "from two saves); re-save the folder from its checkpoint"
    )


def load_pretrained(
    path_or_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[nn.Module, dict[str, Any], Config]:
    """Build a pretrained folder's (or Hub model's) network with its weights, on the CPU in eval mode.

    Returns:
        ``(model, info, cfg)``: ``info`` is the dataset facts a ``Predictor`` takes (classes, palette, ...) plus
        ``input_scale``; ``cfg`` the typed config it was trained with.
    """
    from densemtl.models import build_model

    folder = resolve_folder(path_or_id, revision, cache_dir)
    meta = read_config(folder)
    try:
        cfg = from_dict(Config, meta["config"], f"{folder / CONFIG_FILE}: config")
    except (ConfigError, KeyError) as e:
        raise PretrainedError(f"{e}; the folder was written by another densemtl version: re-save it") from e
    try:
        check_heads_current(int(meta.get("checkpoint_version", 1)), cfg.model.tasks, folder)
    except CheckpointError as e:
        raise PretrainedError(str(e)) from e
    tensors = read_weights(folder, meta)
    model = build_model(replace(cfg.model, pretrained="none", backbone_weights=""))  # weights come from the file
    check_tensors(model, tensors, folder / WEIGHTS_FILE)
    model.load_state_dict(tensors, strict=True)
    info = {**meta.get("dataset", {}), "input_scale": float(meta.get("input_scale", 1.0))}
    return model.eval(), info, cfg


def model_from_pretrained(
    path_or_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> nn.Module:
    """Just the network of :func:`load_pretrained`."""
    return load_pretrained(path_or_id, revision, cache_dir)[0]


def init_from_pretrained(model: nn.Module, path_or_id: str | Path, model_cfg: ModelConfig) -> dict[str, list[str]]:
    """Start ``model`` (built from ``model_cfg``) from a pretrained folder's weights: ``model.init_from``.

    Every tensor whose name and shape match is copied; the rest keep their fresh values and are logged (e.g. a
    segmentation head for another class count, a task the folder lacks). A folder with another backbone, or one
    that shares no tensor, is refused. Returns ``{"loaded": [...], "skipped": [...]}`` (tensor names).
    """
    try:
        folder = resolve_folder(path_or_id)
        meta = read_config(folder)
    except (PretrainedError, FileNotFoundError, hub.HubUnavailableError) as e:
        raise type(e)(f"model.init_from={path_or_id}: {e}") from e
    theirs = meta.get("config", {}).get("model", {}).get("backbone")
    if theirs != model_cfg.backbone:
        raise PretrainedError(
            f"model.init_from={path_or_id}: it has backbone {theirs!r} but model.backbone is "
            f"{model_cfg.backbone!r}; set model.backbone={theirs} or choose another folder"
        )
    tensors, own = read_weights(folder, meta), model.state_dict()
    fits = {k: v for k, v in tensors.items() if k in own and v.shape == own[k].shape}
    if not fits:
        raise PretrainedError(f"model.init_from={path_or_id}: no tensor fits this model; check model settings")
    model.load_state_dict(fits, strict=False)
    skipped = [k for k in own if k not in fits]
    if skipped:
        log.warning("model.init_from=%s: %d of %d tensors start fresh (no match), e.g. %s",
                    path_or_id, len(skipped), len(own), skipped[:3])  # fmt: skip
    return {"loaded": list(fits), "skipped": skipped}


# ------------------------------------------------------------------------------------------------------ push
def push_to_hub(
    folder_or_checkpoint: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a pretrained folder (checked first) or a checkpoint (saved to a temporary folder) to ``repo_id``.

    Creates the model repository if needed (``private`` applies then). Offline it fails within seconds with
    :class:`~densemtl.deploy.hub.HubUnavailableError`. Returns the commit URL.
    """
    if not hub.looks_like_repo_id(repo_id):
        raise ValueError(f"--repo {repo_id!r}: a Hub model id is org/name (or user/name)")
    src = Path(folder_or_checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist: give a pretrained folder or a .pt checkpoint")
    hub.ensure_online(repo_id, src)
    if src.is_dir():
        read_weights(src, read_config(src))  # never publish a folder that would not load
        files = [n for n in OWN_FILES if (src / n).is_file()]
        return hub.upload(src, repo_id, files, private, token, commit_message)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(src, Path(tmp) / src.stem)
        files = [n for n in OWN_FILES if (folder / n).is_file()]
        return hub.upload(folder, repo_id, files, private, token, commit_message)
