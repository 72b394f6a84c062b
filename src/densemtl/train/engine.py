"""The training loop: ``train_one_epoch``, ``evaluate`` and ``train``, each readable top to bottom.

In the spirit of torchvision's ``references/segmentation/train.py``: plain PyTorch, one optimiser, one schedule,
checkpoints every epoch. Everything that varies by task lives in the model, the loss and the metrics (all keyed by
task name), so nothing here changes when a task is added.

Exact resume: every epoch reseeds all RNGs from (seed, epoch) and the LR schedule is a function of the global step,
so a run resumed from ``last.pt`` after epoch k reproduces epochs k+1.. of an uninterrupted run.

The run folder (docs/run_folder.md): one training at a time holds its lock; a folder that holds something is only
reused to resume or with ``overwrite``; everything is checked (config, dataset, files of both splits) before the
first step and before anything in the folder changes. After each epoch ``last.pt`` is saved before validating (a
failing validation loses no training; a resume validates that epoch first), then ``best.pt`` and ``last.pt`` with
the metrics, then the metrics line: a line never describes a checkpoint that is not on disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from densemtl.config import Config, replace
from densemtl.data.loaders import build_dataset, make_loader
from densemtl.evaluation import evaluate
from densemtl.runtime import (
    amp_dtype,
    autocast,
    seed_everything,
    to_device,
)
from densemtl.tasks import TASKS
from densemtl.train.checkpoint import (
    RunCheckpoints,
    load_checkpoint,
    make_payload,
    restore_training_state,
    rng_state,
)
from densemtl.train.distributed import (
    broadcast_buffers,
    check_loss_supported,
    cleanup,
    env_from_environ,
    eval_sampler,
    init_distributed,
    mean_over_ranks,
    samples_per_rank,
    train_sampler,
    wrap_model,
)
from densemtl.train.runfolder import open_run_folder
from densemtl.train.runlog import Progress, RunLog, epoch_line, open_run_files, out_of_memory_message
from densemtl.train.schedule import Phase, StepSchedule, phase_for_epoch, resolve_phases, total_epochs
from densemtl.train.weighting import backward_step, epoch_end, task_weights

log = logging.getLogger("densemtl")


class NonFiniteLossError(RuntimeError, ValueError):
    """Too many consecutive batches with a non-finite loss or gradient (a ValueError: the CLI prints it)."""


class TrainingOutOfMemoryError(RuntimeError, ValueError):
    """A training batch did not fit on the device; the message says what to lower."""


def _finite_or_skip(loss: torch.Tensor, params: Iterable[torch.nn.Parameter], clip: float) -> bool:
    """Clip gradients and report whether the loss and the gradient norm are both finite."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    return bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))


