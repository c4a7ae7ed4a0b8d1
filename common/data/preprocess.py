"""From a stored case to model input: canonical orientation, working spacing, HU windows.

Canonical orientation is SimpleITK's identity direction ('LPS': array axes x -> patient left,
y -> posterior, z -> superior), so numpy arrays are (z, y, x) with z running foot to head.
Spacings are (x, y, z) in mm, as SimpleITK reports them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from common.data.contract import Case
from common.data.image_limits import size_problem
from common.data.io import read_ct, read_mask, same_grid
from common.errors import ConfigError, DataError

CANONICAL = "LPS"
AXIS_ALIGNED_TOL = 1e-4
AIR_HU = -1024.0

# Default HU windows (level, width): brain, blood (separates clot 50-80 HU from brain), subdural.
DEFAULT_WINDOWS = ((40.0, 80.0), (60.0, 40.0), (75.0, 215.0))


@dataclass(frozen=True)
class Geometry:
    """Physical grid of an image, enough to map a result back onto the original scan."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def reference(self) -> sitk.Image:
        ref = sitk.Image(self.size, sitk.sitkUInt8)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref


@dataclass
class Sample:
    """One preprocessed case. Arrays are (z, y, x) on the working grid.

    The network input `image` is computed from `hu` when asked for, not stored: it is three times
    the size of the HU volume, and a simulated site's process keeps every case it has loaded (on
    the paper cohort 227 of a centre's 370 MiB went to stored window channels)."""

    case_id: str
    center: str
    windows: tuple  # the (level, width) HU windows of `image`
    hu: np.ndarray  # (z, y, x) float32 HU
    mask: np.ndarray | None  # (z, y, x) uint8 {0, 1}
    spacing: tuple[float, float, float]  # working spacing (x, y, z) mm
    original: Geometry  # grid of the stored image
    working: Geometry  # grid of the arrays above
    he: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def image(self) -> np.ndarray:
        """(C, z, y, x) float32 in [0, 1], one channel per HU window."""
        return window_channels(self.hu, self.windows)


def to_canonical(image: sitk.Image, is_mask: bool = False) -> sitk.Image:
    """Reorient to the identity direction; oblique scans (gantry tilt) are resampled onto an
    axis-aligned grid of the same spacing covering the whole volume."""
    image = sitk.DICOMOrient(image, CANONICAL)  # lossless axis permutation / flip
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if np.allclose(direction, np.eye(3), atol=AXIS_ALIGNED_TOL):
        return image
    return resample(image, image.GetSpacing(), is_mask)


def resample(image: sitk.Image, spacing, is_mask: bool = False, reference: sitk.Image | None = None) -> sitk.Image:
    """Resample onto an axis-aligned grid at `spacing` (x, y, z) covering the image's physical
    extent, or onto `reference` when given. Masks use nearest neighbour, images linear
    interpolation (unlike B-splines it cannot overshoot into impossible HU values)."""
    interpolator = sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear
    default = 0.0 if is_mask else AIR_HU
    if reference is None:
        reference = axis_aligned_grid(image, spacing)
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, image.GetPixelID())


def axis_aligned_grid(image: sitk.Image, spacing) -> sitk.Image:
    """An empty identity-direction image at `spacing` whose voxel centres cover `image`'s extent."""
    spacing = np.asarray(spacing, dtype=float)
    size = np.asarray(image.GetSize())
    corners = itertools.product(*[(-0.5, n - 0.5) for n in size])
    points = np.array([image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in corners])
    low, high = points.min(axis=0), points.max(axis=0)
    new_size = np.maximum(np.round((high - low) / spacing).astype(int), 1)
    # The grid follows the header's physical extent: a corrupt voxel spacing (metres, not mm) would
    # ask for billions of voxels, so the reading limit applies before anything is allocated.
    problem = size_problem(new_size)
    if problem:
        raise ValueError(f"resampled to {' x '.join(f'{v:g}' for v in spacing)} mm over its physical extent "
                         f"({' x '.join(f'{v:.0f}' for v in high - low)} mm): {problem}")
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkUInt8)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin((low + spacing / 2).tolist())
    ref.SetDirection(np.eye(3).ravel().tolist())
    return ref


