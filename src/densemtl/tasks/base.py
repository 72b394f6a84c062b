"""What a task is: the :class:`Task` interface every task module implements, and the pieces they share.

A task owns everything that is particular to one dense output: the sample file it reads and how that resamples,
its head, loss, metrics and trivial baseline, how its raw output becomes NumPy results, files and pictures, its
ONNX outputs and their parity check. The training loop, evaluation, export, the ONNX Runtime backend, the
Predictor, reports and previews loop over ``model.tasks`` and call these methods; none of them names a task.

A new task is a subclass of :class:`Task` put into :data:`densemtl.tasks.TASKS` under its name (see
docs/tasks.md, whose example is the toy task of tests/test_task_plugin.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from densemtl.data.format import decoded_size
from densemtl.models.decoders import resize

if TYPE_CHECKING:
    from densemtl.config import Config, ModelConfig

IGNORE_INDEX = 255  # segmentation pixels with this id carry no label
INVALID_DEPTH = 0.0  # depth pixels with this value carry no measurement

Info = dict[str, Any]  # a dataset.json (or the copy a checkpoint or ONNX file carries)


class Accumulator:
    """Dataset-level metric state: named tensors that are summed when merged or all-reduced.

    Subclasses fill ``self._state`` in ``reset()``, add to it in ``update(pred, target)`` and turn it into a
    dict of metrics in ``compute()``. Only integer counts and float64 sums are kept, so results do not depend on
    how the dataset was batched, and ``merge`` / ``all_reduce`` give the same numbers in DDP as in one process.
    """

    _state: dict[str, Tensor]

    def reset(self) -> None:
        """Forget everything accumulated."""
        raise NotImplementedError

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predictions (as the model returns them) and targets (as the dataset returns them)."""
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        """Metrics over everything accumulated so far."""
        raise NotImplementedError

    def state(self) -> dict[str, Tensor]:
        """The accumulated tensors (live references; merging adds to them)."""
        return self._state

    def merge(self, other: Accumulator) -> None:
        """Add another accumulator's counts (e.g. another worker's) to this one."""
        for k, v in self._state.items():
            v += other.state()[k].to(v.device, v.dtype)

    def all_reduce(self) -> None:
        """Sum the state over all processes when torch.distributed is initialised; no-op otherwise."""
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (a rank may have seen no data)
                self._to(torch.device("cuda", torch.cuda.current_device()))
            for v in self._state.values():
                dist.all_reduce(v, op=dist.ReduceOp.SUM)

    def _to(self, device: torch.device) -> None:
        if next(iter(self._state.values())).device != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}


