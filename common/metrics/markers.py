"""Quantitative NCCT markers of a hematoma, from its HU volume and a (reference or predicted) mask.

These are the inputs of the marker baseline (``common.baselines``): what a radiologist's
checklist of HE signs measures, computed from the segmentation instead of read by eye.

Features (arrays are (z, y, x); ``spacing`` is (x, y, z) mm, as SimpleITK reports it):

* ``volume_ml``: voxel count x voxel volume; ``log_volume_ml`` its natural log (volume is right
  skewed and HE risk grows roughly with log volume).
* ``hu_mean``, ``hu_sd``, ``hu_cv`` (= SD / mean): density and its heterogeneity over the
  interior (see below); the coefficient of variation was the strongest single quantitative
  predictor in one clinical study.
* ``hypodense_fraction``: share of interior voxels at least ``hypodense_hu`` (default 18 HU)
  darker than the dense clot, the clot level being the interior's 75th HU percentile. 18 HU is
  the blend-sign density difference, the lower of the two published hypodensity thresholds
  (black hole: >= 28 HU), so the feature captures blend-sign halves and black holes alike; at a
  typical 4-6 HU noise SD it is 3+ noise SDs, so noise alone rarely reaches it. The clot level
  is the upper quartile rather than the median because a blend-sign hypodense part can take
  half of the hematoma, which drags the median halfway down.
* ``solidity``: volume / volume of the convex hull of the voxel cubes (1 for a box, lower for
  lobulated shapes and satellite islands, which stretch the hull). Digitisation lowers it too
  (a sphere of radius 10 voxels scores 0.87, 20 voxels 0.92; a 12 mm sphere on a 0.9 x 0.9 x 5 mm
  grid 0.79), less than surface-to-volume ratios of voxel faces, which overestimate the surface of
  any digital blob by ~50 %; the marker model also sees volume, which absorbs the size trend.
* ``n_components``: 3D connected components (26-connectivity) of at least ``min_component_ml``
  (default 0.01 mL), i.e. the hematoma and its separate islands.

Interior: the mask eroded by one voxel in-plane (slices are too thick to erode along z), so
partial-volume edge voxels, which mix clot with ~25-30 HU edema, do not count as hypodensities
or heterogeneity; small hematomas whose interior would be empty fall back to the whole mask.

Slice thickness: every marker but the volume is measured on axial slabs of ~5 mm
(``axial_slabs``), the thickness at which the published density markers were defined and NCCT
is read. A thin reconstruction (0.625-2.5 mm) of the same scan carries ~1.4-2.8x the per-voxel
noise, which would read as heterogeneity and hypodensity (and its finer staircase as a smoother
shape); averaging whole slices into slabs is what the scanner does for a thick reconstruction.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

MARKER_NAMES = ("log_volume_ml", "hu_mean", "hu_sd", "hu_cv", "hypodense_fraction", "solidity", "n_components")
MIN_INTERIOR_VOXELS = 20
SLAB_MM = 5.0  # markers are measured on axial slabs of at most this thickness (see the docstring)

# Fixed (centre, spread) per marker for the classifier's marker input: typical values of acute
# spontaneous ICH on NCCT (median volume ~12 mL, clot ~55-60 HU with SD ~10 HU), not fitted on
# any cohort, so that every site and every scan is scaled identically without sharing data.
MARKER_REFERENCE = {"log_volume_ml": (math.log(12.0), 1.2), "hu_mean": (58.0, 8.0), "hu_sd": (10.0, 5.0),
                    "hu_cv": (0.18, 0.1), "hypodense_fraction": (0.1, 0.1), "solidity": (0.7, 0.15),
                    "n_components": (1.0, 1.0)}
MARKER_CLIP = 4.0  # reference spreads; bounds the effect of a wild value (e.g. CV of a tiny mask)


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one voxel in-plane; the whole mask when that leaves too little."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    inner = ndimage.binary_erosion(mask, structure=structure)
    return inner if inner.sum() >= MIN_INTERIOR_VOXELS else mask


def axial_slabs(hu: np.ndarray, mask: np.ndarray, slice_mm: float,
                slab_mm: float = SLAB_MM) -> tuple[np.ndarray, np.ndarray, float]:
    """(hu, mask, slab thickness): runs of the largest whole number of consecutive axial slices
    not thicker than `slab_mm` averaged into one slab (a last, shorter run too); a slab voxel is
    hematoma when the mask covers at least half of it. Thicker slices are returned unchanged, and
    so is a hematoma too thin to keep a voxel in slabs."""
    factor = max(1, int(math.floor(slab_mm / slice_mm + 1e-6)))
    if factor == 1:
        return hu, mask, slice_mm
    starts = np.arange(0, hu.shape[0], factor)
    counts = np.diff(np.append(starts, hu.shape[0]))[:, None, None].astype(np.float32)
    slab_mask = np.add.reduceat(mask.astype(np.float32), starts, axis=0) / counts >= 0.5
    if not slab_mask.any():
        return hu, mask, slice_mm
    return np.add.reduceat(hu.astype(np.float32), starts, axis=0) / counts, slab_mask, slice_mm * factor


def count_components(mask: np.ndarray, voxel_ml: float, min_component_ml: float = 0.01) -> int:
    """3D connected components (26-connectivity) of at least min_component_ml."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel())[1:] * voxel_ml
    return int((sizes >= min_component_ml).sum())


