"""Joint transforms over the whole sample dict, built on torchvision ``transforms.v2.functional``.

Every geometric transform draws its parameters once and applies them to the image and every target, each its
own way: the image bilinearly with antialiasing, every task's target as its task says (``Task.resize_target``,
``crop_target``, ``flip_target``: dense targets resample with ``Task.interpolation``, nearest neighbour for
labels, depth and normals, so that no label or depth value is ever invented between two objects, and pad with
the task's ``fill``, 255 for labels, 0 for depth and normals; boxes go through torchvision's box kernels). The camera intrinsics follow the geometry, in the
pixel-centre convention (pixel ``u`` covers ``[u - 0.5, u + 0.5]``), so ``u = fx * X / Z + cx`` keeps holding
after the transform. Keys the transforms do not know (``id``, ``valid_tasks``, ...) pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from densemtl.tasks import TASKS

Sample = dict[str, Any]


def _tasks_in(sample: Sample) -> list[str]:
    """The task targets ``sample`` carries."""
    return [k for k in TASKS if k in sample]


def _image_size(sample: Sample) -> tuple[int, int]:
    h, w = sample["image"].shape[-2:]
    return int(h), int(w)


def _image(t: torch.Tensor) -> torch.Tensor:
    """The RGB as a ``tv_tensors.Image`` so v2 kernels resample it as an image."""
    return t if isinstance(t, tv_tensors.TVTensor) else tv_tensors.Image(t)


def _update_intrinsics(sample: Sample, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply ``fn`` to [fx, fy, cx, cy] when the sample has known intrinsics (zeros stay zeros)."""
    if "intrinsics" in sample and bool(sample.get("has_intrinsics", True)):
        sample["intrinsics"] = fn(sample["intrinsics"].clone().float())


def resize_sample(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize the image and every target to ``size`` (H, W) and rescale the intrinsics.

    Resizing is a zoom about the camera: the scene is unchanged, only the focal length changes, so depth
    stays metric and keeps its values while fx, fy, cx, cy scale with the image.
    """
    h, w = _image_size(sample)
    if (h, w) == tuple(size):
        return sample
    out = dict(sample)
    out["image"] = F.resize(_image(out["image"]), list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    for key in _tasks_in(out):
        out[key] = TASKS[key].resize_target(out[key], size)
    sx, sy = size[1] / w, size[0] / h

    def scale(k: torch.Tensor) -> torch.Tensor:
        return torch.stack([k[0] * sx, k[1] * sy, (k[2] + 0.5) * sx - 0.5, (k[3] + 0.5) * sy - 0.5])

    _update_intrinsics(out, scale)
    return out


def crop_sample(sample: Sample, top: int, left: int, height: int, width: int) -> Sample:
    """Crop the image and every target to the window (top, left, height, width).

    The window may extend past the image (negative ``top``/``left`` or beyond the far edge): those pixels
    are filled (image 0, semseg 255, depth 0, normals 0; boxes are clamped, see ``Task.crop_target``). The
    principal point shifts by the window origin.
    """
    h, w = _image_size(sample)
    pad = [max(0, -left), max(0, -top), max(0, left + width - w), max(0, top + height - h)]  # l, t, r, b
    out = dict(sample)
    image = _image(out["image"])
    image = F.pad(image, pad, fill=0.0) if any(pad) else image
    out["image"] = F.crop(image, top + pad[1], left + pad[0], height, width)
    for key in _tasks_in(out):
        out[key] = TASKS[key].crop_target(out[key], top, left, height, width)
    _update_intrinsics(out, lambda k: torch.stack([k[0], k[1], k[2] - left, k[3] - top]))
    return out


def hflip_sample(sample: Sample) -> Sample:
    """Mirror the image and every target left-right (each task fixes mirrored values: ``Task.flip_target``,
    e.g. normals negate x, 3-D boxes mirror); cx -> W - 1 - cx."""
    w = _image_size(sample)[1]
    out = dict(sample)
    out["image"] = F.horizontal_flip(_image(out["image"]))
    for key in _tasks_in(out):
        out[key] = TASKS[key].flip_target(out[key])
    _update_intrinsics(out, lambda k: torch.stack([k[0], k[1], (w - 1) - k[2], k[3]]))
    return out


def _scaled_size(size: tuple[int, int], s: float) -> tuple[int, int]:
    return max(1, round(size[0] * s)), max(1, round(size[1] * s))


class Rescale:
    """Resize by a fixed factor (evaluation at a progressive-resolution phase)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, sample: Sample) -> Sample:
        return resize_sample(sample, _scaled_size(_image_size(sample), self.scale))

    def __repr__(self) -> str:
        return f"Rescale({self.scale})"


