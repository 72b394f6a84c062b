"""Video: frames in, panels of RGB | each task's picture | BEV out as MP4.

MP4 is written as H.264 (yuv420p, plays in browsers) through the FFmpeg binary that ``imageio-ffmpeg`` ships.
Without it, OpenCV writes: H.264 ("avc1") when its build has an encoder, which the PyPI wheels lack
(licensing), else MPEG-4 Part 2 ("mp4v"), which desktop players read but browsers do not. The codec used is
returned and printed. No audio track is written.

A synthetic clip comes from :func:`densemtl.synth.drive.synth_video`; its ``<clip>.json`` sidecar (camera
intrinsics and pose) is read by ``run_video``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.scene3d.bev import SceneOptions, known_focal, scene_bev, scene_bev_picture, scene_of

CODECS = ("avc1", "mp4v")  # preferred first


class FfmpegH264Writer:
    """H.264 MP4 writer with OpenCV's ``write(bgr)`` / ``release()`` interface, over imageio-ffmpeg's binary."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int]) -> None:
        import imageio_ffmpeg

        h, w = size
        self._gen = imageio_ffmpeg.write_frames(
            str(path),
            (w, h),
            fps=float(fps),
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=7,
            macro_block_size=2,
            ffmpeg_log_level="error",  # yuv420p needs even sides: odd ones are padded
        )
        self._gen.send(None)  # start ffmpeg

    def write(self, bgr: np.ndarray) -> None:
        self._gen.send(np.ascontiguousarray(bgr[..., ::-1]).tobytes())  # ffmpeg reads RGB

    def release(self) -> None:
        self._gen.close()


def open_video_writer(path: str | Path, fps: float, size: tuple[int, int]) -> tuple[Any, str]:
    """A writer for ``size`` (H, W) BGR frames and its codec: H.264 via imageio-ffmpeg, else OpenCV's best."""
    import cv2

    from densemtl.fileio import check_output

    path = check_output(path)  # refuse a folder or a symlink there, and a read-only folder
    if not (fps > 0 and np.isfinite(fps)):
        raise ValueError(f"video frame rate must be a finite number > 0 (--fps), got {fps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return FfmpegH264Writer(path, fps, size), "h264"
    except ImportError:
        pass  # imageio-ffmpeg not installed: fall back to OpenCV
    h, w = size
    level = cv2.getLogLevel() if hasattr(cv2, "getLogLevel") else None
    if level is not None:
        cv2.setLogLevel(0)  # a missing H.264 encoder is expected; do not print FFmpeg's errors
    try:
        for codec in CODECS:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), float(fps), (w, h))
            if writer.isOpened():
                return writer, codec
            writer.release()
    finally:
        if level is not None:
            cv2.setLogLevel(level)
    raise ValueError(f"OpenCV cannot write MP4 to {path}: no H.264 or mp4v encoder in this OpenCV build")


def write_video(path: str | Path, frames: list[np.ndarray], fps: float) -> str:
    """Write uint8 RGB frames (H, W, 3) to an MP4; returns the codec used."""
    writer, codec = open_video_writer(path, fps, frames[0].shape[:2])
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
    finally:
        writer.release()
    return codec


def source_name(source: str | Path | int) -> str:
    """How messages name a video source: the plain path, or ``camera N``."""
    return f"camera {source}" if isinstance(source, int) else str(source)


def check_source(source: str | Path | int) -> None:
    """Raise ``FileNotFoundError`` (naming the path) unless ``source`` is a camera index or an existing file."""
    if isinstance(source, int):
        if source < 0:
            raise ValueError(f"camera index must be >= 0, got {source}")
        return
    path = Path(source)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"video {path} {what}: give a video file, or a camera index such as 0")


def read_video(source: str | Path | int, max_frames: int | None = None):
    """Yield RGB frames (H, W, 3) uint8 from a file or a camera index (live input)."""
    import cv2

    check_source(source)
    if max_frames is not None and max_frames < 1:
        raise ValueError(
            f"max_frames must be >= 1 (--max-frames), or None for the whole clip, got {max_frames}"
        )
    cap = cv2.VideoCapture(source if isinstance(source, int) else str(source))
    if not cap.isOpened():
        raise ValueError(
            f"cannot open video {source_name(source)}: not a video OpenCV can decode (or the camera is busy)"
        )
    try:
        n = 0
        while max_frames is None or n < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            n += 1
            yield frame[..., ::-1].copy()
    finally:
        cap.release()


def load_backend(path: str | Path, device: str = "auto", backend: str = "torch"):
    """A ``Predictor`` for a ``.pt`` checkpoint run by ``backend`` ("torch" or "onnxruntime"), or one over an
    exported ``.onnx`` file (always ONNX Runtime)."""
    from densemtl.inference import Predictor

    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return Predictor.from_onnx(path)
    return Predictor.from_checkpoint(path, device=device, backend=backend)


