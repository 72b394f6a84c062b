"""A task is a plug-in: a toy fourth task defined only here trains, evaluates, exports and predicts.

``Brightness`` below is the example of docs/tasks.md: a per-pixel grey value, stored as an 8-bit PNG in its own
``brightness/`` folder, with its own head, loss, metrics, baseline, pictures and ONNX output. It is registered
with ``monkeypatch.setitem(TASKS, ...)`` for the test only; no package module knows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from densemtl.config import load_config
from densemtl.data.check import check_dataset
from densemtl.data.folder import FolderDataset, write_sample
from densemtl.data.format import DatasetFormatError, check_size, open_image, write_dataset_json
from densemtl.deploy.export import export_checkpoint
from densemtl.evaluation import evaluate_checkpoint
from densemtl.inference import Predictor, predict_paths
from densemtl.models.heads import light_trunk
from densemtl.tasks import TASKS
from densemtl.tasks.base import Accumulator, Info, Task, masked_mean, resize
from densemtl.train.engine import train
from helpers import records


# --------------------------------------------------------------------------------------------- the toy task
class BrightnessHead(nn.Module):
    """Grey value in [0, 1]: depthwise 3x3 + 1x1 to one channel, sigmoid at stride 4, bilinear to ``size``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.trunk = light_trunk(in_channels)
        self.out = nn.Conv2d(in_channels, 1, 1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, in_channels, h, w) -> (B, 1, *size)."""
        return resize(torch.sigmoid(self.out(self.trunk(x))), size)


class BrightnessLoss(nn.Module):
    """L1 on the pixels with a target (>= 0) of the samples ``sample_mask`` keeps; 0 when there are none."""

    def forward(self, pred: Tensor, target: Tensor, sample_mask: Tensor) -> Tensor:
        valid = (target >= 0) & sample_mask.view(-1, 1, 1, 1)  # (B, 1, H, W)
        return masked_mean((pred.float() - target.clamp_min(0)).abs(), valid)


class BrightnessMetrics(Accumulator):
    """Mean absolute error and the fraction of pixels within 0.05 of the target, over the whole dataset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._state = {k: torch.zeros((), dtype=torch.float64) for k in ("count", "abs_sum", "within")}

    def update(self, pred: Tensor, target: Tensor) -> None:
        valid = target >= 0
        err = (pred.double() - target.double()).abs()[valid]  # (N,)
        self._to(pred.device)
        self._state["count"] += err.numel()
        self._state["abs_sum"] += err.sum()
        self._state["within"] += (err < 0.05).sum()

    def compute(self) -> dict[str, Any]:
        n = float(self._state["count"])
        if n == 0:
            return {"mae": float("nan"), "within_0_05": float("nan"), "pixels": 0}
        return {
            "mae": float(self._state["abs_sum"]) / n,
            "within_0_05": float(self._state["within"]) / n,
            "pixels": int(n),
        }


