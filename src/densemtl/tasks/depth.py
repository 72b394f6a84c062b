"""Metric depth: a bounded head in metres, L1/MSE/berHu/SILog losses, Eigen/KITTI metrics, depth pictures.

Files: ``<split>/depth/<id>.png``, uint16 with metres = value / ``dataset.json depth.scale`` (256 by default,
the KITTI convention), 0 = no measurement. Predictions are float32 metres. A network learns depth for the focal
length (in pixels) it was trained at, which is why evaluation and prediction run at the training input scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densemtl.data.format import (
    DEPTH_MAX_ENCODABLE,
    DEPTH_MODES,
    DEPTH_SCALE,
    DatasetFormatError,
    check_size,
    decode_depth,
    encode_depth,
    open_image,
)
from densemtl.models.heads import make_trunk
from densemtl.tasks.base import INVALID_DEPTH, Accumulator, Info, Task, TaskStats, masked_mean, resize
from densemtl.tasks.depth_metrics import DepthMetrics
from densemtl.viz.colors import colorize_depth

DEPTH_PARAMS = ("direct", "log", "inverse")
DEPTH_LOSSES = ("l1", "mse", "berhu", "silog")
DEPTH_SPACES = ("metres", "log", "blog")
EPS_DEPTH = 1e-3  # metres; depths are clamped to this before a log so that log never sees 0
DEPTH_TOLERANCE_M = 1e-3  # export parity: max abs depth error, metres
PICTURE_NEAR_M = 1.0  # depth pictures: log colour scale from here to the dataset's depth max


def depth_from_raw(raw: torch.Tensor, param: str, min_depth: float, max_depth: float) -> torch.Tensor:
    """Map the head's unbounded output to metres in ``[min_depth, max_depth]``.

    * ``direct``: ``min + softplus(raw)``, clamped at ``max``.
    * ``log``: ``exp`` of a sigmoid-bounded log-depth between ``log(min)`` and ``log(max)``.
    * ``inverse``: ``1 / inv`` with inverse depth sigmoid-bounded between ``1/max`` and ``1/min``.
    """
    if param == "direct":
        return (min_depth + F.softplus(raw)).clamp(max=max_depth)
    if param == "log":
        lo, hi = math.log(min_depth), math.log(max_depth)
        return torch.exp(lo + (hi - lo) * torch.sigmoid(raw)).clamp(min_depth, max_depth)
    if param == "inverse":
        lo, hi = 1.0 / max_depth, 1.0 / min_depth
        return (1.0 / (lo + (hi - lo) * torch.sigmoid(raw))).clamp(min_depth, max_depth)
    raise ValueError(f"model.depth_param={param!r} is not one of {DEPTH_PARAMS}")


def raw_for_depth(depth: float, param: str, min_depth: float, max_depth: float) -> float:
    """The raw value that :func:`depth_from_raw` maps to ``depth`` metres (used to initialise the bias)."""
    if param == "direct":
        return math.log(math.expm1(depth - min_depth))  # softplus^-1
    if param == "log":
        t = (math.log(depth) - math.log(min_depth)) / (math.log(max_depth) - math.log(min_depth))
    elif param == "inverse":
        t = (1.0 / depth - 1.0 / max_depth) / (1.0 / min_depth - 1.0 / max_depth)
    else:
        raise ValueError(f"model.depth_param={param!r} is not one of {DEPTH_PARAMS}")
    return math.log(t / (1.0 - t))  # sigmoid^-1


class DepthHead(nn.Module):
    """Metric depth in metres, bounded to ``[min_depth, max_depth]``.

    The raw output is mapped to metres at the decoder's resolution (stride 4), then resized to the input:
    bilinear resizing is a convex combination of neighbours, so every pixel still respects the bounds, and the
    exp/sigmoid/clamp passes run on 1/16 of the pixels (they were ~5% of ONNX Runtime time at 480x640 when
    they ran at full resolution). The last convolution starts with tiny weights and the bias of the geometric
    mean of the bounds.
    """

    def __init__(
        self,
        in_channels: int,
        param: str = "log",
        min_depth: float = 0.1,
        max_depth: float = 100.0,
        trunk: str = "light",
        hidden: int = 0,
    ):
        super().__init__()
        if not 0.0 < min_depth < max_depth:
            raise ValueError(f"depth bounds need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        self.param, self.min_depth, self.max_depth = param, float(min_depth), float(max_depth)
        self.trunk, width = make_trunk(in_channels, trunk, hidden)
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.normal_(self.out.weight, std=1e-3)
        nn.init.constant_(
            self.out.bias, raw_for_depth(math.sqrt(min_depth * max_depth), param, min_depth, max_depth)
        )

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """(B, in_channels, h, w) -> metres (B, 1, *size)."""
        metres = depth_from_raw(self.out(self.trunk(x)), self.param, self.min_depth, self.max_depth)
        return resize(metres, size)


def depth_transform(depth: Tensor, space: str, clip: float = 80.0) -> Tensor:
    """Map metres to the space a depth loss compares in.

    ``metres``: unchanged. ``log``: ln(d). ``blog``: ln(clip(d, max=clip)) / 5, the lecture's bounded log
    target (about [-1.4, 0.9] for d in [1 mm, 80 m]). Depths are clamped to >= 1 mm before any log.
    """
    if space == "metres":
        return depth
    if space == "log":
        return depth.clamp_min(EPS_DEPTH).log()
    if space == "blog":
        return depth.clamp(EPS_DEPTH, clip).log() / 5.0
    raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")


class DepthLoss(nn.Module):
    """Depth regression on pixels with a measurement (target > 0): "l1", "mse", "berhu" or "silog".

    Residuals are taken in ``space`` (see ``depth_transform``), except for "silog", which is defined on log
    depth and always works in natural-log space whatever ``space`` says.

    berHu (reverse Huber, Laina et al. 2016): ``|r|`` if ``|r| <= c`` else ``(r^2 + c^2) / (2c)`` with
    ``c = 0.2 * max |r|`` over the valid pixels of the batch, detached.

    silog (Eigen et al. 2014, weighted as in BTS, Lee et al. 2019):
    ``scale * sqrt(mean(g^2) - lam * mean(g)^2)``, ``g = ln pred - ln gt``, ``lam = 0.85``, ``scale = 10``.
    ``lam = 1`` makes it fully invariant to a global scale of the prediction; 0.85 keeps a little scale
    supervision, which metric depth needs. The x10 brings it to the magnitude of cross-entropy.
    """

    def __init__(
        self,
        kind: str,
        space: str = "log",
        clip: float = 80.0,
        silog_lambda: float = 0.85,
        silog_scale: float = 10.0,
    ) -> None:
        super().__init__()
        if kind not in DEPTH_LOSSES:
            raise ValueError(f"unknown depth loss {kind!r}; choose one of {DEPTH_LOSSES}")
        if space not in DEPTH_SPACES:
            raise ValueError(f"unknown depth space {space!r}; choose one of {DEPTH_SPACES}")
        self.kind, self.space, self.clip = kind, space, clip
        self.silog_lambda, self.silog_scale = silog_lambda, silog_scale

    def forward(self, pred: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        """Scalar loss from predicted and target metres (B, 1, H, W); ``sample_mask`` (B,) drops samples."""
        if pred.shape != target.shape:
            raise ValueError(
                f"depth prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        pred, target = pred.float(), target.float()
        valid = (target > 0) & torch.isfinite(target)  # (B, 1, H, W)
        if sample_mask is not None:
            valid = valid & sample_mask.view(-1, 1, 1, 1)
        target = torch.where(valid, target, torch.ones_like(target))  # keeps log() finite on invalid pixels
        if self.kind == "silog":
            return self._silog(pred, target, valid)
        r = depth_transform(pred, self.space, self.clip) - depth_transform(target, self.space, self.clip)
        if self.kind == "l1":
            return masked_mean(r.abs(), valid)
        if self.kind == "mse":
            return masked_mean(r.square(), valid)
        return masked_mean(berhu(r, valid), valid)

    def _silog(self, pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        g = depth_transform(pred, "log") - depth_transform(target, "log")  # (B, 1, H, W)
        mean_g, mean_g2 = masked_mean(g, valid), masked_mean(g.square(), valid)
        var = (mean_g2 - self.silog_lambda * mean_g.square()).clamp_min(1e-12)  # sqrt'(0) would be inf
        return self.silog_scale * var.sqrt() * valid.any()  # exactly 0 when no pixel is valid


def berhu(r: Tensor, valid: Tensor) -> Tensor:
    """Element-wise reverse Huber of residuals ``r`` with the threshold from the valid pixels (see DepthLoss)."""
    absr = r.abs()
    c = (0.2 * (absr * valid).amax()).detach().clamp_min(1e-12)  # clamp keeps the unused branch finite
    return torch.where(absr <= c, absr, (absr.square() + c.square()) / (2 * c))


def load_depth(path: Path, size: tuple[int, int], scale: float) -> np.ndarray:
    """Depth (H, W) float32 metres from a uint16 PNG (value / ``scale``); 0 stays 0 (invalid)."""
    img = open_image(path, "depth")
    if img.mode not in DEPTH_MODES:
        hint = "an 8-bit PNG" if img.mode in ("L", "P") else f"mode {img.mode}"
        raise DatasetFormatError(
            f"{path}: depth must be a 16-bit grayscale PNG (uint16, metres * {scale:g}, 0 = invalid), got {hint}; "
            "write it with densemtl.data.format.encode_depth / densemtl.data.folder.write_sample"
        )
    raw = np.asarray(img)
    check_size(raw, path, size, "depth")
    if raw.min(initial=0) < 0:
        raise DatasetFormatError(f"{path}: depth PNG has negative values; store uint16 (0 = invalid)")
    return decode_depth(raw, scale=scale)


_HIST_BIN = 0.1  # metres per histogram bin for depth percentiles
_HIST_BINS = 2600  # covers the 255.99 m a uint16/256 PNG can store


class DepthStats(TaskStats):
    """Valid fraction, range, mean and percentiles of depth over one split; warns on suspicious files."""

    def __init__(self) -> None:
        self.hist = np.zeros(_HIST_BINS, np.int64)
        self.dsum, self.dmin, self.dmax, self.pixels = 0.0, np.inf, 0.0, 0

    def add(self, array: np.ndarray, path: Path, info: Info) -> list[str]:
        valid = array[array > 0]
        self.pixels += array.size
        if valid.size:
            idx = np.minimum(valid / _HIST_BIN, _HIST_BINS - 1).astype(np.int64)
            self.hist += np.bincount(idx, minlength=_HIST_BINS)
            self.dsum += float(valid.sum(dtype=np.float64))
            self.dmin, self.dmax = min(self.dmin, float(valid.min())), max(self.dmax, float(valid.max()))
        return depth_warnings(path, valid, info)

    def finish(self) -> dict[str, Any]:
        n = int(self.hist.sum())
        if not n:
            return {}
        cum = np.cumsum(self.hist)
        pct = {f"p{q:02d}": float(np.searchsorted(cum, q / 100 * n) + 0.5) * _HIST_BIN for q in (5, 50, 95)}
        return {
            "valid_fraction": n / self.pixels,
            "min": self.dmin,
            "max": self.dmax,
            "mean": self.dsum / n,
            **pct,
        }


def depth_warnings(path: Path, valid: np.ndarray, info: Info) -> list[str]:
    """Depth that loads but looks wrong: no valid pixel, all under 1 m (unscaled metres?), beyond depth.max."""
    depth = info.get("depth", {})
    if not valid.size:
        return [f"{path}: no valid depth pixel (all 0); delete the file if this image has no depth"]
    if valid.max() < 1.0:
        return [
            f"{path}: all depth under 1 m (max {valid.max():.3f}); were metres stored without the x"
            f"{depth.get('scale', DEPTH_SCALE):g} scale? re-encode with encode_depth"
        ]
    if valid.max() > 2 * float(depth.get("max", np.inf)):
        return [
            f"{path}: depth up to {valid.max():.1f} m, over twice dataset.json depth.max "
            f"{depth['max']:g} m; check the units or raise depth.max"
        ]
    return []


def _max_depth(info: Info) -> float:
    return float(info.get("depth", {}).get("max", 80.0))


class Depth(Task):
    """Metric depth in metres with an explicit validity mask (0 = invalid); see the module docstring."""

    name = "depth"
    folder = "depth"
    fill = INVALID_DEPTH
    headline = "delta1"
    console = ("abs_rel", "rmse", "delta1")
    lower_is_better = frozenset({"abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "mae", "silog"})
    outputs = ("depth",)

    # data
    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        return load_depth(path, size, float(info.get("depth", {}).get("scale", DEPTH_SCALE)))

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        if array is None:
            return torch.zeros(1, *size)  # (1, H, W), all invalid
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]

    def encode(self, array: np.ndarray) -> np.ndarray:
        arr = np.asarray(array)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]  # (H, W, 1) -> (H, W)
        if arr.ndim != 2 or arr.dtype.kind not in "iuf":
            raise ValueError(
                f"depth must be an (H, W) array of metres, got {arr.dtype} {arr.shape}; pass one depth map "
                "per image as float metres (0 or NaN = no measurement)"
            )
        return encode_depth(arr)

    def new_stats(self, info: Info) -> TaskStats:
        return DepthStats()

    def describe_stats(self, stats: dict[str, Any], classes: list[str]) -> list[str]:
        d = stats
        return [
            f"depth: {100 * d['valid_fraction']:.1f}% valid, {d['min']:.2f}..{d['max']:.2f} m, "
            f"mean {d['mean']:.2f}, p05/p50/p95 {d['p05']:.1f}/{d['p50']:.1f}/{d['p95']:.1f} m"
        ]

    # model
    def check_model_config(self, cfg) -> None:
        if cfg.depth_param not in DEPTH_PARAMS:
            raise ValueError(f"model.depth_param={cfg.depth_param!r} is not one of {DEPTH_PARAMS}")

    def make_head(self, in_channels: int, cfg) -> nn.Module:
        return DepthHead(
            in_channels, cfg.depth_param, cfg.min_depth, cfg.max_depth, cfg.head, cfg.head_channels
        )

    # loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        c = cfg.loss
        if not (c.depth_clip > 0 and math.isfinite(c.depth_clip)):
            raise ValueError(f"loss.depth_clip must be a positive number of metres, got {c.depth_clip}")
        return DepthLoss(c.depth, c.depth_space, c.depth_clip, c.silog_lambda, c.silog_scale)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        d = cfg.data
        return DepthMetrics(d.eval_depth_min, d.eval_depth_max, d.eval_per_image)

    def fit_baseline(self, targets: list[Tensor], cfg) -> dict[str, Any]:
        values = [t.flatten().numpy() for t in targets]
        values = [v[v > 0][::7] for v in values]  # a stride keeps memory small; the median barely moves
        values = [v for v in values if v.size]
        return {"median_depth": float(np.median(np.concatenate(values)))} if values else {"median_depth": 1.0}

    def baseline_output(self, stats: dict[str, Any], image: Tensor) -> Tensor:
        b, _, h, w = image.shape
        return torch.full((b, 1, h, w), float(stats["median_depth"]))

    def baseline_text(self) -> str:
        return "its median depth everywhere"

    def plots(self, result: dict[str, Any], info: Info, out: Path) -> dict[str, Path]:
        from densemtl.viz.plots import plot_depth_error_vs_distance, plot_depth_histograms

        prof = result.get("profile")
        if not prof or sum(prof["count"]) == 0:
            return {}
        edges, count = np.array(prof["edges"]), np.array(prof["count"])
        return {
            "Depth error vs distance": plot_depth_error_vs_distance(
                edges,
                np.array(prof["mae"]),
                np.array(prof["abs_rel"]),
                count,
                out / "depth_error_vs_distance.png",
            ),
            "Depth distribution": plot_depth_histograms(
                edges, np.array(prof["gt_hist"]), np.array(prof["pred_hist"]), out / "depth_histogram.png"
            ),
        }

    # prediction
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        return {"depth": output[0, 0].float().cpu().numpy().astype(np.float32)}

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        return {"depth": target[0].cpu().numpy().astype(np.float32)}

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        return colorize_depth(pred["depth"], vmin=PICTURE_NEAR_M, vmax=_max_depth(info), log=True)

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        return {
            "depth": encode_depth(np.minimum(pred["depth"], 255.0)),
            "depth_color": self.colorize(pred, rgb, info),
        }

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0
    ) -> np.ndarray:
        return np.clip(pred["depth"], 0.0, min(_max_depth(info), DEPTH_MAX_ENCODABLE))  # (H, W) metres

    # export
    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        err = float((ref - got).abs().max()) if ref.numel() else 0.0
        return {"depth_max_abs_err_m": err}, err <= DEPTH_TOLERANCE_M


DEPTH = Depth()
