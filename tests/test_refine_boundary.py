"""Native-resolution boundary refinement of a coarse predicted hematoma mask."""

from __future__ import annotations

import numpy as np
import pytest

from common.inference.postprocess import refine_boundary

SPACING = (0.5, 0.5, 5.0)  # (x, y, z) mm: a thin-pixel scan under a coarse working grid


def scan(seed=0, offset=0.0, clot=60.0, brain=30.0):
    """(hu, true mask): brain with 4 HU noise holding a lobulated clot over slices 2-6 of 9."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = 9, 120, 120
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    r = np.hypot((x - 60) * SPACING[0], (y - 60) * SPACING[1])
    angle = np.arctan2(y - 60, x - 60)
    radius = 11.0 + 2.5 * np.sin(3 * angle) + 1.5 * np.cos(5 * angle)  # mm: lobulated, not a disc
    truth = (r < radius) & (z >= 2) & (z <= 6)
    hu = np.where(truth, clot, brain) + rng.normal(0, 4, truth.shape) + offset
    return hu.astype(np.float32), truth


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def coarse(truth, shrink_mm=2.0):
    """What interpolating a 2 mm working-grid probability gives: a smooth, shrunken disc."""
    z, y, x = np.mgrid[0:truth.shape[0], 0:truth.shape[1], 0:truth.shape[2]]
    r = np.hypot((x - 60) * SPACING[0], (y - 60) * SPACING[1])
    return (r < 11.0 - shrink_mm) & truth.any(axis=(1, 2))[:, None, None]


def test_refinement_recovers_the_lobulated_boundary_of_a_shrunken_mask():
    hu, truth = scan()
    before = coarse(truth)
    after = refine_boundary(before, hu, SPACING).astype(bool)
    assert dice(before, truth) < 0.85
    assert dice(after, truth) > 0.95  # measured 0.97
    assert abs(after.sum() - truth.sum()) / truth.sum() < 0.05


def test_refinement_is_calibrated_on_the_scan_not_on_fixed_hu():
    hu, truth = scan(clot=50.0, brain=24.0)  # a less dense clot
    before = coarse(truth)
    reference = refine_boundary(before, hu, SPACING)
    assert dice(reference.astype(bool), truth) > 0.93
    for offset in (-8.0, 12.0):  # a scanner calibrated some HU off
        np.testing.assert_array_equal(refine_boundary(before, hu + offset, SPACING), reference)


def test_refinement_adds_no_bone_no_distant_blood_and_no_new_slice():
    hu, truth = scan()
    hu[:, :, 95:] = 1000.0  # skull 6 mm beyond the clot's furthest lobe
    hu[:, 60, 88:95] = 58.0  # a dense strand reaching from the clot to the bone: stays beyond the grow limit
    hu[1] = np.where(coarse(truth)[3], 60.0, hu[1])  # blood-dense voxels on a slice the model left empty
    after = refine_boundary(coarse(truth), hu, SPACING).astype(bool)
    assert not after[:, :, 95:].any()
    assert not after[1].any() and not after[0].any() and not after[7:].any()
    grown = np.hypot((np.argwhere(after)[:, 2] - 60) * SPACING[0], (np.argwhere(after)[:, 1] - 60) * SPACING[1])
    assert grown.max() <= 9.0 + 4.0 + 0.5  # coarse radius + REFINE_GROW_MM (+ half a pixel)


def test_refinement_keeps_the_mask_when_the_clot_is_not_denser_than_the_brain():
    hu, truth = scan(clot=34.0, brain=30.0)
    before = coarse(truth)
    np.testing.assert_array_equal(refine_boundary(before, hu, SPACING), before.astype(np.uint8))
    empty = np.zeros_like(before)
    np.testing.assert_array_equal(refine_boundary(empty, hu, SPACING), empty.astype(np.uint8))


@pytest.mark.parametrize("hypodense", [True, False])
def test_the_models_interior_stays_even_where_hypodense(hypodense):
    hu, truth = scan()
    if hypodense:  # a black hole: a 3 mm pocket 35 HU darker in the clot's centre
        z, y, x = np.mgrid[0:hu.shape[0], 0:hu.shape[1], 0:hu.shape[2]]
        hole = (np.hypot((x - 60) * SPACING[0], (y - 60) * SPACING[1]) < 3.0) & truth
        hu[hole] -= 35.0
    after = refine_boundary(coarse(truth), hu, SPACING).astype(bool)
    assert after[4, 60, 60] and dice(after, truth) > 0.95


def test_a_black_hole_the_model_left_out_is_filled():
    hu, truth = scan()
    z, y, x = np.mgrid[0:hu.shape[0], 0:hu.shape[1], 0:hu.shape[2]]
    hole = (np.hypot((x - 60) * SPACING[0], (y - 60) * SPACING[1]) < 4.0) & truth
    hu[hole] -= 35.0  # an enclosed hypodensity 35 HU darker than the clot
    before = coarse(truth) & ~hole  # the model drew a ring around it
    after = refine_boundary(before, hu, SPACING).astype(bool)
    assert not before[4, 60, 60] and after[hole].all()
    assert dice(after, truth) > 0.95
