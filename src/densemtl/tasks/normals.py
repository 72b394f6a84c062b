"""Surface normals: a unit-length head, cosine or angular loss, angular-error metrics, normal-map pictures.

Files: ``<split>/normals/<id>.png``, 8-bit RGB with ``n = value / 127.5 - 1`` (``value = round((n + 1) * 127.5)``)
in the camera frame of the image (OpenCV: x right, y down, z forward; a surface facing the camera has
``n_z < 0``); ``(0, 0, 0)`` = invalid. Predictions are float32 (H, W, 3) unit vectors in the same frame.

Metrics (Eigen & Fergus 2015, and the NYUv2 multi-task benchmarks), pooled over every valid pixel of the
dataset (target length > 0.5): mean, median and RMS angular error in degrees, and the fractions of pixels whose
error is under 11.25, 22.5 and 30 degrees. The median (of an even count: the mean of the two middle errors, as
``np.median``) comes from a 0.01-degree histogram, so it is within 0.01 degrees of the exact one and mergeable.
The trivial baseline predicts the training set's mean normal (normalised) everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from densemtl.data.format import DatasetFormatError, check_size, decode_normals, encode_normals, open_image
from densemtl.models.heads import head_dropout, make_trunk
from densemtl.tasks.base import Accumulator, Info, Task, TaskStats, masked_mean, resize
from densemtl.viz.colors import colorize_normals

NORMALS_LOSSES = ("cosine", "angular")
THRESHOLDS_DEG = (11.25, 22.5, 30.0)
HIST_BIN_DEG = 0.01
HIST_BINS = round(180 / HIST_BIN_DEG)
PARITY_MAX_DEG = 0.5  # export parity: angular error bound ...
PARITY_FRACTION = 0.999  # ... on at least this fraction of pixels
_VALID_NORM = 0.5  # a target vector counts as valid when its length exceeds this (unit vs zero)


def length(x: Tensor, dim: int = 1, keepdim: bool = False) -> Tensor:
    """Euclidean length along ``dim``, at least 1e-6, with finite gradients everywhere (also at zero).

    Written as a clamped square root of the sum of squares: ``Tensor.norm`` over a 3-channel dim of an
    (B, 3, H, W) map is ~40x slower on CPU (it was two thirds of the demo's validation time).
    """
    return x.square().sum(dim=dim, keepdim=keepdim).clamp_min(1e-12).sqrt()


def unit(x: Tensor, dim: int = 1) -> Tensor:
    """Normalise to unit length along ``dim``; a zero vector stays zero (no NaN, finite gradients)."""
    return x / length(x, dim, keepdim=True)


class NormalsHead(nn.Module):
    """Camera-frame unit normals: a trunk + 1x1 to 3 channels, normalised, resized, normalised again.

    Normalising at stride 4 and again after the bilinear resize keeps every output pixel unit length (a
    bilinear mix of unit vectors is shorter than 1). The bias starts at ``(0, 0, -1)``: a surface facing the
    camera, a neutral first guess from which every direction is reachable.
    """

    def __init__(self, in_channels: int, trunk: str = "light", hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.trunk, width = make_trunk(in_channels, trunk, hidden)
        self.drop = head_dropout(dropout)
        self.out = nn.Conv2d(width, 3, 1)
        nn.init.normal_(self.out.weight, std=1e-2)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, in_channels, h, w) -> unit normals (B, 3, *size)."""
        return unit(resize(unit(self.out(self.drop(self.trunk(x)))), size))


def angle_between(u: Tensor, v: Tensor) -> Tensor:
    """Angle in radians between unit (or zero) vectors along dim 1: (B, 3, H, W) -> (B, H, W).

    ``atan2(|u x v|, u . v)`` is accurate for small angles, where ``acos`` of a rounded cosine is not (float32
    cannot tell 0.02 degrees from 0), and needs no clamp that would bias it. Where a vector is zero the angle is
    0 with zero gradients (``atan2(0, 0)`` alone would give NaN gradients).
    """
    dot = (u * v).sum(dim=1)
    sq = torch.linalg.cross(u, v, dim=1).square().sum(dim=1)
    sin = torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), torch.zeros_like(sq))  # exactly 0, finite gradient
    degenerate = (dot.abs() + sin) < 1e-12
    return torch.atan2(sin, dot + degenerate.to(dot.dtype))