def window_channels(hu: np.ndarray, windows=DEFAULT_WINDOWS) -> np.ndarray:
    """Stack one [0, 1] channel per (level, width) HU window: (z, y, x) -> (C, z, y, x)."""
    # MONAI's ScaleIntensityRange computes exactly this (bit for bit, tested), but importing MONAI
    # costs ~3 s in every ClientApp process that only reads scans (deployment starts one per message).
    hu = np.asarray(hu, np.float32)
    channels = []
    for level, width in _checked_windows(windows):
        low, high = level - width / 2, level + width / 2
        channels.append(np.clip((hu - low) / (high - low), 0.0, 1.0))
    return np.stack(channels).astype(np.float32)


def _checked_windows(windows) -> tuple:
    """`windows` as a tuple of (level, width) floats; a width <= 0 is a ConfigError now, not at first use."""
    out = tuple((float(level), float(width)) for level, width in windows)
    for level, width in out:
        if width <= 0:
            raise ConfigError(f"HU window width must be > 0, got ({level:g}, {width:g})")
    return out


def load_case(case: Case, spacing=None, windows=DEFAULT_WINDOWS, with_mask: bool = True) -> Sample:
    """Read, reorient, resample to `spacing` (None keeps the native spacing) and window one case."""
    image = read_ct(case.image_path)
    original = Geometry.of(image)
    mask_image = None
    if with_mask and case.mask_path is not None:
        mask_image = read_mask(case.mask_path)
        problem = same_grid(image, mask_image)
        if problem:
            raise DataError(case.mask_path, f"mask not on the image grid: {problem}")
    try:
        image = to_canonical(image)
        if spacing is not None and not np.allclose(image.GetSpacing(), spacing, rtol=1e-3):
            image = resample(image, spacing)
    except ValueError as err:  # the grid's size limit (axis_aligned_grid)
        raise DataError(case.image_path, str(err)) from err
    if mask_image is not None:
        mask_image = resample(mask_image, None, is_mask=True, reference=image)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    mask = sitk.GetArrayFromImage(mask_image).astype(np.uint8) if mask_image is not None else None
    return Sample(case.case_id, case.center, _checked_windows(windows), hu, mask,
                  tuple(image.GetSpacing()), original, Geometry.of(image), case.he,
                  {"storage": case.storage, "onset_to_ct_h": case.onset_to_ct_h})


def to_original_grid(array: np.ndarray, working: Geometry, original: Geometry, is_mask: bool = True) -> sitk.Image:
    """Map a (z, y, x) array on the working grid back onto the stored image's grid."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(working.spacing)
    image.SetOrigin(working.origin)
    image.SetDirection(working.direction)
    return resample(image, None, is_mask=is_mask, reference=original.reference())


def resample_sample(sample: Sample, spacing, windows=DEFAULT_WINDOWS) -> Sample:
    """The same case on another working grid (e.g. a classifier's native-grid sample brought to
    the segmentation model's spacing), without re-reading the file."""
    image = sitk.GetImageFromArray(sample.hu)
    image.SetSpacing(sample.working.spacing)
    image.SetOrigin(sample.working.origin)
    image.SetDirection(sample.working.direction)
    if not np.allclose(image.GetSpacing(), spacing, rtol=1e-3):
        image = resample(image, spacing)
    hu = sitk.GetArrayFromImage(image).astype(np.float32)
    return Sample(sample.case_id, sample.center, _checked_windows(windows), hu, None, tuple(image.GetSpacing()),
                  sample.original, Geometry.of(image), sample.he, dict(sample.meta))
