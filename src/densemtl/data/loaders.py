"""Datasets and loaders as training and evaluation build them: the split's transforms, seeded loading, DDP shards."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from densemtl.config import Config
from densemtl.data.folder import FolderDataset
from densemtl.data.transforms import build_transforms
from densemtl.runtime import seed_worker


def build_dataset(cfg: Config, split: str, train: bool, base_scale: float = 1.0):
    """A FolderDataset for ``split`` with the training or evaluation transforms at ``base_scale``."""
    d = cfg.data
    transform = build_transforms(
        train=train,
        crop=d.crop if train else None,
        scale_range=d.scale_range,
        hflip=d.hflip,
        color_jitter=d.color_jitter,
        base_scale=base_scale,
    )
    return FolderDataset(
        d.root, split=split, transform=transform, tasks=cfg.model.tasks, max_samples=d.max_samples
    )


def make_loader(
    dataset, batch_size: int, train: bool, workers: int, seed: int, device: torch.device, sampler=None
) -> DataLoader:
    """DataLoader whose order and augmentation depend only on ``seed`` (reseeded per epoch by the caller).

    ``sampler`` (this process's shard under DDP, see ``densemtl.train.distributed``) replaces the shuffling.
    """
    n = len(sampler) if sampler is not None else len(dataset)
    if train and n < batch_size:
        raise ValueError(
            f"{n} training samples (per process) cannot fill one batch of {batch_size}; "
            "lower train.batch_size or add data"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
