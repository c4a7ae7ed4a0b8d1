"""The intracranial space of a head NCCT, from its densities alone.

A spontaneous intracerebral hemorrhage lies inside the skull. Extracranial soft tissue at blood
density (temporal and neck muscles 40-55 HU, the eyes' muscles, the scalp) is where a small
segmentation model makes its largest false positives, and once such a component is bigger than the
real lesion, "keep the largest lesion" keeps it (on a development cohort 9 of 100 external cases
lost a correctly found lesion that way). Knowing where the brain is removes them.

Method: soft tissue (-20 to 100 HU; fat, air and bone excluded) is eroded in-plane by
`EROSION_MM`, which cuts the thin soft-tissue bridges through the skull (optic canals, skull-base
foramina, partial-volume gaps at the vertex); the largest connected eroded region is the brain;
dilated back by the same amount within the soft tissue, with each slice's holes filled (calcified
plexus, small dense spots), it is the intracranial space. Thresholds are physical HU, so this
works for any scanner whose values are HU. Where the result is not head-sized (a partial scan, a
phantom without bone, a broken image) it returns None, and callers keep what they had rather
than trusting a broken mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SOFT_HU = (-20.0, 100.0)  # CSF (5-15 HU, with noise) up to the densest clot; fat, air and bone excluded
EROSION_MM = 4.0  # wider than the skull's soft-tissue bridges, narrower than any part of the brain
BONE_HU = 300.0  # no voxel this dense: no skull, so no skull-bounded space to find
BRAIN_ML = (150.0, 2500.0)  # a head scan's intracranial soft tissue; outside it the mask is not trusted


def in_plane_disk(radius_mm: float, spacing_xyz) -> np.ndarray:
    """A (1, y, x) disk structuring element of `radius_mm` on the in-plane grid."""
    sx, sy = float(spacing_xyz[0]), float(spacing_xyz[1])
    ry, rx = max(int(radius_mm // sy), 1), max(int(radius_mm // sx), 1)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    return ((y * sy) ** 2 + (x * sx) ** 2 <= radius_mm**2 + 1e-6)[None]


def intracranial_mask(hu: np.ndarray, spacing_xyz) -> np.ndarray | None:
    """Boolean (z, y, x) mask of the intracranial soft tissue of `hu` (HU, spacing (x, y, z) mm),
    or None when no head-sized brain region is found."""
    hu = np.asarray(hu)
    if not (hu > BONE_HU).any():
        return None
    soft = (hu >= SOFT_HU[0]) & (hu <= SOFT_HU[1])
    disk = in_plane_disk(EROSION_MM, spacing_xyz)
    core = ndimage.binary_erosion(soft, structure=disk)
    labels, count = ndimage.label(core)  # face connectivity: a diagonal touch is no bridge
    if count == 0:
        return None
    sizes = ndimage.sum_labels(core, labels, index=np.arange(1, count + 1))
    brain = labels == 1 + int(np.argmax(sizes))
    brain = ndimage.binary_dilation(brain, structure=disk) & soft
    for z in range(brain.shape[0]):  # dense spots inside the brain (calcifications) are still inside
        brain[z] = ndimage.binary_fill_holes(brain[z])
    volume_ml = np.count_nonzero(brain) * float(np.prod(spacing_xyz)) / 1000.0
    if not BRAIN_ML[0] <= volume_ml <= BRAIN_ML[1]:
        return None
    return brain


def intracranial_fraction(mask: np.ndarray, brain: np.ndarray | None, spacing_xyz, margin_mm: float = 2.0) -> float:
    """Share of `mask`'s voxels within `margin_mm` (in-plane) of the intracranial space; NaN when
    the mask is empty or the space unknown."""
    mask = np.asarray(mask) != 0
    if brain is None or not mask.any():
        return float("nan")
    near = near_intracranial(brain, spacing_xyz, margin_mm)
    return float(np.count_nonzero(mask & near)) / float(np.count_nonzero(mask))


def near_intracranial(brain: np.ndarray, spacing_xyz, margin_mm: float) -> np.ndarray:
    """The intracranial space grown in-plane by `margin_mm` (partial volume at the inner table)."""
    return ndimage.binary_dilation(brain, structure=in_plane_disk(margin_mm, spacing_xyz)) if margin_mm > 0 else brain
