"""Objects in ONNX: the graph decodes boxes itself (fixed top-k, padded, with a count) and matches PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from densemtl.config import ModelConfig  # noqa: E402
from densemtl.models import build_model  # noqa: E402
from densemtl.tasks.objects import OBJECTS, SCORE_THRESHOLD  # noqa: E402
from densemtl.tasks.objects_codec import TOP_K, decode  # noqa: E402

pytestmark = pytest.mark.export
SIZE = (96, 128)
INFO = {"classes": ["a", "b"], "palette": [[0, 0, 0], [255, 0, 0]], "object_classes": ["car", "person"]}


def tiny_objects_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        tasks=("semseg", "depth", OBJECTS.name), num_classes=2, object_classes=("car", "person"),
        backbone="mobilenet_v3_small", decoder_channels=16, pretrained="none",
    )  # fmt: skip
    model = build_model(cfg).eval()
    with torch.no_grad():  # varied scores and boxes: an untrained head is almost constant
        head = model.heads[OBJECTS.name]
        head.heat.weight.normal_(std=0.5)
        head.reg.weight.normal_(std=0.2)
    return model


def test_the_graph_outputs_decoded_boxes_that_match_pytorch(tmp_path) -> None:
    import onnxruntime as ort

    from densemtl.deploy.export import ExportWrapper, build_metadata, check_parity, export_model

    model = tiny_objects_model()
    path = tmp_path / "objects.onnx"
    export_model(model, path, SIZE, dynamic=True, metadata=build_metadata(ExportWrapper(model), SIZE, True, INFO))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert {"objects_boxes", "objects_scores", "objects_classes", "objects_distance", "objects_count"} <= set(names)
    x = torch.rand(2, 3, 112, 160)  # another size than the traced one: the axes are dynamic
    out = dict(zip(names, session.run(None, {"image": x.numpy()}), strict=True))
    with torch.no_grad():
        ref = decode(model(x)[OBJECTS.name], 2, threshold=SCORE_THRESHOLD)
    assert out["objects_boxes"].shape == (2, TOP_K, 4) and out["objects_scores"].shape == (2, TOP_K)
    assert np.array_equal(out["objects_count"], ref["count"].numpy())
    keep = ref["scores"].numpy() >= 0.05
    assert keep.sum() >= 5  # the comparison covers real detections
    # Each PyTorch detection against the graph's of the same class nearest to it (near-equal scores may rank
    # differently in the two top-k's).
    for i, j in zip(*np.nonzero(keep), strict=True):
        same = out["objects_classes"][i] == int(ref["classes"][i, j])
        err = np.where(same, np.abs(out["objects_boxes"][i] - ref["boxes"][i, j].numpy()).max(1), np.inf)
        m = int(err.argmin())
        assert err[m] <= 0.5
        assert abs(out["objects_scores"][i, m] - float(ref["scores"][i, j])) <= 1e-4
        assert abs(out["objects_distance"][i, m] / float(ref["distance"][i, j]) - 1) <= 1e-3
    report = check_parity(model, path, torch.rand(2, 3, *SIZE))
    assert report["passed"], report
    assert report["objects_box_max_err_px"] <= 0.5 and report["objects_score_max_err"] <= 1e-4
    with torch.no_grad():
        model.heads[OBJECTS.name].reg.bias[2:4] += 0.3  # boxes 35 % larger: the graph no longer matches
    report = check_parity(model, path, torch.rand(1, 3, *SIZE))
    assert not report["passed"] and report["objects_box_max_err_px"] > 0.5


def test_a_graph_exported_before_the_per_focal_length_distance_is_refused() -> None:
    """ONNX files without ``checkpoint_version`` in their metadata have version-4 heads: an objects graph among
    them would decode distances wrongly, so it is refused naming the file; a dense-only one still loads."""
    from densemtl.deploy.ort import OnnxModel
    from densemtl.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"old\.onnx.*'objects' head.*retrain"):
        OnnxModel(None, {"version": 2, "tasks": [OBJECTS.name]}, "old.onnx")
    with pytest.raises(AttributeError):  # past the check: it reaches the (missing) session
        OnnxModel(None, {"version": 2, "tasks": ["semseg"]}, "old.onnx")
