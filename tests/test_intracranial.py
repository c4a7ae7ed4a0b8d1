"""The intracranial space from HU, and dropping extracranial components of a predicted mask."""

from __future__ import annotations

import numpy as np

from common.data.intracranial import intracranial_fraction, intracranial_mask
from common.inference.postprocess import implausible_mask, keep_intracranial

SPACING = (2.0, 2.0, 5.0)  # (x, y, z) mm: the CPU profile's working grid


def head(seed=0):
    """(hu, brain): an ellipsoidal brain (30 HU, CSF-dense ventricles) in a 6 mm skull under 5 mm of
    muscle-dense scalp (50 HU), air around; 4 HU noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:30, 0:110, 0:100]
    # Ellipsoid radii (mm) of the brain; skull and scalp are shells around it.
    r = np.sqrt(((x - 50) * 2.0 / 70) ** 2 + ((y - 55) * 2.0 / 85) ** 2 + ((z - 15) * 5.0 / 65) ** 2)
    brain = r < 1.0
    skull = (r >= 1.0) & (r < 1.085)
    scalp = (r >= 1.085) & (r < 1.16)
    hu = np.full(r.shape, -1000.0)
    hu[brain], hu[skull], hu[scalp] = 30.0, 1000.0, 50.0
    ventricles = brain & (np.hypot((x - 50) * 2.0, (y - 55) * 2.0) < 12) & (abs(z - 15) < 3)
    hu[ventricles] = 8.0
    return (hu + rng.normal(0, 4, hu.shape)).astype(np.float32), brain


def test_intracranial_mask_is_the_brain_not_the_scalp():
    hu, brain = head()
    found = intracranial_mask(hu, SPACING)
    assert found is not None
    overlap = 2 * (found & brain).sum() / (found.sum() + brain.sum())
    assert overlap > 0.97  # measured 0.99
    scalp = (hu > 35) & (hu < 70) & ~brain
    assert not (found & scalp).any()


def test_no_head_sized_brain_returns_none():
    assert intracranial_mask(np.full((20, 60, 60), -1000.0, np.float32), SPACING) is None
    hu, _ = head()
    assert intracranial_mask(hu[14:15], SPACING) is None  # one slab holds far less than a brain


def test_extracranial_component_at_blood_density_is_dropped_and_the_lesion_kept():
    hu, brain = head()
    lesion = np.zeros(hu.shape, bool)
    lesion[12:17, 30:40, 28:38] = True  # inside, next to the ventricles
    hu[lesion] = 60.0
    muscle = np.zeros(hu.shape, bool)  # a bigger blob of scalp at blood density: the model's false positive
    z, y, x = np.mgrid[0:30, 0:110, 0:100]
    r = np.sqrt(((x - 50) * 2.0 / 70) ** 2 + ((y - 55) * 2.0 / 85) ** 2 + ((z - 15) * 5.0 / 65) ** 2)
    muscle[(r >= 1.085) & (r < 1.16) & (x > 80) & (abs(z - 15) < 4)] = True
    assert muscle.sum() > lesion.sum()
    kept = keep_intracranial(lesion | muscle, hu, SPACING).astype(bool)
    np.testing.assert_array_equal(kept, lesion)
    assert intracranial_fraction(lesion, intracranial_mask(hu, SPACING), SPACING) == 1.0
    assert intracranial_fraction(muscle, intracranial_mask(hu, SPACING), SPACING) < 0.2


def test_lobar_clot_against_the_inner_table_is_kept():
    hu, brain = head()
    z, y, x = np.mgrid[0:30, 0:110, 0:100]
    r = np.sqrt(((x - 50) * 2.0 / 70) ** 2 + ((y - 55) * 2.0 / 85) ** 2 + ((z - 15) * 5.0 / 65) ** 2)
    clot = brain & (r > 0.8) & (x > 75) & (abs(z - 15) < 3)  # a crescent touching the skull
    hu[clot] = 62.0
    np.testing.assert_array_equal(keep_intracranial(clot, hu, SPACING).astype(bool), clot)


def test_without_a_brain_the_mask_is_left_as_it_is():
    hu = np.full((20, 60, 60), 40.0, np.float32)  # no skull, no air: no head to find
    assert intracranial_mask(hu, SPACING) is None
    mask = np.zeros(hu.shape, np.uint8)
    mask[5:8, 10:20, 10:20] = 1
    np.testing.assert_array_equal(keep_intracranial(mask, hu, SPACING), mask)


def test_implausible_delivered_masks_are_named_and_a_hematoma_is_not():
    hu, brain = head()
    lesion = np.zeros(hu.shape, bool)
    lesion[12:17, 30:40, 28:38] = True
    hu[lesion] = 60.0
    assert implausible_mask(lesion, hu, SPACING) is None
    assert implausible_mask(np.zeros(hu.shape, bool), hu, SPACING) is None
    bone = (hu > 500) & (np.arange(hu.shape[2]) > 80)[None, None, :]  # a mask of skull
    assert "not acute blood" in implausible_mask(bone, hu, SPACING)
    z, y, x = np.mgrid[0:30, 0:110, 0:100]
    r = np.sqrt(((x - 50) * 2.0 / 70) ** 2 + ((y - 55) * 2.0 / 85) ** 2 + ((z - 15) * 5.0 / 65) ** 2)
    scalp = (r >= 1.085) & (r < 1.16) & (x > 70)  # muscle-dense scalp: blood's density, outside the skull
    assert "inside the skull" in implausible_mask(scalp, hu, SPACING)
