"""The objects head (a CenterNet head on the shared stride-4 features) and its loss (TTFNet's).

The head is the tasks' usual trunk (``model.head``, ``model.head_channels``), then 1x1 convolutions to the heatmaps
and to the regression; ``model.objects_trunks=2`` gives the regression a trunk of its own (CenterNet gives every
output its own 3x3 branch), at twice the head's cost. It returns the raw layout of
:mod:`densemtl.tasks.objects_codec` on the stride-4 grid of the input image: objects are never upsampled.

The loss (:class:`ObjectsLoss`): CenterNet's penalty-reduced focal loss on the heatmaps (normalised by the
number of objects; objects under a cell high or mostly hidden are ignore regions, neither object nor background:
``objects_codec.trainable``), and at every cell that regresses an object (TTFNet: the cells near its centre,
weighted by a Gaussian) the GIoU loss of its decoded box (torchvision's), L1 on the log distance and, for objects
with a 3-D box, on the log 3-D size, and the yaw as a bin classification (cross-entropy) plus an L1 on the
(sin, cos) of the residual in the right bin (Mousavian et al. 2017's MultiBin). With ``class_balance`` > 0
(``loss.objects_class_balance``) a batch's rare classes weigh more in both (:func:`class_weights`): on the
synthetic streets about one scored object in ten is a person.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from densemtl.models.heads import head_dropout, make_trunk
from densemtl.tasks.objects_codec import (
    EXTRA_CHANNELS,
    cell_boxes,
    encode_heatmap,
    gather_regression,
    grid_size,
    ignore_regions,
    regression_targets,
)

HEAT_PRIOR = 0.1  # initial heatmap score (CenterNet's -2.19 bias): a flat start that the focal loss can correct
DISTANCE_PRIOR_M = 10.0  # initial distance before training (metres)
SIZE3D_PRIOR_M = (2.0, 1.0, 1.5)  # initial 3-D size (length, width, height)
EDGE_PRIOR_CELLS = 2.0  # initial distance from a cell's centre to each box edge


class ObjectsHead(nn.Module):
    """Shared features (B, C, h, w) at stride 4 -> raw objects output (B, K + 14, ceil(H/4), ceil(W/4))."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        trunk: str = "separable",
        hidden: int = 0,
        dropout: float = 0.0,
        trunks: int = 1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError("the objects head needs at least one object class (dataset.json object_classes)")
        if trunks not in (1, 2):
            raise ValueError(f"model.objects_trunks must be 1 (shared) or 2 (heatmaps, boxes), got {trunks}")
        self.num_classes = num_classes
        self.heat_trunk, width = make_trunk(in_channels, trunk, hidden)
        self.reg_trunk = make_trunk(in_channels, trunk, hidden)[0] if trunks == 2 else None
        self.drop = head_dropout(dropout)
        self.heat = nn.Conv2d(width, num_classes, 1)
        self.reg = nn.Conv2d(width, EXTRA_CHANNELS, 1)
        nn.init.normal_(self.reg.weight, std=1e-3)
        with torch.no_grad():
            self.heat.bias.fill_(-math.log((1 - HEAT_PRIOR) / HEAT_PRIOR))
            self.reg.bias.zero_()
            self.reg.bias[0:4] = math.log(EDGE_PRIOR_CELLS)
            self.reg.bias[4] = math.log(DISTANCE_PRIOR_M)
            self.reg.bias[5:8] = torch.tensor(SIZE3D_PRIOR_M).log()
            self.reg.bias[10:14] = torch.tensor([0.0, 1.0, 0.0, 1.0])  # residual 0 in both bins

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """(B, in_channels, h, w) -> (B, K + 14, *grid_size(size)): heatmap logits, then the regression."""
        grid = grid_size(*size)
        if tuple(x.shape[-2:]) != grid:
            x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
        shared = self.heat_trunk(x)
        heat = self.heat(self.drop(shared))
        reg = self.reg(self.drop(self.reg_trunk(x) if self.reg_trunk is not None else shared))
        return torch.cat([heat, reg], dim=1)


