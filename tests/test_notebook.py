"""examples/quickstart.ipynb runs top to bottom at a tiny size and produces real results.

The notebook's ``parameters`` cell is replaced by tiny values (``OUT`` in ``tmp_path``), and nbclient executes
the notebook in the checkout on a kernel of this interpreter. The assertions read what the notebook wrote
under ``OUT`` (checkpoint, evaluation, ONNX parity report, pictures) and the pictures it displayed.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
SIZE = (64, 128)  # (H, W) of the rendered images, and so of the prediction panel's pictures

# The notebook's own parameter names (all of them but OUT) at a size that trains in seconds.
TINY = {
    "N_TRAIN": 64,
    "N_VAL": 8,
    "SIZE": SIZE,
    "EPOCHS": 6,
    "BATCH_SIZE": 8,
    "BACKBONE": "mobilenet_v3_small",
    "WORKERS": 0,
    "DEVICE": "cpu",
}
HEADLINES = ("semseg/miou", "depth/delta1", "normals/within_11_25")  # higher is better, all in [0, 1]
# Learning is judged on the headlines where a model that learned nothing ties its baseline: 8 steps gave mIoU
# 0.043 vs 0.043 and delta1 0.171 vs 0.175, but 11.25 deg 0.09 vs 0.00 (the mean-normal baseline is almost never
# within 11.25 deg). These 48 steps measured mIoU 0.18 vs 0.04, delta1 0.33 vs 0.17.
LEARNED = ("semseg/miou", "depth/delta1")
MARGIN = 0.05
PANEL_PICTURES = 5  # RGB | segmentation | depth | depth std | normals
BEV_CELLS = (200, 200)  # the default grid: 40 m x 40 m in 0.2 m cells


def _parameters_cell(nb) -> int:
    """Index of the one cell tagged ``parameters``."""
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"{NOTEBOOK} must have exactly one cell tagged 'parameters', found {len(found)}"
    return found[0]


def _execute_tiny(out: Path):
    """The notebook with the tiny parameters and ``OUT=out``, executed in the checkout, plus a last cell that
    prints the kernel's interpreter."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    values = {**TINY, "OUT": str(out)}
    nb.cells[_parameters_cell(nb)].source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    return nb


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def test_parameters_cell_holds_exactly_what_the_test_overrides():
    """A renamed or added parameter would keep its big default in the tiny run; fail here instead."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    body = ast.parse(nb.cells[_parameters_cell(nb)].source).body
    names = {t.id for node in body if isinstance(node, ast.Assign) for t in node.targets}
    assert names == {*TINY, "OUT"}, f"the parameters cell assigns {sorted(names)}; update TINY in this test"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit it without outputs"


@pytest.mark.slow
@pytest.mark.export
def test_quickstart_notebook_runs_and_learns(tmp_path):
    out = tmp_path / "quickstart"
    nb = _execute_tiny(out)

    # The kernel is this interpreter (the venv), not another Python that happens to own a "python3" kernel spec.
    assert Path(_stdout(nb.cells[-1]).strip()).resolve() == Path(sys.executable).resolve()
    # Each cell that shows a picture displays one (a figure left to plt.show() under the Agg backend would not).
    showing = [c for c in nb.cells if c.cell_type == "code" and "def show" not in c.source
               and ("show(" in c.source or "Image(filename" in c.source)]  # fmt: skip
    assert len(showing) == 5  # preview, training curve, panel, BEV + cloud, ONNX panel
    for cell in showing:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source

    assert (out / "run" / "best.pt").stat().st_size > 0
    metrics = json.loads((out / "run" / "eval_val" / "metrics.json").read_text())
    model, baseline = metrics["summary"], metrics["baseline_summary"]
    for key in HEADLINES:
        assert 0.0 <= model[key] <= 1.0 and 0.0 <= baseline[key] <= 1.0, key
    beaten = [k for k in LEARNED if model[k] > baseline[k] + MARGIN]
    assert beaten, f"the notebook's model beats no trivial baseline: model {model}, baseline {baseline}"

    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["passed"] is True and report["parity"]["images"] >= 1
    assert (out / "model.onnx").stat().st_size > 0

    h, w = SIZE
    assert Image.open(out / "panel.png").size == (PANEL_PICTURES * w, h)
    assert Image.open(out / "panel_onnx.png").size == (PANEL_PICTURES * w, h)
    bev = np.asarray(Image.open(out / "bev.png"))
    assert bev.shape == (*BEV_CELLS, 3)
    assert len(np.unique(bev.reshape(-1, 3), axis=0)) > 2  # more than "unknown" and the camera dot: points
    assert (out / "scene.ply").read_bytes().startswith(b"ply\n")
