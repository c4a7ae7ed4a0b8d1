"""A PNG grid of axial slices through hematomas, in a brain window, for eyeballing a cohort."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.data.contract import read_cohort  # noqa: E402
from common.data.preprocess import load_case  # noqa: E402

BRAIN_WINDOW = (40.0, 80.0)


def write_preview(data_root: Path, out_png: Path, n_cases: int = 12, outline: bool = True) -> Path:
    """Write a grid of the slice with the largest hematoma area for up to n_cases cases, taken
    round-robin over centres (canonical orientation: anterior up, patient left on the right)."""
    cohort = read_cohort(Path(data_root))
    queues = [list(cases) for cases in cohort.values()]
    picked = []
    while len(picked) < n_cases and any(queues):
        for queue in queues:
            if queue and len(picked) < n_cases:
                picked.append(queue.pop(0))
    cols = min(4, len(picked))
    rows = int(np.ceil(len(picked) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    level, width = BRAIN_WINDOW
    for ax in axes.ravel():
        ax.axis("off")
    for ax, case in zip(axes.ravel(), picked):
        sample = load_case(case)
        area = sample.mask.sum(axis=(1, 2)) if sample.mask is not None else np.zeros(sample.hu.shape[0])
        k = int(area.argmax()) if area.any() else sample.hu.shape[0] // 2
        sx, sy, _ = sample.spacing
        ax.imshow(sample.hu[k], cmap="gray", vmin=level - width / 2, vmax=level + width / 2, aspect=sy / sx,
                  interpolation="bilinear")
        if outline and sample.mask is not None and sample.mask[k].any():
            ax.contour(sample.mask[k], levels=[0.5], colors="red", linewidths=0.6, alpha=0.5)
        volume = sample.mask.sum() * sample.voxel_ml if sample.mask is not None else float("nan")
        he = {1: "HE", 0: "no HE", None: "HE ?"}[case.he]
        ax.set_title(f"{case.case_id}  {volume:.1f} mL  {he}\n{case.storage}, slice {k}", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