def focal_loss(
    logits: Tensor, heat: Tensor, ignore: Tensor | None = None, class_weight: Tensor | None = None
) -> Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4), summed over the maps, over the positive count.

    Positives are the cells where the splatted target is exactly 1 (the object centres); near a centre the
    negatives' penalty is reduced by ``(1 - y)^4``; ``ignore`` (bool, like ``heat``) cells that are no positive
    add nothing (objects too small to learn); ``class_weight`` (K,) scales each class's positives
    (:func:`class_weights`). Written with log-sigmoids so it is finite for any logit.
    """
    p = torch.sigmoid(logits)
    pos = heat >= 1.0
    pos_term = (1 - p) ** 2 * F.logsigmoid(logits)
    if class_weight is not None:
        pos_term = pos_term * class_weight.to(pos_term)[None, :, None, None]
    neg_term = (1 - heat) ** 4 * p**2 * F.logsigmoid(-logits)
    if ignore is not None:
        neg_term = torch.where(ignore, torch.zeros_like(neg_term), neg_term)
    total = torch.where(pos, pos_term, neg_term).sum()
    return -total / pos.sum().clamp_min(1)


def class_weights(object_class: Tensor, num_classes: int, balance: float) -> Tensor:
    """(K,) weights that even out the classes of a batch's learned objects (``object_class``, one per object):
    ``(n / (k n_c)) ** balance`` for a class with n_c of the n objects, k the classes present; 1 where absent.

    With ``balance`` 1 every present class weighs as much in all (n / k objects' worth), with 0 every object
    weighs the same (CenterNet). On the synthetic streets there are about 9 scored cars per person.
    """
    counts = torch.bincount(object_class, minlength=num_classes)[:num_classes].float()
    present = counts > 0
    if balance == 0 or int(present.sum()) < 2:
        return torch.ones(num_classes, device=object_class.device)
    share = counts.sum() / (present.sum() * counts.clamp_min(1))
    return torch.where(present, share**balance, torch.ones_like(share))


class ObjectsLoss(nn.Module):
    """``loss(raw, target (B, N, FIELDS), sample_mask (B,))``: heatmap focal loss + regression L1s.

    Samples outside ``sample_mask`` (no objects file) add nothing; a sample with a file but no objects adds its
    heatmap negatives. Returns 0 with zero gradients when no sample has an objects file.
    """

    def __init__(self, num_classes: int, weights: dict[str, float] | None = None, class_balance: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_balance = class_balance  # loss.objects_class_balance: see class_weights
        # TTFNet weighs its GIoU term 5x the heatmap's (loss.objects_terms overrides).
        self.weights = {"heat": 1.0, "box": 5.0, "distance": 1.0, "box3d": 0.5}
        unknown = sorted(set(weights or {}) - set(self.weights))
        if unknown:
            raise ValueError(f"loss.objects_terms names unknown term(s) {unknown}; the terms are {list(self.weights)}")
        self.weights.update(weights or {})
        self.last: dict[str, float] = {}

    def forward(self, raw: Tensor, target: Tensor, sample_mask: Tensor) -> Tensor:
        keep = sample_mask.to(raw.device).bool()
        if not bool(keep.any()):
            return raw.sum() * 0.0
        raw, target = raw[keep].float(), target[keep].float()
        grid = (raw.shape[-2], raw.shape[-1])
        heat = encode_heatmap(target, self.num_classes, grid)
        ignore = ignore_regions(target, self.num_classes, grid)
        where = regression_targets(target, grid)
        per_class = class_weights(where["object_class"], self.num_classes, self.class_balance)
        terms = {"heat": focal_loss(raw[:, : self.num_classes], heat, ignore, per_class)}
        if where["batch"].numel():
            where["weight"] = where["weight"] * per_class[where["object_class"][where["object"]]]
            terms.update(self._regression(gather_regression(raw, self.num_classes, where), where))
        self.last = {k: float(v.detach()) for k, v in terms.items()}
        return sum(self.weights[k] * v for k, v in terms.items())  # type: ignore[return-value]

    @staticmethod
    def _regression(reg: Tensor, where: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weighted terms at the regressing cells: reg (M, 14) against :func:`regression_targets`."""
        w = where["weight"]
        boxes = cell_boxes(reg[:, 0:4], where["iy"], where["ix"])
        giou = generalized_box_iou_loss(boxes, where["box"], reduction="none")
        res, bin_ = where["yaw_residual"], where["yaw_bin"]
        sincos = reg[:, 10:14].gather(1, torch.stack([2 * bin_, 2 * bin_ + 1], 1))  # (M, 2) of the true bin
        yaw_res = (sincos - torch.stack([res.sin(), res.cos()], 1)).abs().sum(1)
        yaw_ce = F.cross_entropy(reg[:, 8:10], bin_, reduction="none")
        size3d = (reg[:, 5:8] - where["log_size3d"]).abs().sum(1)
        box3d = torch.where(where["has3d"], size3d + yaw_ce + yaw_res, torch.zeros_like(size3d))
        distance = torch.where(where["has_distance"], (reg[:, 4] - where["log_distance"]).abs(), torch.zeros_like(w))
        return {
            "box": _weighted(giou, w),
            "distance": _weighted(distance, w * where["has_distance"]),
            "box3d": _weighted(box3d, w * where["has3d"]),
        }


def _weighted(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean; exactly 0 (zero gradients) when every weight is 0."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)