class Joined(Accumulator):
    """Several accumulators fed the same batches, their results in one dict (e.g. a task's metrics and its
    uncertainty metrics); each part merges and all-reduces its own state."""

    def __init__(self, *parts: Accumulator) -> None:
        self.parts = parts

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    def update(self, pred: Tensor, target: Tensor) -> None:
        for p in self.parts:
            p.update(pred, target)

    def compute(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for p in self.parts:
            result.update(p.compute())
        return result

    def state(self) -> dict[str, Tensor]:
        return {f"{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.state().items()}

    def merge(self, other: Accumulator) -> None:
        for p, q in zip(self.parts, other.parts, strict=True):  # type: ignore[attr-defined]
            p.merge(q)

    def all_reduce(self) -> None:
        for p in self.parts:
            p.all_reduce()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is True; exactly 0 (with zero gradients) when nothing is valid.

    ``values`` must be finite everywhere (also where masked out): ``where`` would still route NaN gradients.
    """
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def nanmean(x: Tensor) -> float:
    """Mean of the non-NaN entries; NaN when there are none."""
    finite = x[~torch.isnan(x)]
    return float(finite.mean()) if finite.numel() else math.nan


class Task:
    """One dense prediction task; subclass it and override what differs from these defaults.

    Class attributes:
        name: key of the task everywhere (model outputs, sample dicts, losses, metrics, config).
        folder: sub-folder of a split holding the task's ``<id>.png`` files in the folder format.
        interpolation: how the target resamples in geometric transforms (labels and measurements: nearest).
        fill: the target value that means "no label" (padding, samples without a file).
        headline: a higher-is-better metric in ``[0, 1]``; the mean over tasks is ``score`` (best checkpoint).
        lower_is_better: metric names where lower is better (for Δm).
        outputs: the keys :meth:`to_numpy` returns (``Predictor.predict`` results).
        console: the metrics the per-epoch console line shows (default: the headline).
        uses_classes: the task depends on the dataset's class list (a model can only be evaluated on, or
            pseudo-label, a dataset with the same classes).
        min_checkpoint_version: checkpoints older than this version (``train.checkpoint.CHECKPOINT_VERSION``)
            trained this task's head to output something else; loading one is refused.
        uses_focal: :meth:`to_numpy` takes ``focal_px``, the camera's focal length in pixels of the image
            (None when unknown), because its outputs depend on it (an object's distance).
        hub_pipeline_tag: the Hugging Face Hub ``pipeline_tag`` for a model card ('' for none).
        suffix: the file name ending of the task's files in :attr:`folder`.
    """

    name: str = ""
    folder: str = ""
    interpolation: InterpolationMode = InterpolationMode.NEAREST_EXACT
    fill: float = 0.0
    headline: str = ""
    lower_is_better: frozenset[str] = frozenset()
    outputs: tuple[str, ...] = ()
    console: tuple[str, ...] = ()
    uses_classes: bool = False
    uses_focal: bool = False
    min_checkpoint_version: int = 1
    hub_pipeline_tag: str = ""  # the Hugging Face Hub pipeline tag a model card may carry for this task
    suffix: str = ".png"
    has_baseline: bool = True  # False: fit_baseline is None, so evaluation reads no training targets for it

    # ------------------------------------------------------------------------------------------------ data
    def available(self, info: Info) -> bool:
        """Whether dataset ``info`` (a dataset.json) can train this task: by default, it lists the task."""
        return self.name in info.get("tasks", [])

    def resolve_model_config(self, cfg: ModelConfig, info: Info) -> ModelConfig:
        """``cfg`` with what the dataset decides for this task filled in (e.g. its class names); raises
        ``ValueError`` naming the key when ``cfg`` contradicts the dataset."""
        return cfg

    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        """Read and check the task's file for an image of ``size`` (H, W); raise ``DatasetFormatError``."""
        raise NotImplementedError

    def quick_check(self, path: Path, size: tuple[int, int], info: Info) -> list[str]:
        """Problems of the task's file for an image of ``size`` found cheaply, before training (the loader
        checks everything as it reads): by default, that the image file decodes and has the image's size."""
        try:
            found = decoded_size(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBomb...)
            return [f"{path}: cannot decode {self.name} file ({type(e).__name__}: {e}); re-export it"]
        if found not in (size, size[::-1]):  # either way round: EXIF may rotate the image (the loader knows)
            return [
                f"{path}: {self.name} is {found[1]}x{found[0]} (WxH) but its image is {size[1]}x{size[0]}; "
                "targets must match the image pixel for pixel"
            ]
        return []

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        """The target tensor of one sample from :meth:`load`'s array, or all-``fill`` when it is None."""
        raise NotImplementedError

    def encode(self, array: np.ndarray) -> np.ndarray:
        """The array as its PNG stores it (inverse of :meth:`load`); checks the values first."""
        raise NotImplementedError

    def check_target(self, encoded: np.ndarray, info: Info) -> None:
        """Raise ``ValueError`` (saying the fix) when an :meth:`encode` result does not fit dataset ``info``.

        ``write_sample`` calls it when the dataset already has a dataset.json, so that what is written is what
        :meth:`load` accepts (e.g. label ids within the class list). Most tasks need nothing here.
        """

    def flip(self, target: Tensor) -> Tensor:
        """Fix a mirrored target's values (after the pixels were flipped left-right); most need nothing."""
        return target

    # A sample's target between loading and collation: what :meth:`to_sample` makes, moved by the joint
    # transforms (densemtl.data.transforms) through the three geometric methods, and made one fixed-shape tensor
    # by :meth:`pack`. Dense targets are ``tv_tensors.Mask`` resampled by torchvision's kernels.
    def to_sample(self, array: np.ndarray | None, size: tuple[int, int]) -> Any:
        """The target as a sample carries it through the transforms (a ``tv_tensors.Mask`` for dense tasks)."""
        return tv_tensors.Mask(self.to_tensor(array, size).contiguous())

    def resize_target(self, target: Any, size: tuple[int, int]) -> Any:
        """The target of an image zoomed to ``size`` (H, W), resampled with :attr:`interpolation`."""
        return TF.resize(_as_mask(target), list(size), interpolation=self.interpolation, antialias=True)

    def crop_target(self, target: Any, top: int, left: int, height: int, width: int) -> Any:
        """The target inside a window that may reach past the image (that part filled with :attr:`fill`)."""
        t = _as_mask(target)
        h, w = t.shape[-2:]
        pad = [max(0, -left), max(0, -top), max(0, left + width - w), max(0, top + height - h)]  # l, t, r, b
        t = TF.pad(t, pad, fill=float(self.fill)) if any(pad) else t
        return TF.crop(t, top + pad[1], left + pad[0], height, width)

    def flip_target(self, target: Any) -> Any:
        """The target of the left-right mirrored image (pixels mirrored, then :meth:`flip` fixes values)."""
        return self.flip(TF.horizontal_flip(_as_mask(target)))

    def pack(self, target: Any, sample: dict[str, Any]) -> Tensor:
        """The transformed target as the plain fixed-shape tensor that collates (``sample``: its other keys)."""
        return target.as_subclass(Tensor)

    def new_stats(self, info: Info) -> TaskStats | None:
        """An accumulator of dataset statistics for ``densemtl data check`` (None: only count files)."""
        return None

    def describe_stats(self, stats: dict[str, Any], classes: list[str]) -> list[str]:
        """Readable lines for :meth:`new_stats`' results in the ``data check`` report."""
        return [
            f"{self.name}: "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        ]

    # ----------------------------------------------------------------------------------------------- model
    def check_model_config(self, cfg: ModelConfig) -> None:
        """Raise ``ValueError`` naming the key when ``cfg`` cannot build this task's head."""

    def make_head(self, in_channels: int, cfg: ModelConfig) -> nn.Module:
        """The head: ``head(features (B, in_channels, h, w), size) -> (B, C, *size)``."""
        raise NotImplementedError

    def upsample(self, output: Tensor, size: Sequence[int]) -> Tensor:
        """Resize a raw output to ``size`` (evaluation at a lower input scale); bilinear by default."""
        return resize(output, size)

    # ------------------------------------------------------------------------------------- loss and metrics
    def make_loss(self, cfg: Config) -> nn.Module:
        """``loss(pred, target, sample_mask (B,) bool) -> scalar``, 0 with zero gradients when nothing is valid."""
        raise NotImplementedError

    def make_metrics(self, cfg: Config, info: Info) -> Accumulator:
        """A fresh dataset-level accumulator of this task's metrics."""
        raise NotImplementedError

    def fit_baseline(self, targets: list[Tensor], cfg: Config) -> dict[str, Any]:
        """The trivial predictor's statistics from training targets (JSON-able)."""
        raise NotImplementedError

    def baseline_output(self, stats: dict[str, Any], image: Tensor) -> Tensor:
        """What the trivial predictor outputs for a batch ``image`` (B, 3, H, W), shaped like the model's."""
        raise NotImplementedError

    def baseline_text(self) -> str:
        """One phrase for reports: what the trivial baseline predicts."""
        return ""

    def report(self, result: dict[str, Any], info: Info) -> str:
        """Extra Markdown for ``metrics.md`` (e.g. a per-class table); '' for none."""
        return ""

    def plots(self, result: dict[str, Any], info: Info, out: Path) -> dict[str, Path]:
        """Write the task's evaluation pictures into ``out``; returns ``{title: path}``."""
        return {}

    # ------------------------------------------------------------------------------------------ prediction
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        """One image's raw output (1, C, H, W) at image size -> NumPy results keyed by :attr:`outputs`."""
        raise NotImplementedError

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        """A uint8 (H, W, 3) picture of the prediction for panels and videos."""
        raise NotImplementedError

    def colorize_target(self, target: Tensor, rgb: np.ndarray, info: Info) -> np.ndarray:
        """A uint8 (H, W, 3) picture of a dataset target (previews)."""
        return self.colorize(self.target_numpy(target), rgb, info)

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        """A dataset target as :meth:`to_numpy` results (for pictures of ground truth)."""
        raise NotImplementedError

    def documents(self, pred: dict[str, np.ndarray], info: Info) -> dict[str, Any]:
        """``{suffix: JSON-able}`` written by ``predict`` as ``<id>_<suffix>.json`` (e.g. detections)."""
        return {}

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        """``{suffix: array}`` written by ``predict`` as ``<id>_<suffix>.png``."""
        return {
            self.name: self.encode(self.pseudo_label(pred, info)),
            f"{self.name}_color": self.colorize(pred, rgb, info),
        }

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0, max_rel_std: float = 0.0
    ) -> np.ndarray:
        """A prediction as a dataset target array (what :meth:`load` returns), for ``pseudolabel``.

        Pixels the model is unsure of are left unlabelled where the task can tell: ``min_confidence`` (a class
        probability) and ``max_rel_std`` (a relative std); 0 keeps every pixel.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ uncertainty
    def uncertainty_picture(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray | None:
        """A uint8 (H, W, 3) picture of the prediction's uncertainty (panels, videos), or None without one."""
        return None

    def flip_output(self, output: Tensor) -> Tensor:
        """The raw output (B, C, H, W) for a left-right mirrored image, mapped back to the original's frame."""
        return self.flip(output.flip(-1))

    def merge_samples(self, outputs: list[Tensor]) -> Tensor:
        """One raw output from several passes over one image (flip TTA, MC dropout), with the same shape and
        meaning as one pass; a task with an uncertainty output folds the passes' spread into it. Default: mean."""
        return torch.stack(outputs).mean(0)

    def calibration_data(self, output: Tensor, target: Tensor) -> Tensor | None:
        """A subsample of one batch's (uncalibrated) outputs and targets that :meth:`fit_calibration` fits on, or
        None when the task has nothing to calibrate (``densemtl calibrate``)."""
        return None

    def fit_calibration(self, data: Tensor, head: nn.Module, cfg: Config) -> dict[str, float]:
        """Fit the head's calibration on the concatenated :meth:`calibration_data`, store it in the head's
        buffers (so evaluation, prediction and export use it) and return what was fitted."""
        return {}

    def reset_calibration(self, head: nn.Module) -> None:
        """Set the head's calibration to the identity (before collecting calibration data)."""

    # ----------------------------------------------------------------------------------------------- export
    def onnx_outputs(self, output: Tensor, extras: bool = True) -> dict[str, Tensor]:
        """Named ONNX outputs for the raw output; ``extras`` adds convenience outputs (class ids)."""
        return {self.name: output}

    def onnx_axes(self, output: Tensor, extras: bool = True) -> dict[str, dict[int, str]]:
        """Dynamic axes of each name :meth:`onnx_outputs` returns for ``output`` (same names, same order)."""
        return {self.name: {0: "batch", 2: "height", 3: "width"}}

    def from_onnx(self, raw: dict[str, Tensor]) -> Tensor:
        """The raw output back from an ONNX Runtime result (inverse of :meth:`onnx_outputs`)."""
        return raw[self.name]

    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        """Compare PyTorch's and ONNX Runtime's outputs on the same images: (figures, passed)."""
        err = float((ref - got).abs().max()) if ref.numel() else 0.0
        return {f"{self.name}_max_abs_err": err}, err <= 1e-3


def _as_mask(t: Tensor) -> Tensor:
    """A plain tensor as a ``tv_tensors.Mask`` so torchvision's kernels resample it as a dense target."""
    return t if isinstance(t, tv_tensors.TVTensor) else tv_tensors.Mask(t)


class TaskStats:
    """Statistics of one task's files in one split, for ``densemtl data check``."""

    def add(self, array: np.ndarray, path: Path, info: Info) -> list[str]:
        """Add one file's array (as :meth:`Task.load` returns it); returns warnings naming the file."""
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        """The JSON-able statistics."""
        raise NotImplementedError
