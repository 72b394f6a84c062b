"""ONNX export, ONNX Runtime engine, INT8 quantisation and the benchmark's JSON, on a tiny model (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from densemtl.config import ModelConfig  # noqa: E402
from densemtl.models import build_model  # noqa: E402

pytestmark = pytest.mark.export

SIZE = (64, 96)
INFO = {"classes": ["a", "b", "c", "d"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]}


DEFAULT_TASKS = ModelConfig().tasks  # the default model's tasks (semseg + depth)


def tiny_model(tasks: tuple[str, ...] = DEFAULT_TASKS) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        tasks=tasks, num_classes=4, backbone="mobilenet_v3_small", decoder_channels=16, pretrained="none"
    )
    model = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial depth: the head starts almost constant
        model.heads["depth"].out.weight.normal_(std=0.5)
    return model


def export_tiny(path, dynamic=False, tasks=DEFAULT_TASKS):
    from densemtl.deploy.export import ExportWrapper, build_metadata, export_model

    model = tiny_model(tasks)
    meta = build_metadata(ExportWrapper(model, True), SIZE, dynamic, INFO, input_scale=0.5)
    export_model(model, path, SIZE, dynamic=dynamic, metadata=meta)
    return model


def test_export_parity_metadata_and_outputs(tmp_path):
    import onnxruntime as ort

    from densemtl.deploy.export import check_parity, parity_images, read_metadata

    path = tmp_path / "m.onnx"
    model = export_tiny(path)
    meta = read_metadata(path)
    assert meta["classes"] == INFO["classes"] and meta["palette"] == INFO["palette"]
    assert meta["depth_units"] == "metres" and meta["input_scale"] == 0.5 and meta["version"] == 2
    assert meta["input"]["normalization"] == "in-model" and meta["input"]["size"] == list(SIZE)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    names = ["semseg_logits", "semseg", "semseg_confidence", "depth", "depth_std"]
    assert [o.name for o in session.get_outputs()] == names and meta["outputs"] == names
    raw = torch.rand(1, 3, *SIZE)  # RGB in [0, 1], as the PyTorch model takes it
    logits, ids, conf, depth, depth_std = session.run(None, {"image": raw.numpy()})
    with torch.no_grad():
        ref = model(raw)
    assert np.array_equal(ids, logits.argmax(1)) and ids.shape == (1, *SIZE)
    want_conf = ref["semseg"].softmax(1).amax(1).numpy()  # the calibrated softmax maximum
    assert conf.shape == (1, *SIZE) and np.abs(conf - want_conf).max() < 1e-4
    assert np.abs(depth - ref["depth"][:, :1].numpy()).max() < 1e-3
    want_std = (ref["depth"][:, :1] * ref["depth"][:, 1:]).numpy()  # metres: depth x std of ln depth
    assert depth_std.shape == depth.shape and np.abs(depth_std - want_std).max() < 1e-3
    assert depth.std() > 0.01  # the comparison is not between two constants
    report = check_parity(model, path, parity_images(None, SIZE, n=2)[0])
    assert report["passed"] and report["depth_max_abs_err_m"] < 1e-3 and report["class_agreement"] >= 0.999
    assert report["depth_std_max_abs_err_m"] < 1e-3 and report["confidence_max_abs_err"] < 1e-3


def test_parity_check_catches_a_different_model(tmp_path):
    from densemtl.deploy.export import check_parity, parity_images

    path = tmp_path / "m.onnx"
    model = export_tiny(path)
    with torch.no_grad():
        model.heads["depth"].out.bias.add_(0.5)  # the graph no longer matches the model
    report = check_parity(model, path, parity_images(None, SIZE, n=1)[0])
    assert not report["passed"] and report["depth_max_abs_err_m"] > 1e-3


def test_three_task_export_parity_covers_normals(tmp_path):
    from densemtl.deploy.export import check_parity, parity_images, read_metadata
    from densemtl.deploy.ort import OnnxModel

    path = tmp_path / "m3.onnx"
    tasks = ("semseg", "depth", "normals")
    model = export_tiny(path, dynamic=True, tasks=tasks)
    meta = read_metadata(path)
    outputs = ["semseg_logits", "semseg", "semseg_confidence", "depth", "depth_std", "normals"]
    assert meta["tasks"] == list(tasks) and meta["outputs"] == outputs
    got = OnnxModel.from_file(path, threads=1)(torch.rand(1, 3, 40, 56))
    assert got["normals"].shape == (1, 3, 40, 56)
    assert torch.allclose(got["normals"].norm(dim=1), torch.ones(1, 40, 56), atol=1e-4)  # unit vectors
    report = check_parity(model, path, parity_images(None, SIZE, n=2)[0])
    assert report["passed"] and report["normals_within_0_5_deg"] >= 0.999
    with torch.no_grad():
        model.heads["normals"].out.bias.add_(torch.tensor([0.5, 0.0, 0.0]))  # normals tilt: parity must fail
    report = check_parity(model, path, parity_images(None, SIZE, n=1)[0])
    assert not report["passed"] and report["normals_within_0_5_deg"] < 0.999


def test_graphs_from_before_in_model_normalisation_are_refused(tmp_path):
    import onnx

    from densemtl.deploy.metadata import METADATA_KEY
    from densemtl.deploy.ort import OnnxModel

    path = tmp_path / "old.onnx"
    export_tiny(path)
    proto = onnx.load(str(path))
    entry = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    entry.value = json.dumps({**json.loads(entry.value), "version": 1})
    onnx.save(proto, str(path))
    with pytest.raises(ValueError, match="re-export"):
        OnnxModel.from_file(path, threads=1)


def test_dynamic_axes_batch_and_size(tmp_path):
    from densemtl.deploy.ort import OnnxModel

    path = tmp_path / "dyn.onnx"
    model = export_tiny(path, dynamic=True)
    engine = OnnxModel.from_file(path, threads=1)
    assert engine.fixed_size is None
    x = torch.rand(2, 3, 48, 80)  # another batch and size than traced
    with torch.no_grad():
        ref = model(x)
    got = engine(x)
    assert got["semseg"].shape == (2, 4, 48, 80) and got["depth"].shape == (2, 2, 48, 80)  # metres, std
    assert (got["depth"] - ref["depth"]).abs().max() < 1e-3
    assert (got["semseg"].argmax(1) == ref["semseg"].argmax(1)).float().mean() >= 0.999


def test_fixed_size_engine_resizes_and_predictor_matches_torch(tmp_path):
    from densemtl.inference import Predictor

    path = tmp_path / "m.onnx"
    model = export_tiny(path)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    ort_pred = Predictor.from_onnx(path, threads=1).predict(rgb)  # runs at the graph's fixed size
    torch_pred = Predictor(model, INFO, "cpu", size=SIZE).predict(rgb)
    assert ort_pred["semseg"].shape == ort_pred["depth"].shape == (40, 70)
    assert np.abs(ort_pred["depth"] - torch_pred["depth"]).max() < 1e-3
    assert (ort_pred["semseg"] == torch_pred["semseg"]).mean() >= 0.999


def test_benchmark_json_schema_and_int8(tmp_path):
    import onnx

    from densemtl.deploy.benchmark import format_table, run_benchmark

    result = run_benchmark(
        tiny_model(),
        size=SIZE,
        backends=("torch", "onnxruntime", "int8"),
        threads=1,
        runs=2,
        warmup=1,
        memory=False,
    )
    result = json.loads(json.dumps(result))  # JSON-serialisable
    names = ["densemtl torch", "densemtl onnxruntime", "densemtl int8"]
    ref = ["lraspp_mobilenet_v3_large torch", "lraspp_mobilenet_v3_large onnxruntime"]
    assert list(result["engines"]) == names + ref
    assert result["reference"] == ref[1] and result["ratio_to_reference"][ref[1]] == pytest.approx(1.0)
    for s in result["engines"].values():
        assert s["peak_memory_mb"] is None  # memory=False; measured in test_peak_memory_of_an_onnx_engine
        for key in ("median_ms", "p90_ms", "fps", "cpu_median_ms", "params_m", "gflops", "file_mb"):
            assert isinstance(s[key], float) and s[key] >= 0, key
        assert s["p90_ms"] >= s["median_ms"] >= s["min_ms"] > 0
        assert s["fps"] == pytest.approx(1000 / s["median_ms"])
    ours, lraspp = result["engines"][names[0]], result["engines"][ref[0]]
    assert ours["params_m"] == pytest.approx(sum(p.numel() for p in tiny_model().parameters()) / 1e6)
    assert lraspp["params_m"] > ours["params_m"]
    assert (
        result["engines"]["densemtl int8"]["file_mb"] < result["engines"]["densemtl onnxruntime"]["file_mb"]
    )
    assert result["size"] == list(SIZE) and result["runs"] == 2
    assert "| densemtl | int8 |" in format_table(result)
    del onnx  # imported to fail early without it


def test_quantize_keeps_metadata_and_uses_int8(tmp_path):
    import onnx

    from densemtl.deploy.export import read_metadata
    from densemtl.deploy.quantize import quantize_onnx

    path = tmp_path / "m.onnx"
    export_tiny(path)
    out = quantize_onnx(path, tmp_path / "m_int8.onnx", calib_root=None, n=2)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = read_metadata(out)
    assert meta["classes"] == INFO["classes"] and meta["quantization"]["calibration"] == "random"


def test_peak_memory_of_an_onnx_engine(tmp_path):
    from densemtl.deploy.benchmark import peak_memory_mb

    path = tmp_path / "m.onnx"
    export_tiny(path, dynamic=True)
    small, large = (peak_memory_mb("onnxruntime", path, size, 1) for size in ((32, 32), (512, 768)))
    assert 0 < small < large  # more pixels need more activation memory
    assert large - small > 3 * 512 * 768 * 4 / 2**20  # at least a few full-resolution float maps