class Brightness(Task):
    """Per-pixel grey value in [0, 1]; files ``<split>/brightness/<id>.png``, 8-bit grey (value / 255)."""

    name = folder = "brightness"
    fill = -1.0  # "no target": padding, and samples without a file
    headline = "within_0_05"
    lower_is_better = frozenset({"mae"})
    outputs = ("brightness",)

    # data: the 8-bit PNG <-> (H, W) float32 in [0, 1]
    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        img = open_image(path, "brightness")
        if img.mode != "L":
            raise DatasetFormatError(f"{path}: brightness must be an 8-bit grey PNG, got mode {img.mode}")
        raw = np.asarray(img)
        check_size(raw, path, size, "brightness")
        return raw.astype(np.float32) / 255.0

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        if array is None:
            return torch.full((1, *size), self.fill)  # (1, H, W)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]

    def encode(self, array: np.ndarray) -> np.ndarray:
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim != 2 or not (np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1):
            raise ValueError(f"brightness must be an (H, W) array in [0, 1], got shape {arr.shape}")
        return np.round(arr * 255).astype(np.uint8)

    # model, loss, metrics, baseline
    def make_head(self, in_channels: int, cfg) -> nn.Module:
        return BrightnessHead(in_channels)

    def make_loss(self, cfg) -> nn.Module:
        return BrightnessLoss()

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        return BrightnessMetrics()

    def fit_baseline(self, targets: list[Tensor], cfg) -> dict[str, Any]:
        values = torch.cat([t[t >= 0] for t in targets])
        return {"mean": float(values.mean())}

    def baseline_output(self, stats: dict[str, Any], image: Tensor) -> Tensor:
        b, _, h, w = image.shape
        return torch.full((b, 1, h, w), stats["mean"])

    def baseline_text(self) -> str:
        return "the training set's mean grey value everywhere"

    # prediction: raw (1, 1, H, W) -> {"brightness": (H, W)}, pictures and files
    def to_numpy(self, output: Tensor, info: Info) -> dict[str, np.ndarray]:
        return {"brightness": output[0, 0].float().cpu().numpy()}

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        return {"brightness": target[0].clamp_min(0).cpu().numpy()}

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        grey = self.encode(self.pseudo_label(pred, info))  # (H, W) uint8
        return np.repeat(grey[..., None], 3, axis=2)  # (H, W, 3) grey picture

    def pseudo_label(
        self, pred: dict[str, np.ndarray], info: Info, min_confidence: float = 0.0
    ) -> np.ndarray:
        return np.clip(pred["brightness"], 0.0, 1.0)

    # export: the default ONNX output (named "brightness"), compared to half a grey level
    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        err = float((ref - got).abs().max())
        return {"brightness_max_abs_err": err}, err <= 0.5 / 255


# ----------------------------------------------------------------------------------------------- the tests
H, W = 64, 96
N_TRAIN, N_VAL = 12, 4


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """The toy target: (H, W, 3) uint8 RGB -> (H, W) float32 luma (ITU-R BT.601) in [0, 1]."""
    return rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) / 255.0