def angular_error_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Angle in degrees between (B, 3, H, W) direction fields (both normalised first, in float64), (B, H, W)."""
    return torch.rad2deg(angle_between(unit(pred.double()), unit(target.double())))


class NormalsLoss(nn.Module):
    """Normals loss on valid target pixels: ``cosine`` = ``1 - cos(angle)``, ``angular`` = the angle (radians).

    The mean is over the valid pixels (target length > 0.5) of the samples ``sample_mask`` keeps, pooled over
    the batch; 0 with zero gradients when there are none. ``cosine`` is smooth everywhere; ``angular`` (L1 on the
    angle) weighs small errors more, as the metrics do.
    """

    def __init__(self, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in NORMALS_LOSSES:
            raise ValueError(f"unknown normals loss {kind!r}; choose one of {NORMALS_LOSSES}")
        self.kind = kind

    def forward(self, pred: Tensor, target: Tensor, sample_mask: Tensor | None = None) -> Tensor:
        """Scalar loss from predicted and target normals (B, 3, H, W); ``sample_mask`` (B,) drops samples."""
        if pred.shape != target.shape or pred.shape[1] != 3:
            raise ValueError(
                f"normals prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        pred, target = pred.float(), target.float()
        valid = target.square().sum(dim=1) > _VALID_NORM**2  # (B, H, W)
        if sample_mask is not None:
            valid = valid & sample_mask.view(-1, 1, 1)
        u, v = unit(pred), unit(target)  # invalid targets become 0 (finite values and gradients)
        if self.kind == "cosine":
            return masked_mean(1.0 - (u * v).sum(dim=1), valid)  # (B, H, W) -> scalar
        return masked_mean(angle_between(u, v), valid)


class NormalsMetrics(Accumulator):
    """Angular-error metrics over every valid pixel of the dataset (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._state = {
            "count": torch.zeros((), dtype=torch.float64),
            "sum_deg": torch.zeros((), dtype=torch.float64),
            "sum_sq_deg": torch.zeros((), dtype=torch.float64),
            "hist": torch.zeros(HIST_BINS, dtype=torch.int64),
        }

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch of predicted and target normals, both (B, 3, H, W); zero targets are skipped."""
        if pred.shape != target.shape:
            raise ValueError(
                f"normals prediction {tuple(pred.shape)} does not match target {tuple(target.shape)}"
            )
        target = target.to(pred.device)
        valid = target.double().square().sum(dim=1) > _VALID_NORM**2  # (B, H, W)
        err = angular_error_deg(pred, target)[valid]  # (N,)
        self._to(pred.device)
        self._state["count"] += err.numel()
        self._state["sum_deg"] += err.sum()
        self._state["sum_sq_deg"] += err.square().sum()
        idx = (err / HIST_BIN_DEG).long().clamp(0, HIST_BINS - 1)
        self._state["hist"] += torch.bincount(idx, minlength=HIST_BINS)

    def compute(self) -> dict[str, Any]:
        """``mean_deg``, ``median_deg``, ``rmse_deg``, ``within_11_25``, ``within_22_5``, ``within_30`` (NaN when
        nothing valid was seen), ``pixels`` and the cumulative error curve ``cdf`` (fraction under 1, 2, ..., 180
        degrees)."""
        s = {k: v.detach().cpu() for k, v in self._state.items()}
        n = float(s["count"])
        out: dict[str, Any] = {k: math.nan for k in ("mean_deg", "median_deg", "rmse_deg")}
        out.update({_within_key(t): math.nan for t in THRESHOLDS_DEG})
        out["pixels"] = int(n)
        cum = s["hist"].cumsum(0).double()
        out["cdf"] = (cum[round(1 / HIST_BIN_DEG) - 1 :: round(1 / HIST_BIN_DEG)] / max(n, 1)).tolist()
        if n == 0:
            return out
        out["mean_deg"] = float(s["sum_deg"]) / n
        out["rmse_deg"] = math.sqrt(float(s["sum_sq_deg"]) / n)
        out["median_deg"] = _histogram_median(cum, int(n))
        for t in THRESHOLDS_DEG:  # bins are 0.01 degrees wide and every threshold is a bin edge
            out[_within_key(t)] = float(cum[round(t / HIST_BIN_DEG) - 1]) / n
        return out


def _histogram_median(cum: Tensor, n: int) -> float:
    """Median from cumulative bin counts: the middle error's bin centre (mean of the two middle ones if n is even)."""
    ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=torch.float64)  # 1-based; equal when n is odd
    bins = torch.searchsorted(cum, ranks)  # first bin holding at least that many errors
    return float((bins.double() + 0.5).mean()) * HIST_BIN_DEG


