"""Post-processing of predicted hematoma masks: drop what cannot be blood, then keep the main
lesion and its satellites.

Acute blood is hyperdense: a hematoma averages 50-70 HU, and even with a hypodense (blend-sign)
part or in anaemia its mean stays above ~35 HU, while a fully retracted clot stays below ~95 HU.
A predicted component averaging outside [MIN_LESION_HU, MAX_LESION_HU] = [20, 100] HU is CSF, fat
or air-cell partial volume (below) or bone partial volume at the skull (above), never an acute
hematoma. On a scanner unlike the training centres' a short-trained model marks such regions
(mean -220 to -10 HU on the tiny cohort's 3 mm centre, 85-107 HU with bone voxels at the
skull), and left in, the largest of them displaces the real lesion. On the paper cohort's
training centres the reference components average 26.8 HU at the lowest (a partial-volume
satellite), so the filter removes no real blood there.

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
MIN_LESION_HU = 20.0
MAX_LESION_HU = 100.0


def keep_blood_density(mask: np.ndarray, hu: np.ndarray, low: float = MIN_LESION_HU,
                       high: float = MAX_LESION_HU) -> np.ndarray:
    """`mask` (z, y, x) without the connected components whose mean HU lies outside [low, high]."""
    mask = np.asarray(mask) != 0
    if not mask.any():
        return mask.astype(np.uint8)
    labels, count = ndimage.label(mask, structure=FULL_CONNECTIVITY)
    means = np.asarray(ndimage.mean(np.asarray(hu, dtype=np.float64), labels, index=np.arange(1, count + 1)))
    kept = 1 + np.flatnonzero((means >= low) & (means <= high))
    return np.isin(labels, kept).astype(np.uint8)


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