def _skip_batch(losses, scaler, scheduler, epoch: int, consecutive_bad: int, max_nonfinite: int) -> None:
    """Drop a batch whose loss or gradient is not finite; stop after ``max_nonfinite`` in a row."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    log.warning("epoch %d: non-finite loss or gradient, batch skipped (%s)", epoch + 1, values)
    scaler.update()  # lets the fp16 scaler back off; a no-op when disabled
    if consecutive_bad >= max_nonfinite:
        raise NonFiniteLossError(
            f"{consecutive_bad} consecutive non-finite batches in epoch {epoch + 1}: lower train.lr, "
            "check the data with `densemtl data check`, or disable AMP (train.amp=false)"
        )
    scheduler.step()  # the schedule is a function of the global step, skipped batches included


def train_one_epoch(
    model,
    loss_fn,
    loader,
    optimizer,
    scheduler,
    scaler,
    device: torch.device,
    cfg: Config,
    epoch: int,
    max_nonfinite: int,
    on_step: Callable[[dict[str, float], int], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean per-task losses, images/s and the number of skipped batches.

    ``on_step(record, step)`` receives every optimiser step's per-task losses and task weights (adaptive
    weightings change them every step), ``step`` counting scheduler steps since the start of training.
    """
    model.train()
    dtype = amp_dtype(device, cfg.train.amp)
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}  # summed task weights (adaptive weightings change them every step)
    steps = skipped = consecutive_bad = images = 0
    start = time.perf_counter()
    bar = Progress(loader, f"epoch {epoch + 1}")  # a tqdm bar on a terminal, plain lines in a log file
    for batch in bar:
        batch = to_device(batch, device, cfg.train.channels_last)
        with autocast(device, dtype):
            outputs = model(batch["image"])
        losses = loss_fn({k: v.float() for k, v in outputs.items()}, batch)  # losses in fp32
        optimizer.zero_grad(set_to_none=True)
        backward_step(loss_fn, losses, model, scaler)  # per-task gradients for PCGrad/GradNorm/CAGrad
        scaler.unscale_(optimizer)
        if not _finite_or_skip(losses["total"], model.parameters(), cfg.train.grad_clip):
            skipped, consecutive_bad = skipped + 1, consecutive_bad + 1
            _skip_batch(losses, scaler, scheduler, epoch, consecutive_bad, max_nonfinite)
            continue
        consecutive_bad = 0
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        steps += 1
        images += batch["image"].shape[0]
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        now = task_weights(loss_fn)
        for t, w in now.items():
            weights[t] = weights.get(t, 0.0) + w
        if on_step is not None:
            record = {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
            on_step({**record, **{f"weight/{t}": w for t, w in now.items()}}, scheduler.last_epoch)
        if steps % cfg.train.log_every == 0 or steps == 1:
            bar.set_postfix(
                loss=f"{sums['total'] / steps:.3f}",
                lr=f"{scheduler.get_last_lr()[-1]:.2e}",
                ips=f"{images / (time.perf_counter() - start):.1f}",
            )
    seconds = time.perf_counter() - start
    stats = {f"loss/{k}": v / max(steps, 1) for k, v in sums.items()}
    stats.update({f"weight/{t}": w / max(steps, 1) for t, w in weights.items()})
    stats.update(
        {
            "images_per_s": images / max(seconds, 1e-9),
            "skipped_batches": skipped,
            "train_seconds": seconds,
            "lr": scheduler.get_last_lr()[-1],
        }
    )
    return stats


def resolve_config(cfg: Config, info: dict[str, Any]) -> Config:
    """Fill what the dataset decides (number of classes, each task's own: ``Task.resolve_model_config``) and
    check the tasks exist in it."""
    missing = [t for t in cfg.model.tasks if not TASKS[t].available(info)]
    if missing:
        have = [t for t in TASKS if TASKS[t].available(info)]
        raise ValueError(
            f"{cfg.data.root}/dataset.json has data for tasks {have} but model.tasks asks for "
            f"{missing}; set model.tasks to a subset of the dataset's tasks"
        )
    n = len(info["classes"])
    if cfg.model.num_classes not in (0, n):
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.root} has {n} classes; "
            "leave model.num_classes at 0 to take it from the dataset"
        )
    model = replace(cfg.model, num_classes=n)
    for t in cfg.model.tasks:
        model = TASKS[t].resolve_model_config(model, info)
    return replace(cfg, model=model)