def _within_key(threshold: float) -> str:
    return "within_" + f"{threshold:g}".replace(".", "_")


def load_normals(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Unit normals (H, W, 3) float32 from an RGB PNG (n = v / 127.5 - 1); (0, 0, 0) = invalid."""
    img = open_image(path, "normals")
    if img.mode != "RGB":
        raise DatasetFormatError(
            f"{path}: normals must be an 8-bit RGB PNG, got mode {img.mode}; "
            "write them with densemtl.data.format.encode_normals / densemtl.data.folder.write_sample"
        )
    raw = np.asarray(img)
    check_size(raw, path, size, "normals")
    return decode_normals(raw)


def normals_from_depth(
    depth: np.ndarray, intrinsics: Sequence[float], step: int = 1, planar_tol: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame normals from z-depth by central differences of back-projected points, and where to trust them.

    With ``P(u, v) = z * ((u - cx) / fx, (v - cy) / fy, 1)``, the normal is ``dP/dv x dP/du`` (central
    differences ``step`` pixels each way), which faces the camera (``n . P < 0``; ``(0, 0, -1)`` for a wall
    straight ahead). On a plane the differences lie in it, so the normal is exact whatever the perspective.

    Args:
        depth: (H, W) metres, 0 (or non-finite) = invalid.
        intrinsics: fx, fy, cx, cy in pixels of this image.
        step: stencil half-width in pixels; larger averages sensor noise (Kinect: about 8 at 640x480).
        planar_tol: the relative second difference of inverse depth allowed; ``1 / z`` is affine in (u, v) on a
            plane, so this is 0 there up to noise, and large across depth edges and on curved surfaces.

    Returns:
        normals (H, W, 3) float32 unit vectors (0 where the mask is False) and the mask (H, W) bool: all five
        stencil depths valid and the surface planar across the stencil.
    """
    fx, fy, cx, cy = (float(k) for k in intrinsics)
    z = np.asarray(depth, dtype=np.float64)
    z = np.where(np.isfinite(z) & (z > 0), z, 0.0)
    h, w = z.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    p = np.pad(np.stack([(u - cx) / fx * z, (v - cy) / fy * z, z], -1), ((step, step), (step, step), (0, 0)))
    inv = np.pad(np.where(z > 0, 1.0 / np.maximum(z, 1e-12), 0.0), step)

    def at(a: np.ndarray, dv: int, du: int) -> np.ndarray:  # a shifted by (dv, du), cropped to (H, W)
        return a[step + dv : step + dv + h, step + du : step + du + w]

    n = np.cross(at(p, step, 0) - at(p, -step, 0), at(p, 0, step) - at(p, 0, -step))  # dP/dv x dP/du
    length = np.linalg.norm(n, axis=-1)
    c = at(inv, 0, 0)
    curve = np.maximum(
        np.abs(at(inv, 0, step) + at(inv, 0, -step) - 2 * c),
        np.abs(at(inv, step, 0) + at(inv, -step, 0) - 2 * c),
    )
    stencil = [at(inv, dv, du) > 0 for dv, du in ((0, 0), (0, step), (0, -step), (step, 0), (-step, 0))]
    mask = np.logical_and.reduce(stencil) & (curve <= planar_tol * c) & (length > 0)
    out = np.where(mask[..., None], n / np.maximum(length, 1e-12)[..., None], 0.0)
    return out.astype(np.float32), mask


class NormalsStats(TaskStats):
    """Fraction of valid normal pixels over one split; warns on files without any valid pixel."""

    def __init__(self) -> None:
        self.valid = self.pixels = 0

    def add(self, array: np.ndarray, path: Path, info: Info) -> list[str]:
        valid = int(np.any(array != 0, axis=-1).sum())
        self.valid += valid
        self.pixels += array.shape[0] * array.shape[1]
        if valid == 0:
            return [f"{path}: no valid normal (all (0, 0, 0)); delete the file if this image has no normals"]
        return []

    def finish(self) -> dict[str, Any]:
        return {"valid_fraction": self.valid / self.pixels} if self.pixels else {}


class Normals(Task):
    """Camera-frame surface normals; see the module docstring."""

    name = "normals"
    folder = "normals"
    fill = 0.0
    headline = "within_11_25"
    console = ("mean_deg", "within_11_25")
    lower_is_better = frozenset({"mean_deg", "median_deg", "rmse_deg"})
    outputs = ("normals",)

    # data
    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        return load_normals(path, size)

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        if array is None:
            return torch.zeros(3, *size)  # (3, H, W), all invalid
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)

    def encode(self, array: np.ndarray) -> np.ndarray:
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"normals must be an (H, W, 3) array of unit vectors, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("normals contain NaN or inf; write (0, 0, 0) for pixels without a normal")
        return encode_normals(arr)  # normalised there: a vector of length 3 would clip to another direction

    def flip(self, target: Tensor) -> Tensor:
        n = target.clone()  # (3, H, W) or (B, 3, H, W); mirroring the scene left-right mirrors the normals' x
        n[..., 0, :, :] *= -1
        return n

    def new_stats(self, info: Info) -> TaskStats:
        return NormalsStats()

    # model
    def make_head(self, in_channels: int, cfg) -> nn.Module:
        return NormalsHead(in_channels, cfg.head, cfg.head_channels, cfg.dropout)

    def upsample(self, output: Tensor, size: Sequence[int]) -> Tensor:
        return unit(resize(output, size))

    # loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        return NormalsLoss(cfg.loss.normals)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        return NormalsMetrics()

    def fit_baseline(self, targets: list[Tensor], cfg) -> dict[str, Any]:
        total = torch.zeros(3, dtype=torch.float64)
        for t in targets:  # (3, H, W) each
            v = t.reshape(3, -1).double()
            total += v[:, v.norm(dim=0) > _VALID_NORM].sum(dim=1)
        mean = (
            total / total.norm() if total.norm() > 0 else torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
        )
        return {"mean_normal": [float(x) for x in mean]}

    def baseline_output(self, stats: dict[str, Any], image: Tensor) -> Tensor:
        b, _, h, w = image.shape
        return (
            torch.tensor(stats["mean_normal"], dtype=torch.float32)
            .view(1, 3, 1, 1)
            .expand(b, 3, h, w)
            .clone()
        )

    def baseline_text(self) -> str:
        return "its mean normal everywhere"

    def plots(self, result: dict[str, Any], info: Info, out: Path) -> dict[str, Path]:
        from densemtl.viz.plots import plot_angular_error_cdf

        if not result.get("pixels"):
            return {}
        return {
            "Normals angular error": plot_angular_error_cdf(result["cdf"], out / "normals_angular_error.png")
        }

    # prediction
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        return {"normals": output[0].float().permute(1, 2, 0).cpu().numpy().astype(np.float32)}

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        return {"normals": target.permute(1, 2, 0).cpu().numpy().astype(np.float32)}

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        return colorize_normals(pred["normals"])

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        # the folder-format encoding (n + 1) * 127.5 is itself the usual normal-map colour picture
        return {"normals": self.encode(pred["normals"])}

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0, max_rel_std: float = 0.0
    ) -> np.ndarray:
        return pred["normals"]

    # uncertainty
    def merge_samples(self, outputs: list[Tensor]) -> Tensor:
        return unit(torch.stack(outputs).mean(0))  # the mean direction

    # export
    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        err = angular_error_deg(ref, got)
        within = float((err <= PARITY_MAX_DEG).double().mean()) if err.numel() else 1.0
        worst = float(err.max()) if err.numel() else 0.0
        return {"normals_within_0_5_deg": within, "normals_max_err_deg": worst}, within >= PARITY_FRACTION


NORMALS = Normals()
