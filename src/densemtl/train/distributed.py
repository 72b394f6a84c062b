"""Data-parallel training with PyTorch's own machinery: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node N -m densemtl train ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`init_distributed` turns those into a process group (NCCL on CUDA, gloo on CPU) and
picks this process's device. Without those variables everything here is a no-op and training runs as one
process. See docs/distributed.md.

Conventions: ``train.batch_size`` is per process (the global batch is N times larger, as in torchvision's
references); every process trains on its own shard of each epoch (``DistributedSampler`` reshuffled per epoch
with ``set_epoch``); evaluation splits the validation set into disjoint shards with no padding and sums the
metric accumulators over processes, so the numbers equal a single-process evaluation of the same model; only
rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler, Sampler

from densemtl.runtime import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global rank, number of processes, rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, prints and writes checkpoints."""
        return self.rank == 0


def env_from_environ() -> DistEnv:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (defaults: one process)."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init_distributed(device_name: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the torchrun job (if any) and return this process's place in it and its device.

    CUDA processes use GPU ``LOCAL_RANK`` and NCCL; CPU processes use gloo. Calling it again in an
    initialised process reuses the existing group.
    """
    env = env_from_environ()
    device = resolve_device(device_name)
    if not env.enabled:
        return env, device
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {env.local_rank} but only {torch.cuda.device_count()} GPU(s) here; "
                "set torchrun --nproc_per_node to at most the number of GPUs per machine"
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env, device


def cleanup() -> None:
    """Leave the process group (end of training)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True in rank 0 or when not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def wrap_model(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (optionally with SyncBatchNorm); unchanged when not distributed.

    SyncBatchNorm computes batch statistics over all processes: worth it when the per-process batch is small
    (a few high-resolution crops), at the cost of one all-reduce per BN layer.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def check_loss_supported(loss_fn: torch.nn.Module) -> None:
    """Refuse task weightings that DDP would silently get wrong.

    DDP averages the model's gradients only: learned task weights in the loss would drift apart between
    processes, and methods that need per-task gradients (GradNorm, PCGrad; ``needs_task_gradients``) would see
    one shard's gradients.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    weighting = getattr(loss_fn, "weighting", loss_fn)
    learned = any(p.requires_grad for p in loss_fn.parameters())
    if learned or getattr(weighting, "needs_task_gradients", False):
        name = type(weighting).__name__
        raise ValueError(
            f"loss weighting {name} is not supported with several processes (learned weights or per-task "
            "gradients are not synchronised by DDP); use loss.weighting=fixed, or train in one process"
        )


class ShardSampler(Sampler[int]):
    """Disjoint, unpadded shards ``rank::world`` of a dataset, in order (for evaluation).

    ``DistributedSampler`` pads with repeated samples so every rank has the same count; repeated samples would
    be counted twice by the metrics. Metric accumulators are summed, so uneven shards are fine.
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_sampler(dataset: Sized, seed: int, epoch: int) -> DistributedSampler | None:
    """A per-epoch reshuffled shard of ``dataset`` for this rank, or None when not distributed.

    ``drop_last`` keeps every rank at the same number of batches (DDP needs the same number of steps).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


def eval_sampler(dataset: Sized) -> ShardSampler | None:
    """This rank's evaluation shard, or None when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return ShardSampler(dataset, dist.get_rank(), dist.get_world_size())


def samples_per_rank(n: int) -> int:
    """How many training samples one rank sees per epoch (``drop_last`` sharding)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return n // world


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps parameters identical but each rank updates its BN statistics on its own shard; evaluating rank
    0's exact model everywhere makes the reduced metrics those of the checkpoint rank 0 writes.
    """
    if dist.is_available() and dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Average numeric training statistics over ranks (counts such as images/s are summed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    keys = sorted(k for k, v in stats.items() if isinstance(v, int | float))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    summed = {"images_per_s", "skipped_batches"}
    return {
        **stats,
        **{k: float(v) if k in summed else float(v) / world for k, v in zip(keys, t.tolist(), strict=True)},
    }
