"""Label tables shared by the converters: the official Cityscapes classes (KITTI semantics uses the same ids).

Each table says its class ids, names and colours; ``label_lut`` maps raw label ids to training ids with 255 for
everything that is not evaluated.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from densemtl.tasks import IGNORE_INDEX


class Label(NamedTuple):
    """One row of the official Cityscapes label table (cityscapesScripts ``labels.py``)."""

    name: str
    id: int
    train_id: int  # 255 = not evaluated
    category: str
    cat_id: int  # 0 = void
    color: tuple[int, int, int]


LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", 0, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", 0, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", 0, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", 0, (0, 0, 0)),
    Label("static", 4, 255, "void", 0, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", 0, (111, 74, 0)),
    Label("ground", 6, 255, "void", 0, (81, 0, 81)),
    Label("road", 7, 0, "flat", 1, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", 1, (244, 35, 232)),
    Label("parking", 9, 255, "flat", 1, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", 1, (230, 150, 140)),
    Label("building", 11, 2, "construction", 2, (70, 70, 70)),
    Label("wall", 12, 3, "construction", 2, (102, 102, 156)),
    Label("fence", 13, 4, "construction", 2, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", 2, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", 2, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", 2, (150, 120, 90)),
    Label("pole", 17, 5, "object", 3, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", 3, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", 3, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", 3, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", 4, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", 4, (152, 251, 152)),
    Label("sky", 23, 10, "sky", 5, (70, 130, 180)),
    Label("person", 24, 11, "human", 6, (220, 20, 60)),
    Label("rider", 25, 12, "human", 6, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", 7, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", 7, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", 7, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", 7, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", 7, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", 7, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", 7, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", 7, (119, 11, 32)),
)
CATEGORIES = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
CATEGORY_COLORS = [[128, 64, 128], [70, 70, 70], [153, 153, 153], [107, 142, 35], [70, 130, 180],
                   [220, 20, 60], [0, 0, 142]]  # fmt: skip


def class_names(classes: int = 19) -> list[str]:
    """Names of the 19 training classes or the 7 categories, in id order."""
    if classes == 7:
        return list(CATEGORIES)
    return [lab.name for lab in sorted((x for x in LABELS if x.train_id != 255), key=lambda x: x.train_id)]


def palette(classes: int = 19) -> list[list[int]]:
    """Official colours of the 19 training classes (or one colour per category)."""
    if classes == 7:
        return [list(c) for c in CATEGORY_COLORS]
    return [
        list(lab.color) for lab in sorted((x for x in LABELS if x.train_id != 255), key=lambda x: x.train_id)
    ]


def label_lut(classes: int = 19) -> np.ndarray:
    """(256,) uint8 lookup: label id -> training id (19) or category 0..6 (7); everything else 255."""
    if classes not in (19, 7):
        raise ValueError(f"Cityscapes classes must be 19 or 7, got {classes}")
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for lab in LABELS:
        if lab.train_id != 255:
            lut[lab.id] = lab.train_id if classes == 19 else lab.cat_id - 1
    return lut
