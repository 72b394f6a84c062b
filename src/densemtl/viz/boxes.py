"""Boxes drawn on pictures: class, distance and (for predictions) score, one colour per object class."""

from __future__ import annotations

import cv2
import numpy as np

BOX_COLORS = ((255, 196, 0), (0, 220, 255), (255, 64, 160), (120, 255, 80), (255, 128, 0), (180, 120, 255))


def draw_boxes(rgb: np.ndarray, pred: dict[str, np.ndarray], classes: list[str], scores: bool = True) -> np.ndarray:
    """A copy of uint8 ``rgb`` (H, W, 3) with ``pred``'s ``objects_boxes`` (N, 4 pixels) outlined and labelled
    ``"<class> <distance> m"`` (plus the score when it is below 1, i.e. for predictions)."""
    out = np.ascontiguousarray(rgb.copy())
    boxes = pred.get("objects_boxes", np.zeros((0, 4)))
    thick = max(1, round(min(out.shape[:2]) / 240))
    scale = max(0.35, min(out.shape[:2]) / 700)
    for i, box in enumerate(boxes):
        c = int(pred["objects_classes"][i])
        color = BOX_COLORS[c % len(BOX_COLORS)]
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), color, thick, cv2.LINE_AA)
        name = classes[c] if c < len(classes) else str(c)
        label = f"{name} {float(pred['objects_distance'][i]):.1f} m"
        s = float(pred.get("objects_scores", np.ones(len(boxes)))[i])
        if scores and s < 1.0:
            label += f" {s:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = y0 - 2 if y0 - th - base - 2 >= 0 else min(out.shape[0] - 1, y1 + th + 2)
        cv2.rectangle(out, (x0, ty - th - base + 1), (x0 + tw + 2, ty + 1), color, -1)
        cv2.putText(out, label, (x0 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out