def solidity(mask: np.ndarray, spacing_zyx) -> float:
    """Volume / volume of the convex hull of the voxel cubes (physical units), in (0, 1]."""
    boundary = mask & ~ndimage.binary_erosion(mask)
    idx = np.argwhere(boundary).astype(float)
    if len(idx) == 0:
        return float("nan")
    corners = np.array([[dz, dy, dx] for dz in (-0.5, 0.5) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
    points = np.unique((idx[:, None, :] + corners[None]).reshape(-1, 3), axis=0) * np.asarray(spacing_zyx)
    try:
        hull = ConvexHull(points)
    except QhullError:  # degenerate (flat) masks
        return 1.0
    volume = mask.sum() * float(np.prod(spacing_zyx))
    return float(min(volume / hull.volume, 1.0))


def marker_features(hu: np.ndarray, mask: np.ndarray, spacing, hypodense_hu: float = 18.0,
                    min_component_ml: float = 0.01) -> dict[str, float]:
    """The marker features of one hematoma (see the module docstring). Raises ValueError for an
    empty mask or mismatched shapes (the caller reports the case as excluded)."""
    hu = np.asarray(hu, dtype=np.float32)
    mask = np.asarray(mask) != 0
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"HU volume {hu.shape} and mask {mask.shape} must be the same 3D shape")
    if not mask.any():
        raise ValueError("empty hematoma mask")
    sx, sy, sz = (float(s) for s in spacing)
    volume = float(mask.sum() * sx * sy * sz / 1000.0)  # on the scan's own slices: exact
    hu, mask, sz = axial_slabs(hu, mask, sz)
    voxel_ml = sx * sy * sz / 1000.0
    values = hu[interior(mask)]
    mean, sd = float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0
    clot = float(np.percentile(values, 75))
    return {
        "volume_ml": volume,
        "log_volume_ml": math.log(max(volume, 1e-3)),
        "hu_mean": mean,
        "hu_sd": sd,
        "hu_cv": sd / mean if abs(mean) > 1e-6 else float("nan"),
        "hypodense_fraction": float((values <= clot - hypodense_hu).mean()),
        "solidity": solidity(mask, (sz, sy, sx)),
        "n_components": float(count_components(mask, voxel_ml, min_component_ml)),
    }


def marker_vector(features: dict[str, float]) -> np.ndarray:
    """The markers in MARKER_NAMES order on the fixed reference scale, clipped to +-MARKER_CLIP;
    a missing or non-finite marker counts as the reference value (0)."""
    out = np.zeros(len(MARKER_NAMES), np.float32)
    for i, name in enumerate(MARKER_NAMES):
        value = features.get(name)
        if value is not None and math.isfinite(float(value)):
            centre, spread = MARKER_REFERENCE[name]
            out[i] = np.clip((float(value) - centre) / spread, -MARKER_CLIP, MARKER_CLIP)
    return out
