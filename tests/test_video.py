"""Synthetic drive clip -> predicted panel MP4 (RGB | overlay | depth | BEV), codec fallback, CLI wiring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densemtl.scene3d.bev import BevGrid, SceneOptions
from densemtl.synth.drive import synth_video
from densemtl.viz.video import load_backend, predict_video, read_video, video_panel

SIZE = (48, 96)


class GroundTruthPredictor:
    """Stands in for a Predictor: road below the horizon at the exact depth of the flat ground, sky above."""

    class_names = ["road", "sidewalk", "building", "vegetation", "pole", "car", "person", "sky"]
    palette = np.array([[128, 64, 128], [244, 35, 232], *[[70, 70, 70]] * 5, [70, 130, 180]], np.uint8)
    info = {"classes": class_names, "palette": palette.tolist(), "depth": {"max": 80.0}}
    tasks = ("semseg", "depth")

    def __init__(self, meta: dict) -> None:
        fx, fy, cx, cy = meta["intrinsics"]
        assert meta["roll_deg"] == 0.0
        v = np.arange(SIZE[0], dtype=np.float64)[:, None]
        tilt = np.radians(
            meta["pitch_deg"]
        )  # ray (., (v - cy)/fy, 1) meets y = -h: z-depth h / (sin + a cos)
        a = (v - cy) / fy
        denom = np.sin(tilt) + a * np.cos(tilt)
        depth = np.where(denom > 1e-3, meta["camera_height"] / np.maximum(denom, 1e-3), 0.0)
        self.depth = np.broadcast_to(np.minimum(depth, 60.0), SIZE).astype(np.float32)
        self.semseg = np.where(self.depth > 0, 0, 7).astype(np.uint8)
        self.calls = 0

    def predict(self, rgb: np.ndarray, focal_px: float | None = None) -> dict[str, np.ndarray]:
        assert rgb.shape == (*SIZE, 3) and rgb.dtype == np.uint8
        self.calls += 1
        return {"semseg": self.semseg, "depth": self.depth}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "drive.mp4"
    return synth_video(out, frames=4, size=SIZE, fps=5.0, speed=10.0, seed=1)


def test_synth_video_writes_a_readable_clip_and_its_camera(clip):
    assert clip["codec"] == "h264"  # browser-playable, via imageio-ffmpeg's FFmpeg
    frames = list(read_video(clip["video"]))
    assert len(frames) == 4 and frames[0].shape == (*SIZE, 3)
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 2  # the camera moved
    meta = json.loads(clip["meta"].read_text())
    assert meta["camera_height"] == 1.5 and len(meta["intrinsics"]) == 4 and meta["fps"] == 5.0


def test_predict_video_panels_show_the_bev_and_fps(clip, tmp_path):
    predictor = GroundTruthPredictor(json.loads(clip["meta"].read_text()))
    grid = BevGrid(x_range=(-10.0, 10.0), z_range=(0.0, 20.0), cell=0.5)
    r = predict_video(predictor, clip["video"], tmp_path / "out.mp4", SceneOptions(bev=True, grid=grid))
    assert r["frames"] == predictor.calls == 4 and r["fps"] > 0
    panels = list(read_video(r["video"]))
    assert len(panels) == 4
    h, w = panels[0].shape[:2]
    assert h == SIZE[0] and w == 3 * SIZE[1] + SIZE[0]  # square BEV grid scaled to the frame height
    bev = panels[0][:, 3 * SIZE[1] :].astype(int)
    ahead = bev[h // 4 : 3 * h // 4, h // 2 - 2 : h // 2 + 2]  # (rows, 4, 3), lossy codec: loose colour tests
    assert (ahead.sum(-1) > 330).mean() > 0.9  # free (light grey) or drivable (light green), not unseen/dim
    assert (ahead[..., 1] > ahead[..., 0] + 40).mean() > 0.3  # ... and where road pixels land, green
    assert (bev[-4:, :4].sum(-1) < 200).all() and (bev[-4:, -4:].sum(-1) < 200).all()  # beside: unseen


def test_panel_has_fps_text():
    rgb = np.zeros((*SIZE, 3), np.uint8)
    pred = {"semseg": np.zeros(SIZE, np.uint8)}
    palette = np.zeros((1, 3), np.uint8)
    with_text = video_panel(rgb, pred, {"palette": palette}, ("semseg",), None, 12.3)
    assert with_text.shape == (SIZE[0], 2 * SIZE[1], 3)
    assert with_text[:20, :60].max() == 255 and with_text[30:].max() == 0


def test_onnx_input_goes_to_the_onnx_runtime_backend(tmp_path):
    # The backend itself is tested in test_export.py; here: an .onnx path is routed to it, with a clear error.
    with pytest.raises(FileNotFoundError, match=r"model\.onnx does not exist.*densemtl export"):
        load_backend(tmp_path / "model.onnx")


def test_cli_synth_video_and_video_error(tmp_path, capsys):
    from densemtl.cli import main

    out = tmp_path / "c.mp4"
    argv = ["data", "synth-video", "--out", str(out), "--frames", "2", "--size", "32x64"]
    assert main(argv) == 0
    assert out.is_file() and (tmp_path / "c.mp4.json").is_file()
    assert (
        main(["video", "--checkpoint", str(tmp_path / "nope.pt"), str(out), "--out", str(tmp_path / "o.mp4")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