def write_toy_dataset(root: Path) -> None:
    """Smooth random colour fields; brightness = their grey value, semseg = dark (< 0.5) / bright."""
    write_dataset_json(
        root,
        name="toy",
        tasks=["semseg", "brightness"],
        classes=["dark", "bright"],
        palette=[[0, 0, 0], [255, 255, 255]],
        splits=["train", "val"],
        depth_max=20.0,
    )
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for i in range(n):
            coarse = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(coarse).resize((W, H), Image.BILINEAR))  # (H, W, 3)
            grey = grey_of(image)
            semseg = (grey > 0.5).astype(np.uint8)
            write_sample(root, split, f"{i:03d}", image, semseg=semseg, brightness=grey)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Brightness:
    """The toy task registered in TASKS for one test (monkeypatch restores the dict afterwards)."""
    task = Brightness()
    monkeypatch.setitem(TASKS, task.name, task)
    return task


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, run folder) of a ~10 s CPU training run of semseg + brightness; TASKS restored after."""
    root, run = tmp_path_factory.mktemp("toy_data"), tmp_path_factory.mktemp("toy_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS, "brightness", Brightness())
        write_toy_dataset(root)
        sets = [
            f"data.root={root}",
            f"train.out_dir={run}",
            "model.tasks=[semseg, brightness]",
            "model.backbone=mobilenet_v3_small",
            "model.pretrained=none",
            "model.decoder_channels=16",
            "model.bn_momentum=0.3",  # 48 optimiser steps: BatchNorm statistics must keep up
            "loss.weights={brightness: 10}",  # an L1 on [0, 1] through a sigmoid, next to cross-entropy
            "train.epochs=16",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.device=cpu",
            "train.channels_last=false",
            f"data.crop=[{H}, {W}]",
            "data.color_jitter=0",  # jitter changes the image's grey value, not the stored target
            "data.num_workers=0",
        ]
        train(load_config(None, sets))
    assert "brightness" not in TASKS
    return root, run


def test_toy_task_metric_loss_and_encoding_by_hand(toy: Brightness) -> None:
    """The toy metric and loss against hand-computed values; -1 (no target) and dropped samples are skipped."""
    pred = torch.tensor([0.5, 0.5, 0.2, 0.9]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)  # (2, 1, 2, 2)
    target = torch.tensor([0.5, 0.52, 0.4, -1.0]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    metrics = toy.make_metrics(None, {})
    metrics.update(pred[:1], target[:1])
    metrics.update(pred[1:], target[1:])  # batched in two: same dataset-level numbers
    got = metrics.compute()
    assert got["pixels"] == 6 and got["mae"] == pytest.approx((0 + 0.02 + 0.2) / 3)
    assert got["within_0_05"] == pytest.approx(2 / 3)
    loss = toy.make_loss(None)(pred, target, torch.tensor([True, False]))
    assert loss.item() == pytest.approx((0 + 0.02 + 0.2) / 3, abs=1e-6)
    assert toy.make_loss(None)(pred, target, torch.tensor([True, True])).item() == pytest.approx(loss.item())
    assert toy.make_loss(None)(pred, target, torch.tensor([False, False])).item() == 0.0
    grey = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    assert toy.encode(grey).tolist() == [[0, 128], [255, 64]]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        toy.encode(grey + 1)


def test_toy_task_headline_is_in_the_epoch_line(toy: Brightness) -> None:
    from densemtl.train.runlog import epoch_line
    from densemtl.train.schedule import Phase

    stats = {"loss/total": 0.5, "images_per_s": 10.0, "train_seconds": 1.0}
    summary = {"semseg/miou": 0.25, "brightness/mae": 0.125, "brightness/within_0_05": 0.75}
    line = epoch_line(0, 2, Phase(0, 1.0, 2, 4, 1e-3, 0), stats, summary)
    assert "semseg/miou 0.250" in line and "brightness/within_0_05 0.750" in line


def test_toy_task_files_load_check_and_fill(toy: Brightness, tmp_path: Path) -> None:
    """write_sample stores the toy target in its folder, FolderDataset reads it, data check counts it."""
    write_toy_dataset(tmp_path)
    image = np.zeros((H, W, 3), np.uint8)
    write_sample(tmp_path, "val", "no_brightness", image, semseg=np.zeros((H, W), np.uint8))
    assert len(list((tmp_path / "train" / "brightness").glob("*.png"))) == N_TRAIN
    report = check_dataset(tmp_path)
    assert report.problems == [], report.format()
    assert report.splits["train"].with_task["brightness"] == N_TRAIN
    assert report.splits["val"].with_task == {
        "semseg": N_VAL + 1,
        "depth": 0,
        "normals": 0,
        "objects": 0,
        "brightness": N_VAL,
    }
    ds = FolderDataset(tmp_path, "val", tasks=("semseg", "brightness"))
    s = ds[0]
    grey = grey_of((s["image"] * 255).round().byte().permute(1, 2, 0).numpy())
    assert s["brightness"].shape == (1, H, W)
    assert np.abs(s["brightness"][0].numpy() - grey).max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    missing = ds[ds.ids.index("no_brightness")]
    assert missing["valid_tasks"] == {"semseg": True, "brightness": False}
    assert (missing["brightness"] == toy.fill).all()
    (tmp_path / "val" / "brightness" / "000.png").write_bytes(b"not a png")
    assert [p.what for p in check_dataset(tmp_path).errors] == ["brightness"]


@pytest.mark.usefixtures("toy")
def test_toy_task_trains_and_beats_its_baseline(toy_run: tuple[Path, Path]) -> None:
    """Training logs the toy loss and metrics; evaluate_checkpoint reports it well above its trivial baseline."""
    _, run = toy_run
    epochs = records(run)
    assert len(epochs) == 16 and all(np.isfinite(r["loss/brightness"]) for r in epochs)
    assert epochs[-1]["loss/brightness"] < 0.6 * epochs[0]["loss/brightness"]
    assert "val/brightness/mae" in epochs[-1] and "val/brightness/within_0_05" in epochs[-1]
    result = evaluate_checkpoint(run / "best.pt", split="val", out_dir=run / "eval", device="cpu")
    model, base = result["summary"], result["baseline_summary"]
    assert result["results"]["brightness"]["pixels"] == N_VAL * H * W
    assert result["baseline_stats"]["brightness"]["mean"] == pytest.approx(0.5, abs=0.15)
    assert model["brightness/mae"] < 0.6 * base["brightness/mae"], (model, base)
    assert model["brightness/within_0_05"] > base["brightness/within_0_05"] + 0.2, (model, base)
    assert model["score"] == pytest.approx((model["semseg/miou"] + model["brightness/within_0_05"]) / 2)
    assert "| brightness/mae |" in (run / "eval" / "metrics.md").read_text()


@pytest.mark.export
@pytest.mark.usefixtures("toy")
def test_toy_task_exports_with_parity_and_runs_in_onnx_runtime(
    toy_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The ONNX graph has the toy output under its default name; its parity rule passes; ORT predicts it."""
    pytest.importorskip("onnxruntime")
    root, run = toy_run
    report = export_checkpoint(run / "best.pt", tmp_path / "toy.onnx")
    assert report["metadata"]["tasks"] == ["semseg", "brightness"]
    assert report["metadata"]["outputs"] == ["semseg_logits", "semseg", "semseg_confidence", "brightness"]
    assert report["parity"]["passed"] and report["parity"]["inputs"] == str(root / "val")
    assert 0.0 <= report["parity"]["brightness_max_abs_err"] <= 0.5 / 255
    rgb = np.asarray(Image.open(root / "val" / "images" / "000.png"))
    onnx_pred = Predictor.from_onnx(tmp_path / "toy.onnx").predict(rgb)
    torch_pred = Predictor.from_checkpoint(run / "best.pt", device="cpu").predict(rgb)
    assert onnx_pred["brightness"].shape == (H, W)
    assert np.abs(onnx_pred["brightness"] - torch_pred["brightness"]).max() <= 0.5 / 255


