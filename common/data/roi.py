"""Hematoma-centred 2D regions of interest (ROIs) for the HE classifier and the generator.

Per case: the k axial slices with the largest hematoma area, each cropped to a square of fixed
physical size centred on the hematoma's in-plane centroid and resampled to a fixed pixel grid.
Channels are HU windows of the same slice (brain, blood, subdural) rather than adjacent slices:
with 5 mm slices neighbours are far apart, while the windows spread exactly the densities that
carry the NCCT markers (hypodensities, blend and black-hole signs, heterogeneity).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from common.data.preprocess import AIR_HU, DEFAULT_WINDOWS, Sample, window_channels
from common.errors import DataError


@dataclass
class CaseROIs:
    case_id: str
    center: str
    images: np.ndarray  # (k, C, P, P) float32 in [0, 1]
    masks: np.ndarray  # (k, P, P) uint8
    slices: list[int]  # source slice indices (canonical z), largest area first
    centre_mm: tuple[float, float]  # in-plane physical centre (x, y) of every crop
    pixel_mm: float
    he: int | None = None
    # The case's NCCT markers on the fixed reference scale (common.metrics.markers.marker_vector),
    # measured on the same mask: the marker input of a marker-fusion classifier.
    features: np.ndarray | None = None


def hematoma_slices(mask: np.ndarray, k: int) -> list[int]:
    """Indices of the k slices with the largest hematoma area (fewer if fewer slices have any)."""
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    order = [int(i) for i in np.argsort(-area, kind="stable") if area[i] > 0]
    return order[:k]


def extract_rois(sample: Sample, mask: np.ndarray | None = None, k: int = 3, size_mm: float = 80.0,
                 pixels: int = 64, windows=DEFAULT_WINDOWS) -> CaseROIs:
    """ROIs of one case from its HU volume and a hematoma mask (the reference mask or a
    segmentation). Raises DataError naming the case when there is no hematoma to centre on."""
    mask = sample.mask if mask is None else mask
    if mask is None or not mask.any():
        raise DataError(f"{sample.center}/{sample.case_id}", "no hematoma in the mask: cannot place an ROI")
    if mask.shape != sample.hu.shape:
        raise DataError(f"{sample.center}/{sample.case_id}", f"mask shape {mask.shape} differs from image {sample.hu.shape}")
    slices = hematoma_slices(mask, k)
    sx, sy, _ = sample.spacing
    ox, oy, _ = sample.working.origin
    _, ys, xs = np.nonzero(mask)
    centre = (ox + xs.mean() * sx, oy + ys.mean() * sy)
    pixel_mm = size_mm / pixels
    reference = sitk.Image([pixels, pixels], sitk.sitkFloat32)
    reference.SetSpacing((pixel_mm, pixel_mm))
    reference.SetOrigin((centre[0] - (pixels - 1) / 2 * pixel_mm, centre[1] - (pixels - 1) / 2 * pixel_mm))
    images, masks = [], []
    for z in slices:
        hu = _resample_slice(sample.hu[z], (sx, sy), (ox, oy), reference, sitk.sitkLinear, AIR_HU)
        roi_mask = _resample_slice(mask[z].astype(np.float32), (sx, sy), (ox, oy), reference, sitk.sitkNearestNeighbor, 0)
        images.append(window_channels(hu, windows))
        masks.append(roi_mask.astype(np.uint8))
    # Repeat the largest slices when the hematoma spans fewer than k slices: a fixed k per case
    # keeps batches rectangular and weights every case equally.
    n_real = len(slices)
    for i in range(k - n_real):
        images.append(images[i % n_real])
        masks.append(masks[i % n_real])
        slices.append(slices[i % n_real])
    return CaseROIs(sample.case_id, sample.center, np.stack(images), np.stack(masks), slices, centre, pixel_mm, sample.he)


def _resample_slice(array: np.ndarray, spacing, origin, reference: sitk.Image, interpolator, default) -> np.ndarray:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)
