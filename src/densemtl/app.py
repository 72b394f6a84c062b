"""``densemtl app``: a browser app (Gradio) over a :class:`~densemtl.inference.Predictor`.

Upload an image (or take one with the webcam, or pick an example from the checkpoint's validation split) and see
every task's picture, the bird's-eye view, the semantic point cloud in an interactive 3-D view, the latency and
the class legend. The work is done by :func:`predict_views`, which needs no browser; :func:`build_app` lays it
out. Gradio is an optional extra (``pip install 'densemtl[app]'``), imported only inside the functions that use it.

The 3-D view is a binary glTF (``.glb``) point cloud, which Gradio's ``Model3D`` draws with Babylon.js; a plain
point-cloud ``.ply`` is drawn only by recent Gradio releases (earlier ones take every ``.ply`` for a Gaussian
splat and show nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import tempfile
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densemtl.argtypes import device_name, int_range
from densemtl.scene3d.defaults import DEFAULT_MAX_REL_STD

if TYPE_CHECKING:
    import gradio
    import numpy as np

    from densemtl.inference import Predictor
    from densemtl.scene3d.bev import SceneOptions
    from densemtl.scene3d.geometry import PointCloud

DEFAULT_HFOV = 60.0  # degrees: a typical phone or dash-cam lens when the image brings no intrinsics
N_EXAMPLES = 4
POINT_COLOURS = ("class", "image")  # what colours the 3-D points: their class's palette colour or the pixel's
CLOUD_VIEW = (-90, 70, 36)  # Model3D camera (alpha, beta, radius): behind and above the camera, looking ahead
INSTALL_HINT = "pip install 'densemtl[app]' (or pip install gradio)"


class AppUnavailableError(ModuleNotFoundError):
    """Gradio, the optional extra of the app, is not installed; the message says how to install it."""


def _gradio() -> Any:
    """The ``gradio`` module, or :class:`AppUnavailableError`."""
    try:
        import gradio
    except ImportError as e:
        raise AppUnavailableError(f"densemtl app needs the gradio package: {INSTALL_HINT}") from e
    return gradio


# ------------------------------------------------------------------------------------------------- views
def legend(predictor: Predictor) -> list[tuple[str, tuple[int, int, int]]]:
    """``(class name, (r, g, b))`` for every class, in the colours the pictures use (``colorize_labels``)."""
    import numpy as np

    from densemtl.viz.colors import colorize_labels

    names = predictor.class_names
    colours = colorize_labels(np.arange(len(names), dtype=np.uint8)[None], predictor.palette)[0]  # (N, 3)
    return [(name, tuple(int(v) for v in c)) for name, c in zip(names, colours, strict=True)]


def task_pictures(predictor: Predictor, rgb: np.ndarray, pred: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """``(caption, uint8 (H, W, 3))`` per task (``Task.colorize``) and its uncertainty picture when it has one."""
    from densemtl.tasks import TASKS

    pictures = []
    for t in predictor.tasks:
        pictures.append((t, TASKS[t].colorize(pred, rgb, predictor.info)))
        unsure = TASKS[t].uncertainty_picture(pred, rgb, predictor.info)
        if unsure is not None:
            pictures.append((f"{t} uncertainty", unsure))
    return pictures


def predict_views(
    predictor: Predictor,
    rgb: Any,
    hfov: float = DEFAULT_HFOV,
    *,
    meta: dict | None = None,
    out_dir: str | Path | None = None,
    colour_by: str = "class",
    max_rel_std: float = DEFAULT_MAX_REL_STD,
) -> dict[str, Any]:
    """Everything the app shows for one image, without a browser.

    ``rgb`` is anything ``as_rgb`` takes (uint8 (H, W, 3), a path, a PIL image). ``meta`` is an example's
    folder-format meta JSON, or None: as for ``predict --bev``, its intrinsics and camera height/pitch/roll win,
    else the intrinsics come from ``hfov`` (degrees) and the pose is fitted to the predicted road/floor.
    ``out_dir`` receives the point cloud (default: a new temporary folder). With depth uncertainty, points whose
    depth std exceeds ``max_rel_std`` times their depth are dropped first (0 keeps every point; ``SceneOptions``).

    Returns:
        ``pred`` (``Predictor.predict``), ``pictures`` (:func:`task_pictures`), ``latency_ms`` (the prediction
        alone), ``legend`` (:func:`legend`), ``camera`` (where intrinsics and pose came from), ``intrinsics`` and
        ``pose`` (or None), ``bev`` (uint8 (rows, cols, 3) or None), ``cloud`` (``.glb`` path or None),
        ``points`` and ``message`` ('' when the 3-D views exist, else why not).
    """
    from densemtl.data.images import as_rgb
    from densemtl.scene3d.bev import SceneOptions, known_focal

    if colour_by not in POINT_COLOURS:
        raise ValueError(f"colour_by={colour_by!r} is not one of {POINT_COLOURS}")
    rgb = as_rgb(rgb)
    meta = meta or {}
    opts = SceneOptions(bev=True, pointcloud=True, hfov_deg=hfov, max_rel_std=max_rel_std)
    start = time.perf_counter()
    pred = predictor.predict(rgb, focal_px=known_focal(opts, meta, rgb.shape[:2]))  # objects' distances
    latency_ms = 1000.0 * (time.perf_counter() - start)
    intrinsics = "the example's intrinsics" if "intrinsics" in meta else f"a {hfov:g} degree field of view"
    pose = "the example's pose" if "camera_height" in meta else "the pose fitted to the predicted ground"
    views = {
        "pred": pred,
        "pictures": task_pictures(predictor, rgb, pred),
        "latency_ms": latency_ms,
        "legend": legend(predictor),
        "camera": f"{intrinsics}, {pose}",
    }
    return views | _scene_views(predictor, rgb, pred, opts, meta, out_dir, colour_by)


def _scene_views(
    predictor: Predictor, rgb: np.ndarray, pred: dict[str, np.ndarray], opts: SceneOptions, meta: dict,
    out_dir: str | Path | None, colour_by: str,
) -> dict[str, Any]:  # fmt: skip
    """The 3-D part of :func:`predict_views`: BEV picture, ``.glb`` cloud, or the message saying why there are none."""
    from densemtl.scene3d.bev import DEPTH_STD_KEY, scene_bev, scene_bev_picture, scene_of

    views: dict[str, Any] = {"intrinsics": None, "pose": None, "bev": None, "cloud": None, "points": 0}
    dropped = ""
    if DEPTH_STD_KEY in pred and opts.max_rel_std > 0:
        dropped = (f" Points whose depth std exceeds {opts.max_rel_std:.0%} of their depth were dropped first: "
                   "raise the limit (0 keeps every point).")  # fmt: skip
    try:
        scene = scene_of(rgb, pred, predictor.info, opts, meta)
    except ValueError:  # no usable road/floor for the pose
        return views | {"message": "No bird's-eye view or 3-D view for this image: the camera pose is fitted to "
                        "the predicted road or floor, and there is too little of it (at least 50 pixels with a "
                        "valid depth) or its plane does not lie below the camera." + dropped}  # fmt: skip
    if scene is None:
        return views | {"message": "No bird's-eye view or 3-D view: this model predicts no depth."}
    views |= {"intrinsics": scene.intrinsics, "pose": scene.pose, "message": ""}
    views["bev"] = scene_bev_picture(scene, scene_bev(scene, opts.grid), pred, predictor.info, opts.grid)
    cloud = _display_cloud(scene.cloud, opts.voxel, predictor.palette, colour_by)
    views["points"] = len(cloud)
    if len(cloud) == 0:
        return views | {"message": f"No 3-D view: no point has a valid depth within {opts.max_range:g} m." + dropped}
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="densemtl_app_"))
    digest = hashlib.sha1(cloud.xyz.tobytes() + cloud.rgb.tobytes()).hexdigest()[:16]
    views["cloud"] = write_glb(folder / f"cloud_{digest}.glb", cloud)  # content-named: never a stale file
    return views


def _display_cloud(cloud: PointCloud, voxel: float | None, palette: np.ndarray, colour_by: str) -> PointCloud:
    """The ground-frame cloud thinned to one point per voxel (a browser draws it) and coloured as asked."""
    from densemtl.scene3d.geometry import voxel_downsample
    from densemtl.viz.colors import colorize_labels

    small = voxel_downsample(cloud, voxel) if voxel else cloud
    if colour_by == "class":
        small = replace(small, rgb=colorize_labels(small.label[None], palette)[0])
    return small


def write_glb(path: str | Path, cloud: PointCloud) -> Path:
    """A coloured point cloud as binary glTF 2.0 (points primitive, unlit): Model3D, Blender, three.js open it.

    The ground frame (x right, y up, z forward, left-handed) becomes glTF's right-handed one (+y up, +z the
    front, -x right) by negating x, so the scene is not mirrored.
    """
    import numpy as np

    from densemtl.fileio import atomic_write

    if len(cloud) == 0:
        raise ValueError("a glTF point cloud needs at least one point")
    xyz = np.asarray(cloud.xyz, np.float32) * np.float32([-1, 1, 1])  # (N, 3) glTF axes
    rgba = np.concatenate([cloud.rgb, np.full((len(cloud), 1), 255, np.uint8)], axis=1)  # (N, 4): 4-byte aligned
    blob = xyz.astype("<f4").tobytes() + rgba.tobytes()
    n = len(cloud)
    doc = {
        "asset": {"version": "2.0", "generator": "densemtl"},
        "extensionsUsed": ["KHR_materials_unlit"],
        "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "mode": 0, "material": 0}]}],
        "materials": [{"pbrMetallicRoughness": {"metallicFactor": 0.0}, "extensions": {"KHR_materials_unlit": {}}}],
        "buffers": [{"byteLength": len(blob)}],
        "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": 12 * n, "target": 34962},
                        {"buffer": 0, "byteOffset": 12 * n, "byteLength": 4 * n, "target": 34962}],
        "accessors": [{"bufferView": 0, "componentType": 5126, "count": n, "type": "VEC3",
                       "min": xyz.min(0).tolist(), "max": xyz.max(0).tolist()},
                      {"bufferView": 1, "componentType": 5121, "normalized": True, "count": n, "type": "VEC4"}],
    }  # fmt: skip
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned: JSON pads with spaces, binary with zeros
    blob += b"\0" * (-len(blob) % 4)
    chunks = struct.pack("<I4s", len(text), b"JSON") + text + struct.pack("<I4s", len(blob), b"BIN\0") + blob
    return atomic_write(Path(path), struct.pack("<4sII", b"glTF", 2, 12 + len(chunks)) + chunks)


def read_glb(path: str | Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """``(glTF JSON, xyz (N, 3) float32 in glTF axes, rgba (N, 4) uint8)`` of a :func:`write_glb` file."""
    import numpy as np

    data = Path(path).read_bytes()
    magic, version, total = struct.unpack_from("<4sII", data)
    if magic != b"glTF" or version != 2 or total != len(data):
        raise ValueError(f"{path} is not a complete binary glTF 2.0 file")
    n_json = struct.unpack_from("<I", data, 12)[0]
    doc = json.loads(data[20 : 20 + n_json])
    blob = data[28 + n_json :]
    n = doc["accessors"][0]["count"]
    xyz = np.frombuffer(blob, "<f4", 3 * n).reshape(n, 3)
    rgba = np.frombuffer(blob, np.uint8, 4 * n, offset=12 * n).reshape(n, 4)
    return doc, xyz, rgba


# --------------------------------------------------------------------------------------------------- app
def example_images(predictor: Predictor, n: int = N_EXAMPLES) -> list[Path]:
    """The first ``n`` images of the predictor's training dataset's ``val/images`` folder, when it exists here."""
    from densemtl.data.images import IMAGE_EXTS

    if predictor.config is None:
        return []
    folder = Path(predictor.config.data.root) / predictor.config.data.val_split / "images"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)[:n]


def _pixel_key(rgb: np.ndarray) -> str:
    import numpy as np

    return hashlib.sha1(repr(rgb.shape).encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


def _example_meta(examples: list[Path]) -> dict[str, dict]:
    """Meta JSON per example, keyed by its pixels: the app gets an example back as an array, not a path."""
    from densemtl.data.images import read_rgb
    from densemtl.scene3d.bev import sample_meta

    metas = {}
    for path in examples:
        meta = sample_meta(path)
        if meta:
            metas[_pixel_key(read_rgb(path))] = meta
    return metas


def legend_html(entries: list[tuple[str, tuple[int, int, int]]]) -> str:
    """The class legend as HTML: a colour swatch and the name per class."""
    import html

    items = "".join(
        f'<span style="display:inline-block;margin:2px 10px 2px 0"><span style="display:inline-block;width:14px;'
        f'height:14px;vertical-align:middle;background:rgb{c}"></span> {html.escape(name)}</span>'
        for name, c in entries
    )
    return f'<div id="legend-items">{items}</div>'


def _status(views: dict[str, Any], device: str) -> str:
    """One Markdown line: latency, camera and point count, then the 3-D message when there is one."""
    parts = [f"**{views['latency_ms']:.1f} ms** per image ({device})", f"camera: {views['camera']}"]
    k, pose = views["intrinsics"], views["pose"]
    if k is not None and pose is not None:
        parts.append(f"fx {k[0]:.0f} px, {pose.height:.2f} m above the ground, pitch {pose.pitch_deg:.1f} deg")
    if views["points"]:
        parts.append(f"{views['points']} points")
    return " · ".join(parts) + (f"\n\n{views['message']}" if views["message"] else "")


def _picture_grid(gr: Any, captions: list[str], per_row: int = 3) -> list[Any]:
    """One output image per caption, ``per_row`` to a row (``elem_id`` picture-0, picture-1, ...), PNG (lossless)."""
    images = []
    for row in range(0, len(captions), per_row):
        with gr.Row():
            for i, caption in enumerate(captions[row : row + per_row], start=row):
                images.append(gr.Image(label=caption, format="png", interactive=False, elem_id=f"picture-{i}"))
    return images


def build_app(predictor: Predictor, examples: list[str | Path] | None = None) -> gradio.Blocks:
    """The Gradio app: an image in (upload, webcam, clipboard, examples); pictures, BEV, 3-D view, latency out.

    ``examples`` are image paths (e.g. :func:`example_images`); an example with a folder-format meta JSON (the
    same pixels uploaded, too) uses its camera instead of the field-of-view slider and the fitted pose.
    """
    import numpy as np

    from densemtl.scene3d.bev import DEPTH_STD_KEY

    gr = _gradio()
    examples = [Path(p) for p in examples or []]
    metas = _example_meta(examples)
    out_dir = Path(tempfile.mkdtemp(prefix="densemtl_app_"))
    written: list[Path] = []
    blank = np.zeros((128, 256, 3), np.uint8)  # one small prediction tells which pictures the model makes
    probe = predictor.predict(blank)
    captions = [caption for caption, _ in task_pictures(predictor, blank, probe)]

    def run(rgb: np.ndarray | None, hfov: float, colour_by: str, max_rel_std: float) -> tuple:
        for old in written:  # Gradio copied it into its cache when the last call returned
            old.unlink(missing_ok=True)
        written.clear()
        if rgb is None:
            return *[None] * (len(captions) + 1), None, "Upload an image, use the webcam or pick an example."
        views = predict_views(predictor, rgb, hfov, meta=metas.get(_pixel_key(rgb)), out_dir=out_dir,
                              colour_by=colour_by, max_rel_std=max_rel_std)  # fmt: skip
        if views["cloud"] is not None:
            written.append(views["cloud"])
        shown = [picture for _, picture in views["pictures"]]
        cloud = None if views["cloud"] is None else str(views["cloud"])
        return *shown, views["bev"], cloud, _status(views, str(predictor.device))

    with gr.Blocks(title="densemtl", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## densemtl: {', '.join(predictor.tasks)} from one image")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(sources=["upload", "webcam", "clipboard"], type="numpy", label="image",
                                 elem_id="input-image")  # fmt: skip
                hfov = gr.Slider(10, 150, value=DEFAULT_HFOV, step=1, label="horizontal field of view (degrees)",
                                 info="for the BEV and 3-D view; an example's own camera wins")  # fmt: skip
                colours = gr.Radio(list(POINT_COLOURS), value="class", label="point colours")
                unsure = gr.Slider(0, 1, value=DEFAULT_MAX_REL_STD, step=0.01, label="depth std limit",
                                   info="drop points whose predicted depth std exceeds this fraction of their depth "
                                   "(0 keeps every point)", visible=DEPTH_STD_KEY in probe, elem_id="max-rel-std")
                button = gr.Button("Predict", variant="primary", elem_id="predict")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="examples (validation split)",
                                elem_id="examples")  # fmt: skip
                gr.HTML(legend_html(legend(predictor)), label="classes", elem_id="legend")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                pictures = _picture_grid(gr, captions)
                with gr.Row():
                    bev = gr.Image(label="bird's-eye view", format="png", interactive=False, scale=1, elem_id="bev")
                    cloud = gr.Model3D(label="semantic point cloud (drag to turn, scroll to zoom)", scale=2,
                                       camera_position=CLOUD_VIEW, elem_id="cloud")  # fmt: skip
        triggers = [image.change, button.click, hfov.release, colours.change, unsure.release]
        gr.on(triggers, run, inputs=[image, hfov, colours, unsure], outputs=[*pictures, bev, cloud, status])
    # The scratch folder for the 3-D view goes with the app (or at exit): one per build_app, never left in /tmp.
    weakref.finalize(demo, shutil.rmtree, out_dir, ignore_errors=True)
    return demo


def launch(
    checkpoint: str | Path | None = None,
    pretrained: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    device: str = "auto",
    block: bool = True,
) -> gradio.Blocks:
    """Load a checkpoint or a pretrained folder/Hub id, build the app with its examples and serve it.

    ``block=False`` returns once the server runs (tests, notebooks); ``demo.close()`` stops it.
    """
    from densemtl.inference import Predictor

    _gradio()  # fail before the model loads
    if (checkpoint is None) == (pretrained is None):
        raise ValueError("give one of --checkpoint best.pt or --pretrained DIR")
    if checkpoint is not None:
        predictor = Predictor.from_checkpoint(checkpoint, device)
    else:
        predictor = Predictor.from_pretrained(pretrained, device)  # type: ignore[arg-type]
    demo = build_app(predictor, example_images(predictor))
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, ssr_mode=False)
    return demo


def _cmd_app(args: argparse.Namespace) -> int:
    try:
        launch(args.checkpoint, args.pretrained, args.host, args.port, args.share, args.device)
    except AppUnavailableError as e:  # the optional extra is missing: one line, like other user errors
        print(f"densemtl: error: {e}", file=sys.stderr)
        return 2
    return 0


def add_app_parser(sub: argparse._SubParsersAction) -> None:
    """``densemtl app --checkpoint best.pt | --pretrained DIR [--port] [--host] [--share]``."""
    s = sub.add_parser("app", help="browser app (Gradio): upload an image, see every task, BEV and 3-D view")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="densemtl .pt checkpoint, e.g. runs/x/best.pt")
    src.add_argument("--pretrained", help="pretrained folder (save-pretrained) or Hub id org/name")
    s.add_argument("--port", type=int_range(1, 65535), default=7860, help="port to serve on (default 7860)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    s.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda or cuda:N")
    s.set_defaults(func=_cmd_app)