def build_optimizer(model, loss_fn, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the encoder at ``lr * encoder_lr_mult``; no weight decay on norms and biases."""
    t = cfg.train
    groups = []
    for params, mult in ((model.encoder_parameters(), t.encoder_lr_mult), (model.decoder_parameters(), 1.0)):
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": t.lr * mult, "weight_decay": t.weight_decay},
            {"params": no_decay, "lr": t.lr * mult, "weight_decay": 0.0},
        ]
    extra = [p for p in loss_fn.parameters() if p.requires_grad]  # learned task weights (adaptive weighting)
    if extra:
        groups.append({"params": extra, "lr": t.lr, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best if mode == "max" else value < best


def config_for_resume(path: str | Path, overrides: list[str]) -> Config:
    """The config stored in a checkpoint, with ``--set`` overrides applied (for ``train --resume``).

    ``train.out_dir`` becomes the checkpoint's own folder unless an override sets it: a copied run folder
    continues in the copy, not in the folder the checkpoint was first written to.
    """
    from densemtl.config import apply_overrides, from_dict

    cfg = from_dict(Config, apply_overrides(load_checkpoint(path)["config"], overrides))
    if any(o.split("=", 1)[0].strip() == "train.out_dir" for o in overrides):
        return cfg
    return replace(cfg, train=replace(cfg.train, out_dir=str(Path(path).parent)))


@dataclass
class Run:
    """Everything one training run holds, built once by :func:`setup` (a plain bag, not an abstraction)."""

    cfg: Config
    info: dict[str, Any]
    out: Path
    device: torch.device
    dist_env: Any
    model: torch.nn.Module
    net: torch.nn.Module  # ``model`` under DDP when started by torchrun, else ``model`` itself
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    phases: list[Phase]
    train_sets: dict[int, Any]
    val_loader: DataLoader
    metrics: Any


def setup(cfg: Config, check_files: bool = True, init_weights: bool = True) -> Run:
    """Resolve ``cfg`` against the dataset and build the model, loss, optimiser, schedule, data and metrics.

    Everything that would stop the run later is checked here (``check_files``: the files of both splits, see
    :mod:`densemtl.train.preflight`). Nothing is written: the run folder is :func:`train`'s. ``init_weights``:
    apply ``model.init_from`` (off for a resumed run, whose checkpoint holds every weight).
    """
    from densemtl.config import check_config
    from densemtl.data.format import read_dataset_json
    from densemtl.metrics import build_metrics, check_best_metric
    from densemtl.models import build_model
    from densemtl.train.losses import build_loss

    check_config(cfg)  # load_config checked these; a Config built in Python did not pass through it
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    dist_env, device = init_distributed(cfg.train.device)  # one process unless started by torchrun
    info = read_dataset_json(cfg.data.root)
    cfg = resolve_config(cfg, info)
    check_best_metric(cfg, info)  # before anything is trained or written, not after the first epoch
    out = Path(cfg.train.out_dir)
    seed_everything(cfg.train.seed, cfg.train.deterministic)

    model = build_model(cfg.model)
    if cfg.model.init_from and init_weights:
        from densemtl.deploy.pretrained import init_from_pretrained

        init_from_pretrained(model, cfg.model.init_from, cfg.model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = wrap_model(model, device, cfg.train.sync_bn)
    loss_fn = build_loss(cfg).to(device)
    check_loss_supported(loss_fn)
    optimizer = build_optimizer(model, loss_fn, cfg)
    phases = resolve_phases(cfg.train)
    train_sets = {p.index: build_dataset(cfg, cfg.data.train_split, True, p.scale) for p in phases}
    steps = [samples_per_rank(len(train_sets[p.index])) // p.batch_size for p in phases]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, StepSchedule(phases, steps, cfg.train.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device, cfg.train.amp) == torch.float16)
    val_set = build_dataset(cfg, cfg.data.val_split, False)
    val_loader = make_loader(
        val_set,
        cfg.train.batch_size,
        False,
        cfg.data.num_workers,
        cfg.train.seed,
        device,
        eval_sampler(val_set),
    )
    metrics = build_metrics(cfg, info)
    if check_files:
        from densemtl.train.preflight import check_before_training

        check_before_training(cfg, info, train_sets[phases[-1].index], val_set)
    return Run(
        cfg, info, out, device, dist_env, model, net, loss_fn, optimizer, scheduler, scaler, phases, train_sets,
        val_loader, metrics,
    )  # fmt: skip


def train_epoch(run: Run, epoch: int, runlog: RunLog | None) -> dict[str, float]:
    """Train one epoch (reseeded from (seed, epoch) for exact resume); returns its training stats."""
    cfg, phase = run.cfg, phase_for_epoch(run.phases, epoch)
    seed_everything(cfg.train.seed * 10_000 + epoch, cfg.train.deterministic)
    train_set = run.train_sets[phase.index]
    loader = make_loader(
        train_set, phase.batch_size, True, cfg.data.num_workers, cfg.train.seed * 10_000 + epoch, run.device,
        train_sampler(train_set, cfg.train.seed, epoch),
    )  # fmt: skip
    try:
        stats = train_one_epoch(
            run.net, run.loss_fn, loader, run.optimizer, run.scheduler, run.scaler, run.device, cfg, epoch,
            cfg.train.max_nonfinite, runlog.step if runlog is not None else None,
        )  # fmt: skip
    except torch.OutOfMemoryError as e:
        raise TrainingOutOfMemoryError(out_of_memory_message(phase, cfg, run.out)) from e
    stats = mean_over_ranks(stats)
    epoch_end(run.loss_fn, stats)  # DWA's per-epoch update, identical on every rank
    broadcast_buffers(run.model)  # every rank evaluates rank 0's model, the one its checkpoint holds
    return stats


def eval_scale_for(run: Run, epoch: int) -> float:
    """The input scale validation uses after ``epoch``: ``data.eval_scale``, else the phase's (as trained)."""
    return (
        run.cfg.data.eval_scale if run.cfg.data.eval_scale > 0 else phase_for_epoch(run.phases, epoch).scale
    )


def validate(run: Run, scale: float) -> dict[str, float]:
    """Evaluate the model on the validation split at ``scale``; returns the flat summary."""
    from densemtl.metrics import summarize

    cfg = run.cfg
    return summarize(
        evaluate(
            run.model, run.val_loader, run.metrics, run.device, cfg.train.amp, cfg.train.channels_last, scale
        )
    )


def epoch_payload(run: Run, epoch: int, scale: float, best: float | None, summary: dict[str, float], **extra):
    """The checkpoint payload after ``epoch``: weights plus everything an exact resume needs.

    ``extra``: ``stats`` (the epoch's training stats), ``validated`` (False for the copy saved before
    validating), ``record`` (the epoch's metrics line, restored on resume if a kill lost it).
    """
    return make_payload(
        run.cfg, run.model, run.info, optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(), loss=run.loss_fn.state_dict(), epoch=epoch, input_scale=scale, best=best,
        metrics=summary, rng=rng_state(), **extra,
    )  # fmt: skip


def train(cfg: Config, resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg``'s model on its dataset, evaluating and checkpointing after every epoch.

    Writes ``<out_dir>/{config.yaml, last.pt, best.pt, metrics.jsonl, steps.jsonl, tb/}`` while holding
    ``<out_dir>/train.lock``. A folder that already holds something is refused unless ``resume`` is a checkpoint
    in it or ``overwrite`` (which replaces those files once the setup has succeeded); see docs/run_folder.md.
    Returns the best value of ``train.best_metric``, the last evaluation summary and the run folder.
    """
    resume = Path(resume) if resume is not None else None
    if not env_from_environ().is_main:  # under torchrun only rank 0 owns (locks, checks, writes) the folder
        return _train(cfg, resume, overwrite)
    with open_run_folder(cfg.train.out_dir, resume, overwrite):
        return _train(cfg, resume, overwrite)


def _train(cfg: Config, resume: Path | None, overwrite: bool) -> dict[str, Any]:
    run = setup(cfg, init_weights=resume is None)  # everything is checked before the run folder changes
    ckpt = None
    if resume is not None:
        ckpt = restore_training_state(
            resume, run.cfg, run.model, run.optimizer, run.scheduler, run.scaler, run.loss_fn
        )
    runlog = (
        open_run_files(run.out, run.cfg, ckpt, overwrite, run.scheduler.last_epoch)
        if run.dist_env.is_main
        else None
    )
    try:
        best, summary = run_epochs(run, ckpt, runlog, resume)
    finally:
        if runlog is not None:
            runlog.close()
    if run.dist_env.enabled:
        cleanup()
    return {"best": best, "last": summary, "out_dir": str(run.out)}


def run_epochs(
    run: Run, ckpt: dict[str, Any] | None, runlog: RunLog | None, resumed: Path | None = None
) -> tuple[float | None, dict[str, float]]:
    """The epoch loop from the checkpoint ``ckpt`` (or the start); returns (best value, last summary)."""
    cfg, total = run.cfg, total_epochs(run.phases)
    start, best, pending = 0, None, None
    saver = RunCheckpoints(run.out, resumed, ckpt["epoch"] if ckpt is not None else None)
    if ckpt is not None:
        validated = ckpt.get("validated", True)
        start, best = ckpt["epoch"] + (1 if validated else 0), ckpt.get("best")
        pending = None if validated else ckpt.get("stats", {})  # killed while validating: validate it first
    summary: dict[str, float] = {}
    for epoch in range(start, total):
        phase, scale = phase_for_epoch(run.phases, epoch), eval_scale_for(run, epoch)
        if pending is None:
            stats = train_epoch(run, epoch, runlog)
            if runlog is not None:  # only rank 0 writes; a failing validation then loses no training
                saver.save(
                    "last.pt", epoch_payload(run, epoch, scale, best, {}, stats=stats, validated=False)
                )
        else:
            stats, pending = pending, None
        summary = validate(run, scale)
        value = summary[cfg.train.best_metric]
        is_best = _better(value, best, cfg.train.best_mode)
        best = value if is_best else best
        if runlog is None:  # not rank 0: only rank 0 logs and writes checkpoints
            continue
        val = {f"val/{k}": v for k, v in summary.items()}
        record = {"epoch": epoch + 1, "phase": phase.index, "scale": phase.scale, **stats, **val}
        payload = epoch_payload(run, epoch, scale, best, summary, stats=stats, validated=True, record=record)
        if is_best:  # best.pt before last.pt: a kill in between re-validates this epoch on resume
            saver.save("best.pt", payload)
        saver.save("last.pt", payload)
        runlog.write(record, epoch + 1)  # after the checkpoint it describes
        print(epoch_line(epoch, total, phase, stats, summary), flush=True)
    return best, summary
