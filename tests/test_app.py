"""``densemtl app``: the views it computes (no browser), the glTF point cloud, the CLI verb, and the Gradio app
driven in a real headless Chromium (``browser`` marker; skipped without playwright or a Chromium binary)."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.app import (
    add_app_parser,
    example_images,
    legend,
    predict_views,
    read_glb,
    write_glb,
)
from densemtl.data.images import read_rgb
from densemtl.inference import Predictor, prediction_panel
from densemtl.scene3d.bev import SceneOptions, scene_of
from densemtl.scene3d.geometry import PointCloud, intrinsics_from_fov, voxel_downsample
from densemtl.viz.colors import colorize_labels


@pytest.fixture(scope="module")
def predictor(tiny_run) -> Predictor:
    return Predictor.from_checkpoint(tiny_run / "best.pt", device="cpu")


def _val_image(root: Path, index: int) -> Path:
    return sorted((root / "val" / "images").iterdir())[index]


CAMERA_HEIGHT = 1.5  # metres, of the stub's flat-ground scene


class _Stub:
    """A predictor with a fixed prediction: a flat road below the horizon seen by a level camera 1.5 m above
    it with a 60 degree field of view, sky above; or sky everywhere (no road), or no depth at all."""

    def __init__(self, tasks: tuple[str, ...], road: bool = True, rel_std: float | None = None) -> None:
        self.tasks, self.device, self.road, self.rel_std, self.config = tasks, "cpu", road, rel_std, None
        self.class_names = ["road", "sky"]
        self.palette = np.array([[128, 64, 128], [70, 130, 180]], np.uint8)
        self.info = {"classes": self.class_names, "palette": self.palette.tolist(), "depth_max": 80.0}

    def predict(self, rgb: np.ndarray, focal_px: float | None = None) -> dict[str, np.ndarray]:
        h, w = rgb.shape[:2]
        _, fy, _, cy = intrinsics_from_fov((h, w), 60.0)
        rows = np.arange(h, dtype=np.float32)[:, None].repeat(w, axis=1)  # (H, W) pixel row v
        ground = (rows > cy + 0.5) & self.road
        pred = {"semseg": np.where(ground, 0, 1).astype(np.uint8), "confidence": np.ones((h, w), np.float32)}
        if "depth" in self.tasks:  # a ray through row v meets the ground at depth height * fy / (v - cy)
            pred["depth"] = np.where(ground, CAMERA_HEIGHT * fy / np.maximum(rows - cy, 1e-3), 0).astype(np.float32)
            if self.rel_std is not None:
                pred["depth_std"] = self.rel_std * pred["depth"]
        return pred


# ---------------------------------------------------------------------------------------------- no browser
def test_predict_views_match_the_predictor_and_the_scene_it_implies(predictor, synthetic_root, tmp_path):
    from densemtl.scene3d.bev import sample_meta

    path = _val_image(synthetic_root, 0)
    rgb, meta = read_rgb(path), sample_meta(path)
    assert {"intrinsics", "camera_height"} <= meta.keys()
    views = predict_views(predictor, rgb, 60.0, meta=meta, out_dir=tmp_path, max_rel_std=0.0)  # keep every point
    pred = predictor.predict(rgb)
    assert views["pred"].keys() == pred.keys()
    for key in pred:
        np.testing.assert_array_equal(views["pred"][key], pred[key])
    # the task pictures are the ones `densemtl predict` puts in its panel, in the same order
    panel = prediction_panel(rgb, pred, predictor.info, predictor.tasks)
    np.testing.assert_array_equal(np.concatenate([rgb, *(p for _, p in views["pictures"])], axis=1), panel)
    assert [c for c, _ in views["pictures"]][: len(predictor.tasks)] == list(predictor.tasks)
    assert all(p.shape == rgb.shape and p.dtype == np.uint8 and p.std() > 0 for _, p in views["pictures"])
    assert views["latency_ms"] > 0
    assert [name for name, _ in views["legend"]] == predictor.class_names
    assert [list(c) for _, c in views["legend"]] == predictor.palette.tolist()
    # the example's camera (meta JSON) wins over the field of view, as for `predict --bev`
    assert views["message"] == "" and views["camera"] == "the example's intrinsics, the example's pose"
    assert views["intrinsics"] == tuple(meta["intrinsics"]) and views["pose"].height == meta["camera_height"]
    opts = SceneOptions(max_rel_std=0.0)
    expected = voxel_downsample(scene_of(rgb, pred, predictor.info, opts, meta).cloud, opts.voxel)
    assert views["bev"].shape == (*opts.grid.shape, 3) and views["bev"].std() > 0
    doc, xyz, rgba = read_glb(views["cloud"])
    assert views["cloud"].parent == tmp_path and views["points"] == len(expected) == len(xyz) > 100
    np.testing.assert_allclose(xyz, expected.xyz * np.float32([-1, 1, 1]))  # glTF: -x is right
    np.testing.assert_array_equal(rgba[:, :3], colorize_labels(expected.label[None], predictor.palette)[0])
    by_image = predict_views(predictor, rgb, meta=meta, out_dir=tmp_path, colour_by="image", max_rel_std=0.0)
    by_image = read_glb(by_image["cloud"])
    np.testing.assert_array_equal(by_image[2][:, :3], expected.rgb)


def test_without_a_camera_the_field_of_view_and_the_predicted_ground_give_it(tmp_path):
    rgb = np.zeros((48, 64, 3), np.uint8)
    views = predict_views(_Stub(("semseg", "depth")), rgb, 60.0, out_dir=tmp_path)
    assert views["message"] == "" and "60 degree" in views["camera"] and "fitted" in views["camera"]
    assert views["intrinsics"] == pytest.approx(intrinsics_from_fov((48, 64), 60.0))
    assert views["pose"].height == pytest.approx(CAMERA_HEIGHT, abs=1e-3)
    assert views["pose"].pitch_deg == pytest.approx(0.0, abs=0.01) and abs(views["pose"].roll_deg) < 0.01
    _, xyz, rgba = read_glb(views["cloud"])
    assert len(xyz) > 100 and np.abs(xyz[:, 1]).max() < 1e-3  # every point on the ground: height 0
    assert (rgba[:, :3] == [128, 64, 128]).all()  # road-coloured
    assert views["bev"] is not None and [c for c, _ in views["pictures"]] == ["semseg", "depth"]


def test_no_road_or_no_depth_is_a_message_not_a_failure(tmp_path):
    rgb = np.zeros((48, 64, 3), np.uint8)
    views = predict_views(_Stub(("semseg", "depth"), road=False), rgb, out_dir=tmp_path)
    assert views["bev"] is None and views["cloud"] is None and "road or floor" in views["message"]
    assert [c for c, _ in views["pictures"]] == ["semseg", "depth"]
    views = predict_views(_Stub(("semseg",)), rgb, out_dir=tmp_path)
    assert views["cloud"] is None and "predicts no depth" in views["message"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="colour_by"):
        predict_views(_Stub(("semseg",)), rgb, colour_by="depth")


def test_too_uncertain_depth_says_which_limit_dropped_the_points(tmp_path):
    rgb = np.zeros((48, 64, 3), np.uint8)
    unsure = _Stub(("semseg", "depth"), rel_std=0.3)  # every depth std is 30 % of its depth
    views = predict_views(unsure, rgb, max_rel_std=0.15, out_dir=tmp_path)
    assert views["cloud"] is None and "exceeds 15% of their depth" in views["message"]
    views = predict_views(unsure, rgb, max_rel_std=0.31, out_dir=tmp_path)
    assert views["message"] == "" and views["points"] > 100
    assert predict_views(unsure, rgb, max_rel_std=0.0, out_dir=tmp_path)["points"] == views["points"]


def test_glb_holds_the_points_in_gltf_axes_with_their_colours(tmp_path):
    cloud = PointCloud(
        xyz=np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 6.0], [0.0, 0.0, 1.0]], np.float32),
        rgb=np.array([[255, 0, 0], [0, 255, 0], [1, 2, 3]], np.uint8),
        label=np.zeros(3, np.uint8),
        frame="ground",
    )
    path = write_glb(tmp_path / "c.glb", cloud)
    data = path.read_bytes()
    assert data[:4] == b"glTF" and len(data) % 4 == 0
    doc, xyz, rgba = read_glb(path)
    np.testing.assert_array_equal(xyz, [[-1, 2, 3], [4, 0.5, 6], [0, 0, 1]])
    np.testing.assert_array_equal(rgba, [[255, 0, 0, 255], [0, 255, 0, 255], [1, 2, 3, 255]])
    primitive = doc["meshes"][0]["primitives"][0]
    assert primitive["mode"] == 0 and set(primitive["attributes"]) == {"POSITION", "COLOR_0"}
    assert doc["accessors"][0]["min"] == [-1, 0, 1] and doc["accessors"][0]["max"] == [4, 2, 6]
    with pytest.raises(ValueError, match="at least one point"):
        write_glb(tmp_path / "empty.glb", cloud.select(np.zeros(3, bool)))


def test_examples_are_the_first_validation_images(predictor, synthetic_root):
    assert example_images(predictor) == [_val_image(synthetic_root, i) for i in range(4)]
    assert example_images(_Stub(("semseg",))) == []  # no training config: no dataset to take them from


def test_legend_uses_the_picture_colours():
    stub = _Stub(("semseg",))
    stub.class_names = ["road", "sky", "car"]  # the palette has no colour for car: black, as in the pictures
    assert legend(stub) == [("road", (128, 64, 128)), ("sky", (70, 130, 180)), ("car", (0, 0, 0))]


def test_cli_verb_parses_and_refuses_bad_flags(capsys):
    p = argparse.ArgumentParser(prog="densemtl")
    add_app_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["app", "--checkpoint", "best.pt", "--port", "7000", "--share"])
    assert (args.checkpoint, args.pretrained, args.port, args.host, args.share) == (
        Path("best.pt"), None, 7000, "127.0.0.1", True,
    )  # fmt: skip
    assert p.parse_args(["app", "--pretrained", "org/name"]).pretrained == "org/name"
    for bad in (["app"], ["app", "--checkpoint", "a.pt", "--pretrained", "d"], ["app", "--pretrained", "d",
                "--port", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_without_gradio_the_error_says_what_to_install(monkeypatch, tmp_path, capsys):
    from densemtl.app import AppUnavailableError, build_app, launch

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now raises ImportError
    with pytest.raises(AppUnavailableError, match=r"pip install 'densemtl\[app\]'"):
        build_app(_Stub(("semseg",)))
    with pytest.raises(AppUnavailableError, match="densemtl"):  # before the (missing) checkpoint is read
        launch(checkpoint=tmp_path / "missing.pt")
    p = argparse.ArgumentParser()
    add_app_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["app", "--checkpoint", str(tmp_path / "missing.pt")])
    assert args.func(args) == 2
    assert "pip install 'densemtl[app]'" in capsys.readouterr().err


def test_launch_serves_the_app_of_a_checkpoint(tiny_run):
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'densemtl[app]'")
    from densemtl.app import launch

    with pytest.raises(ValueError, match="one of --checkpoint"):
        launch(checkpoint=tiny_run / "best.pt", pretrained="somewhere")
    port = _free_port()
    demo = launch(checkpoint=tiny_run / "best.pt", port=port, device="cpu", block=False)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30) as r:
            config = json.loads(r.read())
    finally:
        demo.close()
    assert config["title"] == "densemtl"
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"input-image", "picture-0", "bev", "cloud", "status", "legend", "examples"} <= ids


def test_the_apps_scratch_folder_goes_with_the_app(tmp_path):
    """The folder the 3-D view's glTF files are written to exists while the app does and is removed when its
    process ends, not left in the temporary directory."""
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'densemtl[app]'")
    import subprocess

    code = (
        "import json, sys, pathlib\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_app import _Stub\n"
        "from densemtl.app import build_app\n"
        "demo = build_app(_Stub(('semseg', 'depth')))\n"
        f"print(json.dumps([str(p) for p in pathlib.Path({str(tmp_path)!r}).glob('densemtl_app_*') if p.is_dir()]))\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = json.loads(done.stdout.strip().splitlines()[-1])  # the folders the app's process saw
    assert len(made) == 1, done.stdout
    assert not Path(made[0]).exists()


# ------------------------------------------------------------------------------------------------ browser
def _chromium() -> str | None:
    for name in (os.environ.get("DENSEMTL_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name) or (Path(name).is_file() and name)):
            return str(found)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png_at(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))


def _assert_same_picture(shown: np.ndarray, expected: np.ndarray) -> None:
    """Equal but for rare one-level rounding (the server thread and the test may round a float differently)."""
    assert shown.shape == expected.shape
    off = np.abs(shown.astype(int) - expected.astype(int)).max(axis=-1) > 1
    assert off.mean() < 1e-3, f"{off.sum()} pixels differ"


@pytest.mark.browser
@pytest.mark.filterwarnings("ignore::Warning:gradio")  # pandas deprecations inside Gradio's queue
def test_the_app_in_a_headless_browser(predictor, synthetic_root, tmp_path):
    """Upload an image, then click an example; each time the pictures, BEV and point cloud the page shows are
    those of ``predict_views`` for that image, and the 3-D view is drawn."""
    pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'densemtl[app]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set DENSEMTL_CHROMIUM)")
    from densemtl.app import build_app
    from densemtl.scene3d.bev import sample_meta

    upload, example = _val_image(synthetic_root, 5), _val_image(synthetic_root, 0)  # 5 is not an example
    port = _free_port()
    demo = build_app(predictor, example_images(predictor))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--enable-unsafe-swiftshader"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
            page.set_input_files("#input-image input[type=file]", str(upload))
            expected = predict_views(predictor, read_rgb(upload), 60.0, out_dir=tmp_path)
            _check_page(page, expected, "60 degree", tmp_path)
            assert all(name in page.inner_text("#legend") for name in predictor.class_names)

            # the tiny model's depth std is large: keep every point (0), then pick an example (its own camera)
            page.fill("#max-rel-std input[type=number]", "0")
            page.press("#max-rel-std input[type=number]", "Enter")
            page.click("#examples .gallery-item >> nth=0")
            meta = sample_meta(example)
            expected = predict_views(predictor, read_rgb(example), meta=meta, out_dir=tmp_path, max_rel_std=0.0)
            assert expected["cloud"] is not None
            _check_page(page, expected, "the example's intrinsics", tmp_path)
            _wait_for_drawn_canvas(page)
            page.screenshot(path=str(tmp_path / "app.png"))
            browser.close()
    finally:
        demo.close()
    assert Image.open(tmp_path / "app.png").size == (1280, 800)


def _check_page(page, expected: dict, camera: str, tmp_path: Path) -> None:
    """Wait for the outputs of one prediction and compare them with ``expected`` (``predict_views``)."""
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({camera!r})", timeout=60_000)
    status = page.inner_text("#status")
    assert float(re.search(r"([\d.]+) ms", status).group(1)) > 0
    for i, (_, picture) in enumerate(expected["pictures"]):
        _assert_same_picture(_png_at(page.get_attribute(f"#picture-{i} img", "src")), picture)
    if expected["bev"] is None:
        assert expected["message"] in status and page.query_selector("#bev img") is None
        return
    _assert_same_picture(_png_at(page.wait_for_selector("#bev img").get_attribute("src")), expected["bev"])
    link = page.wait_for_selector(f"#cloud a[download='{expected['cloud'].name}']", timeout=30_000)
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as r:
        (tmp_path / "shown.glb").write_bytes(r.read())
    np.testing.assert_allclose(read_glb(tmp_path / "shown.glb")[1], read_glb(expected["cloud"])[1], atol=1e-4)


def _wait_for_drawn_canvas(page, timeout_s: float = 30.0) -> None:
    """Wait until the 3-D view's WebGL canvas shows points: pixels off its background colour, below the label
    and buttons drawn over its top (the canvas cannot be read back: WebGL keeps no drawing buffer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        shot = np.asarray(Image.open(io.BytesIO(page.locator("#cloud canvas").screenshot())).convert("RGB"))
        body = shot[48:].reshape(-1, 3).astype(int)  # (N, 3) below the overlays
        colours, counts = np.unique(body, axis=0, return_counts=True)
        drawn = (np.abs(body - colours[counts.argmax()]).max(axis=1) > 40).sum()
        if drawn > 200:
            return
        assert time.monotonic() < deadline, f"the point cloud was not drawn ({drawn} pixels; no WebGL here?)"
        time.sleep(0.5)
