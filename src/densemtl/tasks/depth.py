"""Metric depth: a bounded head in metres, L1/MSE/berHu/SILog losses, Eigen/KITTI metrics, depth pictures.

Files: ``<split>/depth/<id>.png``, uint16 with metres = value / ``dataset.json depth.scale`` (256 by default,
the KITTI convention), 0 = no measurement. Predictions are float32 metres. A network learns depth for the focal
length (in pixels) it was trained at, which is why evaluation and prediction run at the training input scale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
from densemtl.tasks.base import INVALID_DEPTH, Accumulator, Info, Joined, Task, TaskStats
from densemtl.tasks.depth_head import (  # noqa: F401 (public here too)
    DEPTH_PARAMS,
    DepthHead,
    depth_from_raw,
    raw_for_depth,
    std_from_raw,
)
from densemtl.tasks.depth_losses import (  # noqa: F401 (public here too)
    DEPTH_LOSSES,
    DEPTH_SPACES,
    EPS_DEPTH,
    NLL_LOSSES,
    DepthLoss,
    berhu,
    depth_transform,
)
from densemtl.tasks.depth_metrics import DepthMetrics
from densemtl.tasks.uncertainty_metrics import Sparsification, fit_std_scale
from densemtl.viz.colors import colorize_depth

DEPTH_TOLERANCE_M = 1e-3  # export parity: max abs depth error, metres
PICTURE_NEAR_M = 1.0  # depth pictures: log colour scale from here to the dataset's depth max
REL_STD_PICTURE_MAX = 0.5  # depth-std pictures: colour scale of the relative std from 0 to this
CALIBRATION_PIXELS = 20_000  # per batch: pixels kept for fitting the std scale


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
    lower_is_better = lower_is_better | {"ause_abs_rel", "ause_rmse", "ause_delta1"}
    hub_pipeline_tag = "depth-estimation"
    outputs = ("depth", "depth_std")  # depth_std only from a head with uncertainty

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
            in_channels, cfg.depth_param, cfg.min_depth, cfg.max_depth, cfg.head, cfg.head_channels,
            cfg.uncertainty, cfg.dropout,
        )  # fmt: skip

    # loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        c = cfg.loss
        if not (c.depth_clip > 0 and math.isfinite(c.depth_clip)):
            raise ValueError(f"loss.depth_clip must be a positive number of metres, got {c.depth_clip}")
        if c.depth in NLL_LOSSES and not cfg.model.uncertainty:
            raise ValueError(f"loss.depth={c.depth} trains the depth's std: set model.uncertainty=true")
        return DepthLoss(c.depth, c.depth_space, c.depth_clip, c.silog_lambda, c.silog_scale, c.nll_beta)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        d = cfg.data
        return Joined(
            DepthMetrics(d.eval_depth_min, d.eval_depth_max, d.eval_per_image),
            Sparsification(d.eval_depth_min, d.eval_depth_max),  # nothing without the std channel
        )

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
        from densemtl.viz.uncertainty_plots import plot_sparsification

        prof = result.get("profile")
        if not prof or sum(prof["count"]) == 0:
            return {}
        edges, count = np.array(prof["edges"]), np.array(prof["count"])
        spars = {}
        if result.get("sparsification"):
            spars["Depth uncertainty: sparsification"] = plot_sparsification(
                result["sparsification"], out / "depth_sparsification.png"
            )
        return {
            **spars,
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
        out = output[0].float().cpu()  # (1 or 2, H, W)
        result = {"depth": out[0].numpy().astype(np.float32)}
        if out.shape[0] == 2:  # the std of ln depth -> metres, to first order: std(d) = d * std(ln d)
            result["depth_std"] = (out[0] * out[1]).numpy().astype(np.float32)
        return result

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        return {"depth": target[0].cpu().numpy().astype(np.float32)}

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        return colorize_depth(pred["depth"], vmin=PICTURE_NEAR_M, vmax=_max_depth(info), log=True)

    def uncertainty_picture(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray | None:
        if "depth_std" not in pred:
            return None
        rel = pred["depth_std"] / np.maximum(pred["depth"], EPS_DEPTH)  # relative std, 0 (dark) .. 0.5 (bright)
        return colorize_depth(np.maximum(rel, 1e-6), vmin=0.0, vmax=REL_STD_PICTURE_MAX, cmap="inferno")

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        files = {
            "depth": encode_depth(np.minimum(pred["depth"], 255.0)),
            "depth_color": self.colorize(pred, rgb, info),
        }
        if "depth_std" in pred:  # uint16 metres * 256 like the depth; the picture shows the relative std
            files["depth_std"] = encode_depth(np.minimum(pred["depth_std"], 255.0))
            files["depth_std_color"] = self.uncertainty_picture(pred, rgb, info)
        return files

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0, max_rel_std: float = 0.0
    ) -> np.ndarray:
        depth = np.clip(pred["depth"], 0.0, min(_max_depth(info), DEPTH_MAX_ENCODABLE))  # (H, W) metres
        if max_rel_std > 0:
            if "depth_std" not in pred:
                raise ValueError("--max-rel-std needs a teacher that predicts depth_std (model.uncertainty)")
            unsure = pred["depth_std"] > max_rel_std * np.maximum(pred["depth"], EPS_DEPTH)
            depth = np.where(unsure, INVALID_DEPTH, depth)  # too uncertain: no measurement
        return depth

    # uncertainty
    def merge_samples(self, outputs: list[Tensor]) -> Tensor:
        """Geometric mean depth; the std of ln depth combines the mean aleatoric variance with the passes'
        spread of ln depth (law of total variance)."""
        stack = torch.stack(outputs)  # (N, B, C, H, W)
        log_d = stack[:, :, :1].clamp_min(EPS_DEPTH).log()
        depth = log_d.mean(0).exp()
        var = log_d.var(0, unbiased=False)
        if stack.shape[2] == 2:
            var = var + stack[:, :, 1:].square().mean(0)
        return torch.cat([depth, var.sqrt()], dim=1)  # (B, 2, H, W): a spread even without the std channel

    def calibration_data(self, output: Tensor, target: Tensor) -> Tensor | None:
        if output.shape[1] != 2:
            return None
        valid = (target > 0) & torch.isfinite(target)  # (B, 1, H, W)
        r = output[:, :1].clamp_min(EPS_DEPTH).log() - target.clamp_min(EPS_DEPTH).log()
        pairs = torch.stack([r[valid], output[:, 1:][valid]], dim=1).float()  # (N, 2): residual, std
        return pairs[:: max(1, len(pairs) // CALIBRATION_PIXELS)]

    def fit_calibration(self, data: Tensor, head: nn.Module, cfg) -> dict[str, float]:
        """The std scale that minimises the NLL of held-out log residuals (closed form), stored in the head."""
        dist = "gaussian" if cfg.loss.depth == "gaussian_nll" else "laplace"
        old = float(head.calib_std_scale)
        k = fit_std_scale(data[:, 0], data[:, 1] / old, dist)  # data was produced with the old scale
        head.calib_std_scale.fill_(k)
        return {"std_scale": k, "pixels": float(len(data))}

    def reset_calibration(self, head: nn.Module) -> None:
        if hasattr(head, "calib_std_scale"):
            head.calib_std_scale.fill_(1.0)

    # export
    def onnx_outputs(self, output: Tensor, extras: bool = True) -> dict[str, Tensor]:
        if output.shape[1] == 1:
            return {"depth": output}
        return {"depth": output[:, :1], "depth_std": output[:, :1] * output[:, 1:]}  # metres, both

    def onnx_axes(self, output: Tensor, extras: bool = True) -> dict[str, dict[int, str]]:
        axes = {0: "batch", 2: "height", 3: "width"}
        return {"depth": axes, "depth_std": dict(axes)} if output.shape[1] == 2 else {"depth": axes}

    def from_onnx(self, raw: dict[str, Tensor]) -> Tensor:
        if "depth_std" not in raw:
            return raw["depth"]
        return torch.cat([raw["depth"], raw["depth_std"] / raw["depth"].clamp_min(EPS_DEPTH)], dim=1)

    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        err = float((ref[:, :1] - got[:, :1]).abs().max()) if ref.numel() else 0.0
        figures = {"depth_max_abs_err_m": err}
        if ref.shape[1] == 2:  # compare the std in metres, as the graph outputs it
            std_err = float((ref[:, :1] * ref[:, 1:] - got[:, :1] * got[:, 1:]).abs().max())
            figures["depth_std_max_abs_err_m"] = std_err
            err = max(err, std_err)
        return figures, err <= DEPTH_TOLERANCE_M


DEPTH = Depth()
