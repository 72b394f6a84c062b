"""Objects: 2-D boxes with class, score, metric distance and a 3-D box, from a CenterNet head on the shared decoder.

Files: ``<split>/objects/<id>.json`` (``densemtl.data.objects``: boxes in pixels, 3-D boxes in the OpenCV camera
frame in metres) with the class names in dataset.json ``object_classes``; the instance masks beside them are not
needed to train. In a sample the objects travel the torchvision way, ``{"boxes": tv_tensors.BoundingBoxes,
"rows": (N, FIELDS)}``, so ``transforms.v2.functional`` scales, crops and flips the boxes with the image; a box
cropped below ``MIN_BOX_PX`` or to less than ``MIN_KEPT`` of its area is dropped, and the 3-D box mirrors with a
flip (a zoom or crop changes only the intrinsics: the 3-D box is metric). :meth:`Objects.pack` then makes the
padded (MAX_OBJECTS, FIELDS) tensor that collates (see :mod:`densemtl.tasks.objects_codec`).

The distance is the depth (Z, metres) of the object's 3-D centre, regressed by the head at the box centre;
benchmarks/objects.py compares it with reading the predicted depth map inside the box (docs/objects.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from densemtl.data.format import DatasetFormatError
from densemtl.data.objects import OBJECT_CLASSES_KEY, OBJECTS_DIR, read_objects
from densemtl.tasks.base import Accumulator, Info, Task
from densemtl.tasks.objects_codec import (
    ASSUMED_HFOV_DEG,
    COL,
    EXTRA_CHANNELS,
    FIELDS,
    MAX_OBJECTS,
    STRIDE,
    cell_boxes,
    decode,
    default_focal,
    grid_size,
    is_peak,
    wrap_angle,
)
from densemtl.tasks.objects_head import ObjectsHead, ObjectsLoss
from densemtl.tasks.objects_metrics import ObjectsMetrics
from densemtl.viz.boxes import draw_boxes

MIN_BOX_PX = 2.0  # a box narrower or lower than this after a crop or zoom is dropped
MIN_KEPT = 0.25  # ... and one that keeps less than this share of its area after a crop
SCORE_THRESHOLD = 0.3  # the operating point: predictions, pictures, distance metrics
SUPPRESSED_LOGIT = -30.0  # cells that are no peak (a score of 1e-13): decoding never returns them anyway
PARITY_BOX_PX = 0.5
PARITY_SCORE = 1e-4
DECODED = ("boxes", "scores", "classes", "distance", "size3d", "yaw")


def object_classes(info: Info) -> list[str]:
    """The dataset's (or a checkpoint's copy of its) ``object_classes``; [] without."""
    return list(info.get(OBJECT_CLASSES_KEY, []))


def rows_from_objects(objects: list[dict[str, Any]], classes: list[str]) -> np.ndarray:
    """Validated objects (``densemtl.data.objects``) as target rows (N, FIELDS) float32."""
    rows = np.zeros((len(objects), len(FIELDS)), dtype=np.float32)
    for i, o in enumerate(objects):
        r = rows[i]
        r[COL["class"]] = classes.index(o["class"])
        r[COL["x0"] : COL["y1"] + 1] = o["box"]
        b3 = o["box3d"]
        if b3 is not None:
            r[COL["cx3"] : COL["cz3"] + 1] = b3["center"]
            r[COL["distance"]] = b3["center"][2]
            r[COL["l"] : COL["h"] + 1] = b3["size"]
            r[COL["yaw"]], r[COL["has3d"]] = b3["yaw"], 1.0
        r[COL["visible"]] = 1.0 if o["visible_fraction"] is None else o["visible_fraction"]
        r[COL["truncated"]] = 0.0 if o["truncated"] is None else o["truncated"]
    return rows


class Objects(Task):
    """Objects as points: centre heatmaps per class, box size and offset, distance, 3-D size and yaw."""

    name = "objects"
    folder = OBJECTS_DIR
    suffix = ".json"
    has_baseline = False
    uses_focal = True
    min_checkpoint_version = 5  # before, the distance channel was ln(metres), not per focal length
    headline = "ap50"
    console = ("ap50", "distance_delta1")
    lower_is_better = frozenset({"distance_relerr", "distance_relerr_baseline"})
    hub_pipeline_tag = "object-detection"
    outputs = (*(f"objects_{k}" for k in DECODED), "objects_focal_px")

    def available(self, info: Info) -> bool:
        return bool(object_classes(info))

    def resolve_model_config(self, cfg, info: Info):
        from dataclasses import replace

        classes = tuple(object_classes(info))
        if cfg.object_classes and tuple(cfg.object_classes) != classes:
            raise ValueError(
                f"model.object_classes={list(cfg.object_classes)} but the dataset's object_classes are "
                f"{list(classes)}; leave model.object_classes empty to take them from the dataset"
            )
        return replace(cfg, object_classes=classes)

    # ------------------------------------------------------------------------------------------------ data
    def load(self, path: Path, size: tuple[int, int], info: Info) -> np.ndarray:
        classes = object_classes(info)
        if not classes:
            raise DatasetFormatError(
                f"{path}: the dataset's dataset.json lists no {OBJECT_CLASSES_KEY!r}, so the objects' class names "
                f'mean nothing; add e.g. "{OBJECT_CLASSES_KEY}": ["car", "person"] to it'
            )
        return rows_from_objects(read_objects(path, size, classes, warn=[]), classes)

    def quick_check(self, path: Path, size: tuple[int, int], info: Info) -> list[str]:
        try:  # a small JSON file: reading it in full is as cheap as an image's decode check
            self.load(path, size, info)
        except DatasetFormatError as e:
            return [str(e)]
        return []

    def to_sample(self, array: np.ndarray | None, size: tuple[int, int]) -> dict[str, Tensor]:
        rows = torch.zeros(0, len(FIELDS)) if array is None else torch.from_numpy(np.array(array, np.float32))
        rows[:, COL["focal"]] = default_focal(size[1])  # pack() puts the sample's fx there when it has one
        boxes = tv_tensors.BoundingBoxes(
            rows[:, COL["x0"] : COL["y1"] + 1], format="XYXY", canvas_size=tuple(size), clamping_mode="hard"
        )
        return {"boxes": boxes, "rows": rows}

    def to_tensor(self, array: np.ndarray | None, size: tuple[int, int]) -> Tensor:
        return self.pack(self.to_sample(array, size), {})

    def encode(self, array: Any) -> dict[str, Any]:
        raise ValueError("objects are written as objects/<id>.json with densemtl.data.objects.write_objects")

    def resize_target(self, target: dict[str, Tensor], size: tuple[int, int]) -> dict[str, Tensor]:
        rows = target["rows"].clone()  # a zoom about the camera: the assumed focal length scales with the width
        rows[:, COL["focal"]] *= size[1] / target["boxes"].canvas_size[1]
        target = {"boxes": target["boxes"], "rows": rows}
        return self._sanitize(target, TF.resize(target["boxes"], list(size)), cropped=False)

    def crop_target(self, target: dict[str, Tensor], top: int, left: int, height: int, width: int) -> Any:
        return self._sanitize(target, TF.crop(target["boxes"], top, left, height, width), cropped=True)

    def flip_target(self, target: dict[str, Tensor]) -> dict[str, Tensor]:
        rows = target["rows"].clone()
        rows[:, COL["cx3"]] = -rows[:, COL["cx3"]]  # the mirrored world: X -> -X, heading mirrored
        rows[:, COL["yaw"]] = torch.where(
            rows[:, COL["has3d"]] > 0, wrap_angle(torch.pi - rows[:, COL["yaw"]]), rows[:, COL["yaw"]]
        )
        return {"boxes": TF.horizontal_flip(target["boxes"]), "rows": rows}

    @staticmethod
    def _sanitize(target: dict[str, Tensor], boxes: tv_tensors.BoundingBoxes, cropped: bool) -> dict[str, Tensor]:
        """Keep the boxes still visible enough after a zoom or crop (``boxes``, already clamped to the new
        canvas); a crop's lost share of a box adds to its truncation."""
        old, rows = target["boxes"], target["rows"]
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        kept = torch.ones(len(rows))
        if cropped:
            kept = (w * h / ((old[:, 2] - old[:, 0]) * (old[:, 3] - old[:, 1])).clamp_min(1e-9)).clamp(max=1.0)
        keep = (w >= MIN_BOX_PX) & (h >= MIN_BOX_PX) & (kept >= MIN_KEPT)
        rows = rows[keep].clone()
        t = COL["truncated"]
        rows[:, t] = 1 - (1 - rows[:, t]) * kept[keep]
        return {"boxes": tv_tensors.wrap(boxes[keep], like=boxes), "rows": rows}

    def pack(self, target: Any, sample: dict[str, Any]) -> Tensor:
        """The sample's objects as one padded (MAX_OBJECTS, FIELDS) tensor (class -1 = no object), with the
        sample's fx, cx (0 without intrinsics) and, in every row, the image's focal length (its fx, else the
        assumed camera's); the largest boxes are kept when there are more."""
        if isinstance(target, Tensor) and not isinstance(target, tv_tensors.TVTensor):
            return target  # already packed
        rows = target["rows"].clone()
        focal = float(rows[0, COL["focal"]]) if len(rows) else default_focal(target["boxes"].canvas_size[1])
        rows[:, COL["x0"] : COL["y1"] + 1] = target["boxes"].as_subclass(Tensor)
        if len(rows) > MAX_OBJECTS:
            area = (rows[:, 2] - rows[:, 0]) * (rows[:, 3] - rows[:, 1])
            rows = rows[area.argsort(descending=True)[:MAX_OBJECTS]]
        k = sample.get("intrinsics")
        if k is not None and bool(sample.get("has_intrinsics", False)):
            rows[:, COL["fx"]], rows[:, COL["cx"]] = float(k[0]), float(k[2])
            focal = float(k[0])
        out = torch.zeros(MAX_OBJECTS, len(FIELDS))
        out[:, COL["class"]] = -1
        out[: len(rows)] = rows
        out[:, COL["focal"]] = focal
        return out

    # ----------------------------------------------------------------------------------------------- model
    def check_model_config(self, cfg) -> None:
        if not cfg.object_classes:
            raise ValueError(
                "the objects task needs object classes: the dataset's dataset.json lists none under "
                f"{OBJECT_CLASSES_KEY!r} (see docs/folder_format.md, Objects)"
            )

    def make_head(self, in_channels: int, cfg) -> nn.Module:
        return ObjectsHead(
            in_channels, len(cfg.object_classes), cfg.head, cfg.head_channels, cfg.dropout, cfg.objects_trunks
        )

    def upsample(self, output: Tensor, size) -> Tensor:
        """The raw output on the stride-4 grid of an image of ``size`` (evaluation at another input scale).

        The detections stay those of the source grid. Nothing is interpolated (a blend of two cells' boxes is no
        box): cells that are no peak (``objects_codec.is_peak``) get ``SUPPRESSED_LOGIT``, then every target cell takes the heatmaps'
        maximum over the source cells it covers (adaptive max pooling, which also upsamples) and the regression
        of the source cell that holds it, its box rescaled to the new image and re-expressed from the new cell's
        centre, its distance channel for the new image's focal length. Upsampling copies a source cell into
        several target cells; only the one holding the source cell's centre keeps its scores, so that a peak
        stays one detection (peaks are never neighbours: ``is_peak``).
        """
        grid = grid_size(*size)
        b, c, h, w = output.shape
        if (h, w) == grid:
            return output
        k = c - EXTRA_CHANNELS
        sy, sx = grid[0] / h, grid[1] / w
        iy = torch.arange(h, device=output.device).view(1, h, 1).expand(b, h, w)
        ix = torch.arange(w, device=output.device).view(1, 1, w).expand(b, h, w)
        scale = torch.tensor([sx, sy, sx, sy], dtype=output.dtype, device=output.device)
        boxes = cell_boxes(output[:, k : k + 4].permute(0, 2, 3, 1), iy, ix) * scale  # (B, h, w, 4) new pixels
        logits = output[:, :k]  # only the peaks are detections: the rest cannot become peaks on the new grid
        logits = torch.where(is_peak(logits), logits, SUPPRESSED_LOGIT)
        heat = F.adaptive_max_pool2d(logits, grid)
        _, where = F.adaptive_max_pool2d(logits.amax(1, keepdim=True), grid, return_indices=True)
        source = torch.cat([output[:, k + 4 :], boxes.permute(0, 3, 1, 2)], 1).flatten(2)  # (B, 14, h * w)
        picked = source.gather(2, where.flatten(2).expand(-1, source.shape[1], -1)).view(b, -1, *grid)
        gy = torch.arange(grid[0], device=output.device).view(1, 1, grid[0], 1)
        gx = torch.arange(grid[1], device=output.device).view(1, 1, 1, grid[1])
        cx, cy = (gx[:, 0] + 0.5) * STRIDE, (gy[:, 0] + 0.5) * STRIDE  # new cell centres, pixels
        x0, y0, x1, y1 = picked[:, 10], picked[:, 11], picked[:, 12], picked[:, 13]
        picked[:, 0] -= math.log(sx)  # the distance channel is per focal length, which scales with the width
        edges = torch.stack([cx - x0, cy - y0, x1 - cx, y1 - cy], 1).div(STRIDE).clamp_min(1e-3).log()
        rep = torch.ones_like(where, dtype=torch.bool)  # (B, 1, *grid)
        if sx > 1:
            rep &= torch.floor((where % w + 0.5) * sx) == gx
        if sy > 1:
            rep &= torch.floor((torch.div(where, w, rounding_mode="floor") + 0.5) * sy) == gy
        heat = torch.where(rep, heat, torch.full_like(heat, SUPPRESSED_LOGIT))
        return torch.cat([heat, edges, picked[:, :10]], 1)

    def flip_output(self, output: Tensor) -> Tensor:
        out = output.flip(-1)
        k = output.shape[1] - EXTRA_CHANNELS
        order = list(range(output.shape[1]))
        order[k], order[k + 2] = k + 2, k  # left and right edges swap
        out = out[:, order].clone()
        out[:, k + 10] = -out[:, k + 10]  # yaw residuals: ry -> pi - ry keeps the bin, negates the residual
        out[:, k + 12] = -out[:, k + 12]
        return out

    # ------------------------------------------------------------------------------------- loss and metrics
    def make_loss(self, cfg) -> nn.Module:
        return ObjectsLoss(len(cfg.model.object_classes), dict(cfg.loss.objects_terms), cfg.loss.objects_class_balance)

    def make_metrics(self, cfg, info: Info) -> Accumulator:
        return ObjectsMetrics(list(cfg.model.object_classes) or object_classes(info), SCORE_THRESHOLD)

    def fit_baseline(self, targets: list[Tensor], cfg) -> dict[str, Any] | None:
        return None  # no trivial detector; the distance metrics carry their own (the class median)

    def baseline_text(self) -> str:
        return "each class's median distance (distance metrics only)"

    def report(self, result: dict[str, Any], info: Info) -> str:
        from densemtl.tasks.objects_report import report_table

        return report_table(result, object_classes(info))

    def plots(self, result: dict[str, Any], info: Info, out: Path) -> dict[str, Path]:
        from densemtl.tasks.objects_report import pr_plot

        path = pr_plot(result, object_classes(info), out / "objects_pr.png")
        return {"Objects: precision-recall at IoU 0.5": path} if path else {}

    # ------------------------------------------------------------------------------------------ prediction
    def to_numpy(self, output: Tensor, info: Info, focal_px: float | None = None) -> dict[str, np.ndarray]:
        """The detections above the operating point; distances for a camera of focal length ``focal_px``
        (pixels, in the image ``output`` belongs to), or the assumed one (``objects_codec.ASSUMED_HFOV_DEG``);
        ``objects_focal_px`` says which: [focal length, 1.0 if assumed else 0.0]."""
        focal = default_focal(output.shape[-1] * STRIDE) if focal_px is None else float(focal_px)
        det = decode(output.float(), output.shape[1] - EXTRA_CHANNELS, threshold=SCORE_THRESHOLD,
                     focal=torch.tensor([focal]))  # fmt: skip
        n = int(det["count"][0])
        out = {f"objects_{k}": det[k][0, :n].cpu().numpy() for k in DECODED}
        out["objects_focal_px"] = np.array([focal, focal_px is None], np.float32)  # fx, and whether assumed
        out["objects_classes"] = out["objects_classes"].astype(np.int32)
        return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in out.items()}

    def target_numpy(self, target: Tensor) -> dict[str, np.ndarray]:
        rows = target.as_subclass(Tensor) if isinstance(target, Tensor) else self.pack(target, {})
        rows = rows[rows[:, COL["class"]] >= 0].numpy()
        return {
            "objects_boxes": rows[:, COL["x0"] : COL["y1"] + 1],
            "objects_scores": np.ones(len(rows), np.float32),
            "objects_classes": rows[:, COL["class"]].astype(np.int32),
            "objects_distance": rows[:, COL["distance"]],
            "objects_size3d": rows[:, COL["l"] : COL["h"] + 1],
            "objects_yaw": rows[:, COL["yaw"]],
        }

    def colorize(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> np.ndarray:
        return draw_boxes(rgb, pred, object_classes(info))

    def files(self, pred: dict[str, np.ndarray], rgb: np.ndarray, info: Info) -> dict[str, np.ndarray]:
        return {f"{self.name}_color": self.colorize(pred, rgb, info)}

    def documents(self, pred: dict[str, np.ndarray], info: Info) -> dict[str, Any]:
        """``<id>_objects.json``: every detection above the operating point, best first."""
        classes = object_classes(info)
        objects = [
            {
                "class": classes[int(c)] if int(c) < len(classes) else str(int(c)),
                "score": round(float(s), 4),
                "box": [round(float(v), 2) for v in box],
                "distance_m": round(float(d), 3),
                "size3d_m": [round(float(v), 3) for v in size],
                "yaw": round(float(yaw), 4),
            }
            for box, s, c, d, size, yaw in zip(*(pred[f"objects_{k}"] for k in DECODED), strict=True)
        ]
        doc = {"objects": objects, "score_threshold": SCORE_THRESHOLD, "units": "pixels, metres"}
        if "objects_focal_px" in pred:  # the camera the distances are for (docs/objects.md, Distance)
            focal, assumed = (float(v) for v in pred["objects_focal_px"][:2])
            doc["distance_focal_px"] = round(focal, 3)
            doc["distance_camera"] = f"assumed {ASSUMED_HFOV_DEG:g}-degree field of view" if assumed else "given"
        return {self.name: doc}

    def pseudo_label(self, pred, info, min_confidence: float = 0.0, max_rel_std: float = 0.0) -> np.ndarray:
        raise ValueError("objects cannot be pseudo-labelled yet: pass --tasks without objects")

    # ----------------------------------------------------------------------------------------------- export
    def onnx_outputs(self, output: Tensor, extras: bool = True) -> dict[str, Tensor]:
        det = decode(output, output.shape[1] - EXTRA_CHANNELS, threshold=SCORE_THRESHOLD)
        return {self.name: output, **{f"objects_{k}": det[k] for k in (*DECODED, "count")}}

    def onnx_axes(self, output: Tensor, extras: bool = True) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {self.name: {0: "batch", 2: "grid_height", 3: "grid_width"}}
        axes.update({f"objects_{k}": {0: "batch"} for k in (*DECODED, "count")})
        return axes

    def parity(self, ref: Tensor, got: Tensor) -> tuple[dict[str, float], bool]:
        """The decoded detections (score >= 0.05) of both, matched by class and cell: box and score errors."""
        k = ref.shape[1] - EXTRA_CHANNELS
        a, b = decode(ref, k), decode(got, k)
        box_err, score_err = 0.0, 0.0
        for i in range(ref.shape[0]):
            for j in torch.nonzero(a["scores"][i] >= 0.05).flatten().tolist():
                same = b["classes"][i] == a["classes"][i, j]
                d = (b["boxes"][i] - a["boxes"][i, j]).abs().amax(1).masked_fill(~same, float("inf"))
                m = int(d.argmin())
                box_err = max(box_err, float(d[m]))
                score_err = max(score_err, abs(float(b["scores"][i, m] - a["scores"][i, j])))
        figures = {"objects_box_max_err_px": box_err, "objects_score_max_err": score_err}
        return figures, box_err <= PARITY_BOX_PX and score_err <= PARITY_SCORE


OBJECTS = Objects()
