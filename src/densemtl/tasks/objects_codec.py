"""Objects as points: the raw output's layout, target encoding and decoding.

The head is CenterNet's (Zhou et al. 2019: a centre heatmap per class, the box and the object's attributes read
at the heatmap's peaks, no NMS) trained the TTFNet way (Liu et al. 2020, "Training-Time-Friendly Network"):
elliptical Gaussians that follow the box's aspect, and the box regressed as its four edges' distances from
*every* cell near the centre, not from the centre cell alone. TTFNet reaches CenterNet's accuracy in a seventh
of its epochs, which is what a few-epoch CPU budget needs.

On the decoder's stride-4 grid (``STRIDE`` pixels per cell; ``ceil(H / 4) x ceil(W / 4)`` cells for an (H, W)
image) the head outputs ``raw`` (B, K + 14, h, w) with K object classes:

====================  ====================================================================================
channels              meaning
====================  ====================================================================================
``[0, K)``            centre-heatmap logits, one per class (sigmoid = score)
``K .. K+3``          ln of the distances (in cells) from the cell's centre to the box's left, top, right and
                      bottom edges
``K+4``               ln of the object's distance (the depth Z of its 3-D centre, metres) at the reference
                      focal length: ``ln(Z * FOCAL_REF_PX / f)``, f the focal length (pixels) of the image
                      the grid belongs to (see below)
``K+5 .. K+7``        ln of the 3-D size (length, width, height) in metres
``K+8, K+9``          yaw bin logits (bins centred at -pi/2 and +pi/2, KITTI ``rotation_y``)
``K+10 .. K+13``      (sin, cos) of the yaw's residual from bin 0's and bin 1's centre
====================  ====================================================================================

Boxes are pixel edges (x0, y0, x1, y1) in the image (pixel u covers [u, u + 1]); cell (iy, ix) covers pixels
[4 ix, 4 ix + 4) and its centre is at ``4 (ix + 0.5)``. Decoding (:func:`decode`) is 3x3 max-pool peak extraction
(one peak per plateau of equal scores) and a top-``k`` over classes and cells, all tensor ops with a fixed ``k``, so the same function runs in PyTorch
and inside the ONNX graph and both give the same boxes.

The distance channel is camera-aware. How far an object of a given pixel size is depends on the focal length:
Z = f H / h for an object H metres high and h pixels high, so one image cannot say Z without f. The
synthetic cameras' fields of view span 55-90 degrees, and training zooms by up to 25 %. So the head regresses
``Z * FOCAL_REF_PX / f``, which the image alone determines: ``f H / h`` scaled to the reference focal length.
:func:`decode` multiplies it back by the image's focal length. A target row carries that focal length
(``focal``: the sample's fx, or the :func:`default_focal` of an ``ASSUMED_HFOV_DEG`` camera when it has no
intrinsics, scaled by every resize), and so does a prediction when the camera is known. Otherwise decoding
assumes the same field of view, which gives back what a model trained without intrinsics learned.

Targets travel as one padded tensor per sample (:data:`FIELDS` columns, ``MAX_OBJECTS`` rows, class -1 = none),
so samples collate like the dense tasks' targets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

STRIDE = 4
MAX_OBJECTS = 128  # rows of a sample's target tensor; the largest boxes are kept when a sample has more
TOP_K = 100  # detections the decoder returns per image (padded; ``count`` says how many pass the threshold)
YAW_BINS = (-math.pi / 2, math.pi / 2)
EXTRA_CHANNELS = 14  # box edges 4 + distance 1 + 3-D size 3 + yaw bins 2 + residuals 4
ALPHA = 0.54  # TTFNet: the heatmap Gaussian's sigma is ALPHA * (box side) / 6
BETA = 0.54  # TTFNet: cells within the Gaussian of BETA * (box side) / 6 regress the box
# Which objects are scored (benchmarks, ``densemtl evaluate``) and learned, after KITTI's "moderate" difficulty (boxes
# >= 25 px high of its 375-px images, at most partly occluded, truncated <= 30 %). The others are ignore regions:
# neither object nor background, in training and in scoring (COCO's iscrowd). Heights are a share of the image height,
# so the rule does not depend on resolution.
SCORED_MIN_HEIGHT = 1 / 16  # of the image height (16 px at 256, 24 px at 375)
SCORED_MIN_VISIBLE = 0.3
SCORED_MAX_TRUNCATED = 0.3
MIN_TRAIN_CELLS = 1.0  # and training needs a box at least a cell high (4 px at the network input)
FOCAL_REF_PX = 256.0  # the focal length (pixels) at which the distance channel is expressed
ASSUMED_HFOV_DEG = 70.0  # the camera assumed when an image comes without intrinsics (a typical dash-cam)

# Columns of a target row.
FIELDS = (
    "class", "x0", "y0", "x1", "y1", "distance", "cx3", "cy3", "cz3", "l", "w", "h", "yaw", "has3d",
    "visible", "truncated", "fx", "cx", "focal",
)  # fmt: skip
COL = {name: i for i, name in enumerate(FIELDS)}


def grid_size(height: int, width: int) -> tuple[int, int]:
    """The stride-4 grid (h, w) of an (H, W) image: ``ceil(H / 4), ceil(W / 4)``."""
    return -(-int(height) // STRIDE), -(-int(width) // STRIDE)


def default_focal(width: float) -> float:
    """The focal length (pixels) of an image ``width`` pixels wide seen by an ``ASSUMED_HFOV_DEG`` camera."""
    return float(width) / (2.0 * math.tan(math.radians(ASSUMED_HFOV_DEG) / 2.0))


def known_or_reference(focal: Tensor) -> Tensor:
    """Focal lengths (pixels), with ``FOCAL_REF_PX`` where one is 0 (rows made without one): the distance channel
    is then read as metres, in training (:func:`regression_targets`) and in :func:`decode` alike."""
    return torch.where(focal > 0, focal, torch.full_like(focal, FOCAL_REF_PX))


def wrap_angle(a: Tensor) -> Tensor:
    """Angles wrapped to [-pi, pi)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def scored(rows: Tensor, image_height: float) -> Tensor:
    """(N,) bool: the ground-truth rows (N, FIELDS) that are scored (``SCORED_*``) in an image ``image_height``
    pixels high; the others are ignore regions."""
    height = rows[:, COL["y1"]] - rows[:, COL["y0"]]
    return (
        (height >= SCORED_MIN_HEIGHT * image_height)
        & (rows[:, COL["visible"]] >= SCORED_MIN_VISIBLE)
        & (rows[:, COL["truncated"]] <= SCORED_MAX_TRUNCATED)
    )


