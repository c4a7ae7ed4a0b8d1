"""Post-processing of predicted hematoma masks: keep the main lesion and its satellites.

A spontaneous ICH is one hematoma; its satellite islands (the island sign) lie next to it.
Small predicted blobs far from the largest component are false positives (noise speckle at
blood density, partial-volume bone at the skull base), which inflate HD95 and the volume.
Like nnU-Net's "keep the largest component", but satellites within `satellite_mm` of the
main lesion are kept.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # diagonal neighbours belong to the same blob


def keep_main_lesion(mask: np.ndarray, spacing_xyz, satellite_mm: float) -> np.ndarray:
    """The largest connected component of `mask` (z, y, x) plus every component whose nearest
    voxel lies within `satellite_mm` of it; `satellite_mm <= 0` returns the mask unchanged."""
    mask = np.asarray(mask) != 0
    if satellite_mm <= 0 or not mask.any():
        return mask.astype(np.uint8)
    labels, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    if count == 1:
        return mask.astype(np.uint8)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    main = labels == 1 + int(np.argmax(sizes))
    distance = ndimage.distance_transform_edt(~main, sampling=tuple(float(s) for s in spacing_xyz)[::-1])
    nearest = ndimage.minimum(distance, labels, index=np.arange(1, count + 1))
    kept = 1 + np.flatnonzero(np.asarray(nearest) <= satellite_mm)
    return np.isin(labels, kept).astype(np.uint8)