def video_panel(
    rgb: np.ndarray,
    pred: dict[str, np.ndarray],
    info: dict[str, Any],
    tasks: tuple[str, ...],
    bev_rgb: np.ndarray | None,
    fps: float,
) -> np.ndarray:
    """RGB | each task's picture | BEV (scaled to the frame height), FPS written top left.

    ``info`` and ``tasks`` are the predictor's (``Predictor.info``, ``Predictor.tasks``), as for
    :func:`densemtl.inference.prediction_panel`.
    """
    import cv2

    from densemtl.inference import prediction_panel

    panel = prediction_panel(rgb, pred, info, tasks)
    h = rgb.shape[0]
    if bev_rgb is not None:
        w = max(1, round(bev_rgb.shape[1] * h / bev_rgb.shape[0]))
        panel = np.concatenate([panel, cv2.resize(bev_rgb, (w, h), interpolation=cv2.INTER_NEAREST)], axis=1)
    panel = np.ascontiguousarray(panel)
    scale = max(0.35, h / 480)
    for color, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # outlined text stays readable anywhere
        cv2.putText(panel, f"{fps:.1f} FPS", (6, int(22 * scale) + 4), 0, scale, color, thick, cv2.LINE_AA)
    return panel


def frame_bev(
    rgb: np.ndarray, pred: dict[str, np.ndarray], info: dict[str, Any], opts: SceneOptions, meta: dict
) -> np.ndarray | None:
    """Coloured BEV of one predicted frame (with its detected objects, if any), or None without depth."""
    scene = scene_of(rgb, pred, info, opts, meta)
    if scene is None:
        return None
    return scene_bev_picture(scene, scene_bev(scene, opts.grid), pred, info, opts.grid)


def run_video(
    model_path: str | Path,
    source: str | Path | int,
    out: str | Path,
    opts: SceneOptions | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    device: str = "auto",
    backend: str = "torch",
) -> dict[str, Any]:
    """Load a checkpoint (or ONNX model) with :func:`load_backend` and run ``predict_video``; what
    ``densemtl video`` calls. A missing clip or an unwritable ``out`` fails before the model loads."""
    from densemtl.fileio import check_output

    check_source(source)
    check_output(out)
    return predict_video(load_backend(model_path, device, backend), source, out, opts, fps, max_frames)


def predict_video(
    predictor: Any,
    source: str | Path | int,
    out: str | Path,
    opts: SceneOptions | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> dict[str, Any]:
    """Predict every frame of a video file or camera and write the panel MP4; returns frames, FPS and codec.

    ``predictor`` has ``predict(rgb, focal_px=None) -> {output: array}``, ``info`` and ``tasks`` (a ``Predictor``). Camera
    intrinsics/pose come from ``opts``, else ``<source>.json`` (written by ``synth_video``), else ``opts``'s field
    of view and a ground plane fitted to predicted road/floor pixels. The FPS shown is the smoothed rate of
    prediction + BEV (not decoding or encoding).
    """
    from tqdm.auto import tqdm

    opts = opts or SceneOptions(bev=True)
    sidecar = Path(f"{source}.json") if not isinstance(source, int) else None
    meta = json.loads(sidecar.read_text()) if sidecar is not None and sidecar.is_file() else {}
    if not meta and opts.intrinsics is None and opts.hfov_deg is None:
        opts = replace(opts, hfov_deg=70.0)  # a typical dash-cam; say --hfov or --fx.. for your camera
    writer, codec, n, speed = None, "", 0, 0.0
    try:
        frames = read_video(source, max_frames)
        for rgb in tqdm(frames, desc="video", total=_frame_count(source, max_frames), disable=None):
            t0 = time.perf_counter()
            pred = predictor.predict(rgb, focal_px=known_focal(opts, meta, rgb.shape[:2]))
            bev = frame_bev(rgb, pred, predictor.info, opts, meta) if opts.bev else None
            dt = max(time.perf_counter() - t0, 1e-6)
            speed = 1.0 / dt if n == 0 else 0.9 * speed + 0.1 / dt  # smoothed frames per second
            panel = video_panel(rgb, pred, predictor.info, predictor.tasks, bev, speed)
            if writer is None:
                writer, codec = open_video_writer(out, fps or float(meta.get("fps", 12.0)), panel.shape[:2])
            writer.write(np.ascontiguousarray(panel[..., ::-1]))
            n += 1
    finally:
        if writer is not None:
            writer.release()
    if n == 0:
        raise ValueError(
            f"no frames could be read from {source_name(source)}: is it an empty or corrupt video?"
        )
    return {"video": Path(out), "frames": n, "fps": speed, "codec": codec}


def _frame_count(source: str | Path | int, max_frames: int | None) -> int | None:
    if isinstance(source, int):
        return max_frames
    import cv2

    cap = cv2.VideoCapture(str(source))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else 0
    cap.release()
    return min(n, max_frames) if max_frames and n > 0 else (n or None)
