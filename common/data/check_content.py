"""What `hemex check` finds inside one image or mask file, read with the same readers training
uses (`io.read_ct`, `io.read_mask`), so that whatever passes here also loads there. Each problem is
(path, reason); check.py reports it relative to DATA_ROOT."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from common.data import image_limits, io
from common.data.plausibility import anatomy_problems, hu_problems
from common.errors import DataError


def image_problems(path: Path) -> tuple[list[tuple[Path, str]], sitk.Image | None]:
    """Problems of one CT image, and the image when it could be read."""
    notes = []  # a series rebuilt on a regular grid loads, but the site should know (gaps: missing data)
    try:
        image = io.read_ct(path, notes)
    except DataError as err:  # unreadable, not 3D, not scalar, non-finite, DICOM series issues
        return [(err.path, err.reason)], None
    except RuntimeError as err:  # an ITK failure io did not anticipate must not abort the whole check
        return [(path, f"cannot read image: {image_limits.error_message(err)}")], None
    reasons = notes + hu_problems(sitk.GetArrayViewFromImage(image))
    if not reasons:  # the outline test assumes HU
        reasons += anatomy_problems(image)
    return [(path, reason) for reason in reasons], image


def axis_spacings(image: sitk.Image) -> tuple[list[float], float]:
    """(in-plane spacings, slice spacing) in mm, whatever order the axes are stored in.

    Reorienting to LPS (as preprocessing does) puts the axes closest to patient x and y first, so
    a scan stored sagittally or with swapped axes still reports its true slice spacing.
    """
    spacing = sitk.DICOMOrient(image, "LPS").GetSpacing()
    return [spacing[0], spacing[1]], spacing[2]


def mask_problems(path: Path, image: sitk.Image | None, he: int | None) -> list[tuple[Path, str]]:
    """Mask readable and a label mask (both `io.read_mask`, as training reads it), on the image grid,
    and not empty when the case is labelled."""
    try:
        mask = io.read_mask(path)
    except DataError as err:
        return [(err.path, err.reason)]
    except RuntimeError as err:
        return [(path, f"cannot read mask: {image_limits.error_message(err)}")]
    problems = []
    if image is not None:
        difference = io.same_grid(image, mask)
        if difference:
            problems.append((path, f"mask not on the image grid: {difference}"))
    if he is not None and not sitk.GetArrayViewFromImage(mask).any():
        problems.append((path, f"empty mask but he={he} is known: a labelled case must show its hematoma"))
    return problems
