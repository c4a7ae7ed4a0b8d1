"""Head-CT plausibility: the body outline's span and the craniocaudal coverage."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.data.plausibility import anatomy_problems, body_span_mm, coverage_problems


def body(width_mm, depth_mm, spacing=(0.8, 0.8, 5.0), slices=4, table=False, direction=None):
    """An elliptical body of soft tissue in air; optionally a wide table below it, detached by foam."""
    n = int(max(width_mm, depth_mm) * 1.3 / spacing[0])
    _, y, x = np.mgrid[0:slices, 0:n, 0:n].astype(np.float32)
    c = (n - 1) / 2
    inside = ((x - c) * spacing[0] / (width_mm / 2)) ** 2 + ((y - c) * spacing[1] / (depth_mm / 2)) ** 2 <= 1
    hu = np.where(inside, 40.0, -1000.0).astype(np.float32)
    if table:
        hu[:, -4:-2, :] = 200.0  # a carbon table across the whole field, below the body
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_body_span_measures_the_largest_cross_section_without_the_table():
    left_right, front_back = body_span_mm(body(340, 250, table=True))
    assert left_right == pytest.approx(340, abs=2) and front_back == pytest.approx(250, abs=2)


def test_head_passes_and_trunk_is_flagged_in_any_stored_orientation():
    assert anatomy_problems(body(150, 190)) == []
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert anatomy_problems(body(150, 190, direction=ras)) == []
    problems = anatomy_problems(body(340, 250, direction=ras))
    assert len(problems) == 1 and "x 250 mm" in problems[0] and "not a head CT" in problems[0]


def test_short_scans_are_flagged():
    assert "covers only 10 mm craniocaudally (2 slice(s))" in coverage_problems(body(150, 190, slices=2))[0]
    assert coverage_problems(body(150, 190, slices=30)) == []
