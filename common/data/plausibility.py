"""Does a volume look like a head NCCT in Hounsfield units? Checks shared by `hemex check` and
`hemex predict`.

A missing or wrong rescale slope/intercept is the most common export error and is invisible in a
viewer that auto-windows; a scan of another body part loads just as well. Either gives a
confident, meaningless HE probability (a probe: raw stored values read as a 90 mL hematoma with
probability 0.98), so both are caught from the values and the body outline alone.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# Air is -1000, brain 20-45, clot 50-90, bone up to ~3000; anything far outside means raw stored
# values or a wrong rescale.
HU_RANGE = (-1100.0, 4100.0)
AIR_BELOW_HU = -200.0
SOFT_TISSUE_HU = (0.0, 100.0)
MIN_SOFT_TISSUE_FRACTION = 0.01
MIN_PADDING_HU = -3100.0

# Body outline: everything denser than fat-free air (the head holder's foam stays below it).
BODY_HU = -300.0
# An adult head with scalp spans about 140-170 mm left-right and 180-210 mm front-back; a trunk
# spans 300 mm or more. 260 mm leaves room for large heads, hair, dressings and the nose.
MAX_HEAD_SPAN_MM = 260.0
MIN_COVERAGE_MM = 30.0  # a head CT covers 120-200 mm craniocaudally; fewer is a slab, not a head


def hu_problems(values: np.ndarray) -> list[str]:
    """Why a voxel array does not look like a head NCCT in Hounsfield units (empty if it does)."""
    if values.size == 0:
        return ["image has no voxels"]
    low, high = float(values.min()), float(values.max())
    if low == high:  # the other tests would only restate this one
        return [f"constant image (every voxel is {low:g})"]
    reasons = []
    # Scanners fill outside the reconstruction circle with one padding value (-2048, -3024...);
    # a single such value is not a calibration error.
    below = values[values < HU_RANGE[0]]
    if below.size and below.min() == below.max() and below.min() >= MIN_PADDING_HU:
        low = float(values[values >= HU_RANGE[0]].min())
    if low < HU_RANGE[0] or high > HU_RANGE[1]:
        reasons.append(f"values {low:g} to {high:g} outside [{HU_RANGE[0]:g}, {HU_RANGE[1]:g}]: "
                       "not in HU or rescale missing")
    if low > AIR_BELOW_HU:
        reasons.append(f"no voxel below {AIR_BELOW_HU:g} HU: probably not HU (rescale intercept missing?)")
    soft = np.count_nonzero((values >= SOFT_TISSUE_HU[0]) & (values <= SOFT_TISSUE_HU[1])) / values.size
    if soft < MIN_SOFT_TISSUE_FRACTION:
        reasons.append(f"only {soft:.2%} of voxels in the soft-tissue range [{SOFT_TISSUE_HU[0]:g}, "
                       f"{SOFT_TISSUE_HU[1]:g}] HU (a head CT has brain): not a head CT or not in HU")
    return reasons


def body_span_mm(image: sitk.Image) -> tuple[float, float]:
    """(left-right, front-back) extent in mm of the body's cross-section on the axial slice where
    it is largest; the largest connected region only, so a detached table does not count."""
    lps = sitk.DICOMOrient(image, "LPS")  # axes x: left-right, y: front-back (lossless permutation)
    body = sitk.GetArrayViewFromImage(lps) > BODY_HU
    if not body.any():
        return 0.0, 0.0
    z = int(np.argmax(body.reshape(body.shape[0], -1).sum(axis=1)))
    labels, count = ndimage.label(body[z])
    largest = labels == (1 + int(np.argmax(ndimage.sum_labels(body[z], labels, range(1, count + 1)))))
    ys, xs = np.nonzero(largest)
    sx, sy = lps.GetSpacing()[:2]
    return float((xs.max() - xs.min() + 1) * sx), float((ys.max() - ys.min() + 1) * sy)


def anatomy_problems(image: sitk.Image) -> list[str]:
    """Why the body in the image is not a head (empty if it could be)."""
    left_right, front_back = body_span_mm(image)
    if max(left_right, front_back) > MAX_HEAD_SPAN_MM:
        return [f"body cross-section {left_right:.0f} x {front_back:.0f} mm (left-right x front-back) is "
                f"larger than a head (<= {MAX_HEAD_SPAN_MM:.0f} mm): not a head CT?"]
    return []


def coverage_problems(image: sitk.Image) -> list[str]:
    """Why the scan is too short craniocaudally to hold a whole hematoma (empty if it is not)."""
    lps = sitk.DICOMOrient(image, "LPS")
    coverage = lps.GetDepth() * lps.GetSpacing()[2]
    if coverage < MIN_COVERAGE_MM:
        return [f"scan covers only {coverage:.0f} mm craniocaudally ({lps.GetDepth()} slice(s)); a head CT covers "
                "120-200 mm, so a hematoma may be cut off"]
    return []
