"""A synthetic drive clip: a camera moving along the ego lane of ONE sampled street, rendered frame by frame.

The ``<clip>.json`` sidecar holds the camera intrinsics and pose (the sample meta keys), which
``densemtl.viz.video.run_video`` reads to place the BEV.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.synth.raycast import Camera
from densemtl.synth.render import render
from densemtl.synth.streets import sample_scene
from densemtl.viz.video import write_video


def synth_video(
    out: str | Path,
    frames: int = 60,
    size: tuple[int, int] = (192, 384),
    fps: float = 12.0,
    speed: float = 8.0,
    hfov_deg: float = 70.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Render a clip of a camera driving at ``speed`` m/s along the ego lane of one synthetic street.

    Writes ``out`` (MP4) and ``out.json`` (intrinsics, camera height, pitch, roll: the sample meta keys).
    """
    rng = np.random.default_rng(seed)
    length = 40.0 + frames * speed / fps  # the street must extend past the last frame's view
    scene = sample_scene(rng, length=length + 80.0, start=-30.0, ego_lane_clear=True)
    images, meta = [], {}
    for k in range(frames):
        z = k * speed / fps
        cam = Camera.from_fov(size, hfov_deg, position=(scene.ego_x, 1.5, z), pitch_deg=2.0)
        view = render(scene, cam, size, noise_rng=rng, objects=False)
        images.append(view["image"])
        meta = {key: view["meta"][key] for key in ("intrinsics", "camera_height", "pitch_deg", "roll_deg")}
    codec = write_video(out, images, fps)
    sidecar = Path(f"{out}.json")
    sidecar.write_text(json.dumps({**meta, "fps": fps, "speed_m_s": speed, "seed": seed}, indent=2) + "\n")
    return {"video": Path(out), "meta": sidecar, "frames": frames, "codec": codec}