class RandomRescale:
    """Resize by ``base_scale * U(lo, hi)``, one factor per sample shared by all keys."""

    def __init__(self, scale_range: tuple[float, float], base_scale: float = 1.0) -> None:
        self.scale_range = scale_range
        self.base_scale = base_scale

    def __call__(self, sample: Sample) -> Sample:
        lo, hi = self.scale_range
        s = self.base_scale * (lo + (hi - lo) * torch.rand(()).item())
        return resize_sample(sample, _scaled_size(_image_size(sample), s))

    def __repr__(self) -> str:
        return f"RandomRescale({self.scale_range}, base_scale={self.base_scale})"


class RandomCrop:
    """Random (H, W) window; when the image is smaller it lands at a random place on a filled canvas."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, sample: Sample) -> Sample:
        h, w = _image_size(sample)
        ch, cw = self.size
        top = _randint_between(h - ch, 0) if h < ch else _randint_between(0, h - ch)
        left = _randint_between(w - cw, 0) if w < cw else _randint_between(0, w - cw)
        return crop_sample(sample, top, left, ch, cw)

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


def _randint_between(lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from torch's generator (reseeded per DataLoader worker)."""
    return int(torch.randint(lo, hi + 1, ()).item())


class RandomHorizontalFlip:
    """Mirror the sample with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample) -> Sample:
        return hflip_sample(sample) if torch.rand(()).item() < self.p else sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ImageOnly:
    """Apply a photometric transform to ``sample["image"]`` alone; targets are left untouched."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, sample: Sample) -> Sample:
        return {**sample, "image": self.transform(sample["image"])}

    def __repr__(self) -> str:
        return f"ImageOnly({self.transform!r})"


class ToPlainTensors:
    """Unwrap tv_tensors into plain tensors for collation and the model (which normalises the RGB itself); each
    task makes its target one fixed-shape tensor (``Task.pack``: e.g. boxes padded to a fixed count)."""

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        out["image"] = out["image"].as_subclass(torch.Tensor)
        for key in _tasks_in(out):
            out[key] = TASKS[key].pack(out[key], out)
        return out

    def __repr__(self) -> str:
        return "ToPlainTensors()"


def build_transforms(
    train: bool,
    crop: tuple[int, int] | None,
    scale_range: tuple[float, float] = (0.75, 1.25),
    hflip: bool = True,
    color_jitter: float = 0.2,
    base_scale: float = 1.0,
) -> Callable[[Sample], Sample]:
    """The training or evaluation pipeline for a sample dict.

    Args:
        train: random scale, crop, flip and colour jitter when True; a plain resize when False.
        crop: training crop (H, W) at full resolution; it shrinks with ``base_scale``. None = no crop.
        scale_range: random zoom factors about the camera (depth unchanged, intrinsics scaled).
        hflip: random left-right mirroring (p = 0.5).
        color_jitter: brightness/contrast/saturation strength on the image only; 0 disables.
        base_scale: resolution of a progressive-training phase (e.g. 0.25, 0.5, 1.0).
    """
    steps: list[Callable[[Sample], Sample]] = []
    if train:
        steps.append(RandomRescale(scale_range, base_scale))
        if crop is not None:
            steps.append(
                RandomCrop((max(1, round(crop[0] * base_scale)), max(1, round(crop[1] * base_scale))))
            )
        if hflip:
            steps.append(RandomHorizontalFlip(0.5))
        if color_jitter > 0:
            jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
            steps.append(ImageOnly(jitter))
    elif not math.isclose(base_scale, 1.0):
        steps.append(Rescale(base_scale))
    steps.append(ToPlainTensors())
    return v2.Compose(steps)
