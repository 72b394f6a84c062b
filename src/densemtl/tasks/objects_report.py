"""The objects task's Markdown table and precision-recall plot for ``densemtl evaluate``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def report_table(result: dict[str, Any], classes: list[str]) -> str:
    """Per-class AP, distance and BEV figures as Markdown (the baseline: each class's median distance)."""
    lines = [
        "| class | AP50 | mAP@[.5:.95] | distance rel. err | distance δ1 | baseline rel. err / δ1 | BEV AP |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in (*classes, ""):
        s = f"_{name}" if name else ""
        label = name or "**all**"
        ap50 = result.get(f"ap50{s}") if name else result.get("ap50")
        m = result.get(f"map{s}") if name else result.get("map")
        lines.append(
            f"| {label} | {_f(ap50)} | {_f(m)} | {_f(result.get(f'distance_relerr{s}'))} | "
            f"{_f(result.get(f'distance_delta1{s}'))} | {_f(result.get(f'distance_relerr{s}_baseline'))} / "
            f"{_f(result.get(f'distance_delta1{s}_baseline'))} | {_f(result.get(f'bev_ap{s}'))} |"
        )
    lines.append(
        f"\n{result.get('gt_objects', 0)} objects in {result.get('images', 0)} images; distances over "
        f"{result.get('matched', 0)} detections matched at IoU >= 0.5 (score >= 0.3); BEV AP: nuScenes "
        "centre-distance thresholds 0.5, 1, 2, 4 m."
    )
    return "\n".join(lines)


def pr_plot(result: dict[str, Any], classes: list[str], path: Path) -> Path | None:
    """Precision against recall at IoU 0.5 per class (``pr_<class>``), or None without curves."""
    curves = {c: result[f"pr_{c}"] for c in classes if result.get(f"pr_{c}")}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.6), dpi=110)
    recall = [i / 100 for i in range(101)]
    for name, precision in curves.items():
        ax.plot(recall, precision, label=f"{name} (AP50 {_f(result.get(f'ap50_{name}'), 2)})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Objects, IoU 0.5")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
