"""The objects loss's class balance (``loss.objects_class_balance``): a rare class weighs as much as a common one."""

from __future__ import annotations

import pytest
import torch

from densemtl.tasks.objects_codec import (
    EXTRA_CHANNELS,
    centre_cells,
    encode_heatmap,
    grid_size,
    ignore_regions,
)
from densemtl.tasks.objects_head import ObjectsLoss, class_weights, focal_loss
from test_objects import K, padded, row

GRID = grid_size(64, 128)
CARS = [[8 + 20 * i, 30, 24 + 20 * i, 44] for i in range(6)]  # six 16x14 cars in a row
PERSON = [60, 4, 66, 24]  # one 6x20 person above them


def _street() -> torch.Tensor:
    return padded(*(row(0, b, 10.0) for b in CARS), row(1, PERSON, 8.0))[None]


def _centre_grads(balance: float) -> tuple[float, float, float, float]:
    """|d loss / d logit| at the first car's and the person's centre cells, on their own heatmap and their box edges."""
    raw = torch.zeros(1, K + EXTRA_CHANNELS, *GRID, requires_grad=True)
    ObjectsLoss(K, class_balance=balance)(raw, _street(), torch.tensor([True])).backward()
    (cy, py), (cx, px) = centre_cells(torch.tensor([CARS[0], PERSON], dtype=torch.float32), GRID)
    g = raw.grad[0]
    return (float(g[0, cy, cx].abs()), float(g[1, py, px].abs()),
            float(g[K : K + 4, cy, cx].abs().sum()), float(g[K : K + 4, py, px].abs().sum()))  # fmt: skip


def test_class_weights_by_hand() -> None:
    classes = torch.tensor([0] * 14 + [1])
    full = class_weights(classes, 2, 1.0)
    assert torch.allclose(full, torch.tensor([15 / 28, 7.5]))
    assert torch.isclose(full[classes].sum(), torch.tensor(15.0))  # as many objects' worth as before, split evenly
    assert torch.allclose(class_weights(classes, 2, 0.5), torch.tensor([15 / 28, 7.5]).sqrt())
    assert torch.equal(class_weights(classes, 2, 0.0), torch.ones(2))
    assert torch.equal(class_weights(torch.tensor([0, 0, 0]), 3, 1.0), torch.ones(3))  # one class present: as is
    assert torch.equal(class_weights(torch.tensor([], dtype=torch.long), 2, 1.0), torch.ones(2))


def test_balance_zero_and_a_single_class_leave_the_loss_as_it_was() -> None:
    torch.manual_seed(0)
    raw = torch.randn(1, K + EXTRA_CHANNELS, *GRID)
    mask = torch.tensor([True])
    plain = ObjectsLoss(K, class_balance=0.0)
    plain(raw, _street(), mask)
    heat = focal_loss(raw[:, :K], encode_heatmap(_street(), K, GRID), ignore_regions(_street(), K, GRID))
    assert plain.last["heat"] == pytest.approx(float(heat), rel=1e-6)  # no class weight at balance 0
    cars = padded(*(row(0, b, 10.0) for b in CARS))[None]  # one class present: nothing to even out
    assert torch.allclose(ObjectsLoss(K, class_balance=1.0)(raw, cars, mask), plain(raw, cars, mask))


@pytest.mark.parametrize("balance", [0.5, 1.0])
def test_balance_lifts_the_rare_class_in_the_heatmap_and_the_boxes(balance: float) -> None:
    car_heat, person_heat, car_box, person_box = _centre_grads(0.0)
    car_heat_b, person_heat_b, car_box_b, person_box_b = _centre_grads(balance)
    lift = (7 / (2 * 1)) / (7 / (2 * 6))  # the person's weight over a car's, at balance 1: 6
    assert person_heat_b / car_heat_b == pytest.approx(person_heat / car_heat * lift**balance, rel=1e-4)
    assert person_box_b / car_box_b > 1.5 * person_box / car_box
