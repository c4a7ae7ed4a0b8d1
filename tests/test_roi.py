"""ROI geometry: centred on the hematoma, the right physical size, the largest slices."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.preprocess import DEFAULT_WINDOWS, Geometry, Sample
from common.data.roi import extract_rois, hematoma_slices
from common.errors import DataError


def make_sample(mask: np.ndarray, spacing=(0.5, 0.5, 5.0), origin=(-40.0, -30.0, 0.0)) -> Sample:
    hu = np.where(mask > 0, 65.0, 30.0).astype(np.float32)
    geometry = Geometry(mask.shape[::-1], spacing, origin, tuple(np.eye(3).ravel()))
    return Sample("c1", "A", DEFAULT_WINDOWS, hu, mask.astype(np.uint8), spacing, geometry, geometry, 1)


def test_largest_slices_first():
    mask = np.zeros((6, 10, 10), np.uint8)
    mask[1, :2, :2] = 1  # area 4
    mask[3, :5, :5] = 1  # area 25
    mask[4, :3, :3] = 1  # area 9
    assert hematoma_slices(mask, 2) == [3, 4]
    assert hematoma_slices(mask, 5) == [3, 4, 1]


def test_roi_is_centred_on_the_hematoma_at_the_requested_physical_size():
    mask = np.zeros((5, 200, 200), np.uint8)
    # 20 mm x 10 mm block (x 40 px, y 20 px at 0.5 mm) centred at index (x=130, y=70).
    mask[2, 60:80, 110:150] = 1
    mask[1, 65:75, 120:140] = 1
    rois = extract_rois(make_sample(mask), k=2, size_mm=64.0, pixels=64)
    assert rois.images.shape == (2, 3, 64, 64) and rois.masks.shape == (2, 64, 64)
    assert rois.slices == [2, 1]
    assert rois.pixel_mm == pytest.approx(1.0)
    # Physical centre: origin + index * spacing.
    assert rois.centre_mm[0] == pytest.approx(-40.0 + 129.5 * 0.5, abs=0.3)
    assert rois.centre_mm[1] == pytest.approx(-30.0 + 69.5 * 0.5, abs=0.3)
    # At 1 mm pixels the 20 x 10 mm block covers ~200 pixels, centred in the crop.
    ys, xs = np.nonzero(rois.masks[0])
    assert rois.masks[0].sum() == pytest.approx(200, rel=0.1)
    assert xs.mean() == pytest.approx(31.5, abs=1.0) and ys.mean() == pytest.approx(31.5, abs=1.0)
    assert xs.max() - xs.min() + 1 == pytest.approx(20, abs=1) and ys.max() - ys.min() + 1 == pytest.approx(10, abs=1)
    # The blood window channel is bright inside the hematoma, dark in brain.
    # 65 HU in the (60, 40) window is 0.625; 30 HU brain is below the window.
    assert rois.images[0, 1][rois.masks[0] > 0].mean() == pytest.approx(0.625, abs=0.02)
    assert rois.images[0, 1][rois.masks[0] == 0].mean() < 0.05


def test_fewer_hematoma_slices_than_k_repeats_the_largest():
    mask = np.zeros((4, 40, 40), np.uint8)
    mask[2, 10:20, 10:20] = 1
    rois = extract_rois(make_sample(mask), k=3, size_mm=20.0, pixels=16)
    assert rois.slices == [2, 2, 2]
    np.testing.assert_array_equal(rois.images[0], rois.images[2])


def test_empty_mask_is_reported_not_dropped():
    with pytest.raises(DataError, match="A/c1: no hematoma in the mask"):
        extract_rois(make_sample(np.zeros((3, 20, 20), np.uint8)))