def trainable(rows: Tensor, image_height: float) -> Tensor:
    """(N,) bool: the rows (N, FIELDS) of real objects that the head learns, in an image ``image_height`` pixels
    high: the scored ones (:func:`scored`: training learns what evaluation scores) at least a cell high; the
    others become ignore regions."""
    tall = (rows[:, COL["y1"]] - rows[:, COL["y0"]]) >= MIN_TRAIN_CELLS * STRIDE
    return (rows[:, COL["class"]] >= 0) & tall & scored(rows, image_height)


def _objects(target: Tensor, learn: bool, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(batch index (M,), rows (M, FIELDS)) of the objects the head learns (``learn``) or ignores on ``grid``."""
    real = target[..., COL["class"]] >= 0
    ok = trainable(target.reshape(-1, target.shape[-1]), grid[0] * STRIDE).view(real.shape)
    keep = ok if learn else real & ~ok
    batch = torch.arange(target.shape[0], device=target.device)[:, None].expand_as(keep)[keep]
    return batch, target[keep]


def _cell_axes(grid: tuple[int, int], like: Tensor) -> tuple[Tensor, Tensor]:
    """Cell-centre coordinates in cells: rows (1, h) and columns (1, w)."""
    ys = torch.arange(grid[0], device=like.device, dtype=like.dtype)[None] + 0.5
    xs = torch.arange(grid[1], device=like.device, dtype=like.dtype)[None] + 0.5
    return ys, xs


def centre_cells(boxes: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The cells (row ``iy``, column ``ix``, long (M,)) of the ``grid`` that hold the centres of ``boxes`` (M, 4)
    pixels: where an object's heatmap peaks and where decoding reads its box."""
    ix = torch.floor((boxes[:, 0] + boxes[:, 2]) / (2 * STRIDE)).clamp(0, grid[1] - 1)
    iy = torch.floor((boxes[:, 1] + boxes[:, 3]) / (2 * STRIDE)).clamp(0, grid[0] - 1)
    return iy.long(), ix.long()


def _gaussians(rows: Tensor, grid: tuple[int, int], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per object (M, h, w): its elliptical Gaussian (sigma = ``scale`` * side / 6, exactly 1 at its centre
    cell), and its centre cell's column and row (long)."""
    ys, xs = _cell_axes(grid, rows)
    iy, ix = (v.to(rows.dtype) for v in centre_cells(rows[:, COL["x0"] : COL["y1"] + 1], grid))
    sx = (scale * (rows[:, COL["x1"]] - rows[:, COL["x0"]]) / (6 * STRIDE)).clamp_min(0.25)
    sy = (scale * (rows[:, COL["y1"]] - rows[:, COL["y0"]]) / (6 * STRIDE)).clamp_min(0.25)
    gx = torch.exp(-((xs - 0.5 - ix[:, None]) ** 2) / (2 * sx[:, None] ** 2))  # (M, w), 1 at the centre cell
    gy = torch.exp(-((ys - 0.5 - iy[:, None]) ** 2) / (2 * sy[:, None] ** 2))  # (M, h)
    return gy[:, :, None] * gx[:, None, :], ix.long(), iy.long()


def _splat(values: Tensor, slot: Tensor, n: int) -> Tensor:
    """Per-slot maximum of ``values`` (M, h, w) into (n, h, w)."""
    out = values.new_zeros(n, *values.shape[1:])
    return out.scatter_reduce_(0, slot[:, None, None].expand_as(values), values, "amax")


def encode_heatmap(target: Tensor, num_classes: int, grid: tuple[int, int]) -> Tensor:
    """Centre heatmaps (B, K, h, w) in [0, 1] from padded targets (B, N, FIELDS): each object the head learns
    (:func:`trainable`) splats its elliptical Gaussian (``ALPHA``) on its class's map, exactly 1 at its centre
    cell; overlapping objects take the maximum."""
    b = target.shape[0]
    batch, rows = _objects(target, learn=True, grid=grid)
    if not len(rows):
        return target.new_zeros(b, num_classes, *grid)
    blobs, _, _ = _gaussians(rows, grid, ALPHA)
    slot = batch * num_classes + rows[:, COL["class"]].long()
    return _splat(blobs, slot, b * num_classes).view(b, num_classes, *grid)


def ignore_regions(target: Tensor, num_classes: int, grid: tuple[int, int]) -> Tensor:
    """(B, K, h, w) bool: the cells touching the boxes of objects too small or hidden to learn (real objects,
    so they must not count as background either), on their class's map."""
    b = target.shape[0]
    batch, rows = _objects(target, learn=False, grid=grid)
    if not len(rows):
        return torch.zeros(b, num_classes, *grid, dtype=torch.bool, device=target.device)
    ys, xs = _cell_axes(grid, rows)
    in_y = (ys + 0.5 >= rows[:, COL["y0"], None] / STRIDE) & (ys - 0.5 <= rows[:, COL["y1"], None] / STRIDE)
    in_x = (xs + 0.5 >= rows[:, COL["x0"], None] / STRIDE) & (xs - 0.5 <= rows[:, COL["x1"], None] / STRIDE)
    boxes = (in_y[:, :, None] & in_x[:, None, :]).to(rows.dtype)  # (M, h, w)
    slot = batch * num_classes + rows[:, COL["class"]].long()
    return _splat(boxes, slot, b * num_classes).bool().view(b, num_classes, *grid)


def regression_targets(target: Tensor, grid: tuple[int, int]) -> dict[str, Tensor]:
    """The cells that regress an object and what they learn (TTFNet): every cell inside a learned object's box
    where its ``BETA`` Gaussian exceeds 0.05 (at least its centre cell); a cell two objects claim regresses the
    one whose centre it holds, else the smaller (TTFNet's rule alone gave a car's centre cell, where decoding reads
    the car's box, to a smaller object in front of it, such as a person). Returns per cell ``batch``, ``iy``,
    ``ix`` (M,), ``weight`` (M,: the Gaussian, normalised to sum to ln(area) per object, as TTFNet weighs large boxes), ``box`` (M, 4) pixels, ``object`` (M,) row index into
    :func:`_objects`' rows, ``object_class`` (one per learned object, whether or not it won a cell), and the
    object's ``log_distance`` (at ``FOCAL_REF_PX``), ``has_distance``, ``log_size3d``, ``yaw_bin``,
    ``yaw_residual``, ``has3d``."""
    b = target.shape[0]
    batch, rows = _objects(target, learn=True, grid=grid)
    h, w = grid
    blobs, ix, iy = _gaussians(rows, grid, BETA)
    ys, xs = _cell_axes(grid, rows)
    inside = (ys[:, :, None] * STRIDE >= rows[:, COL["y0"], None, None]) & (
        ys[:, :, None] * STRIDE <= rows[:, COL["y1"], None, None]
    )
    inside = inside & (xs[:, None, :] * STRIDE >= rows[:, COL["x0"], None, None])
    inside = inside & (xs[:, None, :] * STRIDE <= rows[:, COL["x1"], None, None])
    claim = (blobs > 0.05) & inside
    claim[torch.arange(len(rows)), iy, ix] = True  # the centre cell always regresses its object
    area = (rows[:, COL["x1"]] - rows[:, COL["x0"]]) * (rows[:, COL["y1"]] - rows[:, COL["y0"]])
    # Per image and cell the object centred there wins, else the smallest claiming one: rank claims by area, centre
    # claims ahead of all others, keep the minimum per cell.
    cost = torch.where(claim, area[:, None, None] + area.sum() + 1, torch.full_like(blobs, math.inf))
    cost[torch.arange(len(rows)), iy, ix] = area
    best = torch.full((b, h, w), math.inf, dtype=rows.dtype, device=rows.device)
    best = best.scatter_reduce(0, batch[:, None, None].expand_as(cost), cost, "amin")
    win = claim & (cost == best[batch])
    obj, cy, cx = torch.nonzero(win, as_tuple=True)
    weight = blobs[obj, cy, cx]
    total = torch.zeros(len(rows), dtype=rows.dtype, device=rows.device).index_add_(0, obj, weight)
    weight = weight / total[obj].clamp_min(1e-6) * area[obj].clamp_min(1.0 + 1e-6).log()
    r = rows[obj]
    lwh = r[:, COL["l"] : COL["h"] + 1]
    yaw = wrap_angle(r[:, COL["yaw"]])
    yaw_bin = (yaw >= 0).long()
    centres = torch.tensor(YAW_BINS, dtype=rows.dtype, device=rows.device)
    focal = known_or_reference(r[:, COL["focal"]])
    return {
        "batch": batch[obj], "iy": cy, "ix": cx, "weight": weight, "object": obj,
        "object_class": rows[:, COL["class"]].long(),
        "box": r[:, COL["x0"] : COL["y1"] + 1],
        "log_distance": (r[:, COL["distance"]] * FOCAL_REF_PX / focal).clamp_min(1e-3).log(),
        "has_distance": r[:, COL["distance"]] > 0,
        "log_size3d": lwh.clamp_min(1e-3).log(),
        "yaw_bin": yaw_bin,
        "yaw_residual": wrap_angle(yaw - centres[yaw_bin]),
        "has3d": (r[:, COL["has3d"]] > 0) & (lwh > 0).all(1),
    }  # fmt: skip


def gather_regression(raw: Tensor, num_classes: int, where: dict[str, Tensor]) -> Tensor:
    """The regression channels (M, 14) at each regressing cell (``where`` from :func:`regression_targets`)."""
    return raw[:, num_classes:].permute(0, 2, 3, 1)[where["batch"], where["iy"], where["ix"]]


def cell_boxes(edges: Tensor, iy: Tensor, ix: Tensor) -> Tensor:
    """Boxes (..., 4) in pixels from log edge distances (..., 4) of cells at rows ``iy`` and columns ``ix``."""
    d = edges.exp() * STRIDE
    cx = (ix.to(edges.dtype) + 0.5) * STRIDE
    cy = (iy.to(edges.dtype) + 0.5) * STRIDE
    return torch.stack([cx - d[..., 0], cy - d[..., 1], cx + d[..., 2], cy + d[..., 3]], dim=-1)


def yaw_from(bins: Tensor, residuals: Tensor) -> Tensor:
    """Yaw (radians, [-pi, pi)) from bin logits (..., 2) and residual (sin, cos) pairs (..., 4)."""
    pick = bins.argmax(-1, keepdim=True)  # (..., 1)
    sin = torch.gather(residuals[..., 0::2], -1, pick).squeeze(-1)
    cos = torch.gather(residuals[..., 1::2], -1, pick).squeeze(-1)
    centre = torch.tensor(YAW_BINS, dtype=bins.dtype, device=bins.device)[pick.squeeze(-1)]
    return wrap_angle(centre + torch.atan2(sin, cos))


def is_peak(logits: Tensor) -> Tensor:
    """(B, K, h, w) bool: the cells that are their 3x3 neighbourhood's maximum and, on a plateau of equal values,
    the first in raster order (a cell equal to its left, upper-left, upper or upper-right neighbour is not a peak),
    so that a flat patch of equal scores gives one detection, not one per cell."""
    h, w = logits.shape[-2:]
    top = F.max_pool2d(logits, 3, stride=1, padding=1) == logits
    pad = F.pad(logits, (1, 1, 1, 0), value=-math.inf)  # a row above, a column each side
    before = torch.stack(
        [pad[..., 1:, 0:w], pad[..., 0:h, 0:w], pad[..., 0:h, 1 : w + 1], pad[..., 0:h, 2 : w + 2]]
    ).amax(0)  # left, upper-left, upper, upper-right neighbours
    return top & (logits > before)


def decode(
    raw: Tensor, num_classes: int, k: int = TOP_K, threshold: float = 0.0, focal: Tensor | None = None
) -> dict[str, Tensor]:
    """Detections from raw outputs (B, K + 14, h, w), ``k`` per image, best first, padded.

    Returns ``boxes`` (B, k, 4) pixels, ``scores`` (B, k), ``classes`` (B, k) int64, ``distance`` (B, k) metres,
    ``size3d`` (B, k, 3) metres, ``yaw`` (B, k) radians, and ``count`` (B,) int64: how many detections have a
    score >= ``threshold``. Needs ``num_classes * h * w >= k`` (any input of at least 64 x 64 pixels).
    ``focal`` (B,): each image's focal length in pixels (0: none, the channel is read as metres, as
    :func:`regression_targets` trains rows without one); None assumes an ``ASSUMED_HFOV_DEG`` camera
    (:func:`default_focal` of the grid's width in pixels).
    """
    b, _, h, w = raw.shape
    logits = raw[:, :num_classes]  # peaks on the logits: the sigmoid would make confident neighbours ties (1.0)
    peaks = torch.sigmoid(logits) * is_peak(logits).to(raw.dtype)
    scores, index = peaks.reshape(b, -1).topk(k, dim=1)  # (B, k)
    classes = torch.div(index, h * w, rounding_mode="floor")
    cell = index - classes * (h * w)
    iy = torch.div(cell, w, rounding_mode="floor")
    ix = cell - iy * w
    reg = raw[:, num_classes:].reshape(b, EXTRA_CHANNELS, h * w)
    reg = torch.gather(reg, 2, cell[:, None, :].expand(b, EXTRA_CHANNELS, k)).permute(0, 2, 1)  # (B, k, 14)
    if focal is None:  # the grid's width as a tensor, so that an exported graph follows its dynamic width
        focal_px = torch.ones_like(raw[:, 0, 0, :]).sum(-1) * default_focal(STRIDE)
    else:
        focal_px = known_or_reference(focal.to(device=raw.device, dtype=raw.dtype).reshape(b))
    return {
        "boxes": cell_boxes(reg[..., 0:4], iy, ix),
        "scores": scores,
        "classes": classes,
        "distance": reg[..., 4].exp() * (focal_px[:, None] / FOCAL_REF_PX),
        "size3d": reg[..., 5:8].exp(),
        "yaw": yaw_from(reg[..., 8:10], reg[..., 10:14]),
        "count": (scores >= threshold).sum(dim=1),
    }