@pytest.mark.usefixtures("toy")
def test_toy_task_predicts_arrays_and_files(toy_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Predictor returns the toy array; predict_paths writes its files (Task.files) and panel column."""
    root, run = toy_run
    rgb = np.asarray(Image.open(root / "val" / "images" / "001.png"))
    pred = Predictor.from_checkpoint(run / "best.pt", device="cpu").predict(rgb)
    assert set(pred) == {"semseg", "confidence", "entropy", "brightness"}
    b = pred["brightness"]
    assert b.shape == (H, W) and b.dtype == np.float32 and b.min() >= 0.0 and b.max() <= 1.0
    grey = grey_of(rgb)
    assert np.abs(b - grey).mean() < np.abs(grey.mean() - grey).mean()  # better than a constant guess
    written = predict_paths(run / "best.pt", [root / "val" / "images"], tmp_path, device="cpu")
    assert len(written) == N_VAL
    files = written[1]
    assert files["brightness"] == tmp_path / "001_brightness.png"
    stored = np.asarray(Image.open(files["brightness"]))
    assert stored.shape == (H, W) and stored.dtype == np.uint8
    assert np.abs(stored / 255.0 - b).max() <= 0.5 / 255 + 1e-6  # the file is the prediction, encoded
    assert np.asarray(Image.open(files["brightness_color"])).shape == (H, W, 3)
    assert np.asarray(Image.open(files["panel"])).shape == (H, 3 * W, 3)  # RGB, semseg, brightness
