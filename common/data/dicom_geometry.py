"""Acquisition geometry of a DICOM CT series: gantry tilt and uneven slice spacing.

ITK builds a volume from a series as if its slices were evenly spaced along their normal. Two
common acquisitions break that silently: a **gantry-tilted** head CT (tilted to spare the
orbits; the slice positions move along the table, not along the slice normal, so the volume is
sheared and ITK places the top slices centimetres away), and a series with **missing or
uneven slices** (an incomplete transfer, or thin posterior-fossa slices above thick ones; ITK
spreads the gap over every slice). Both change the physical size of the hematoma.

`regularize` rebuilds such a series on a regular grid in the slices' own orientation (the way
dcm2niix corrects tilt): each slice is shifted in-plane to its true position and the volume is
interpolated linearly along the slice normal at the median slice step. `sample_on_slices`
takes a result on that grid back onto the acquired slices (one frame per source image, as a
DICOM SEG needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
AIR_HU = -1024.0
STEP_TOLERANCE_MM = 0.01  # plus 1 % of the step: rounding in the stored positions
SHIFT_TOLERANCE_PX = 0.1  # in-plane drift of the slices that still counts as untilted


@dataclass(frozen=True)
class SliceStack:
    """Where each acquired slice lies, in the series' file order (GDCM's sort)."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient of each slice, mm (LPS)
    row: np.ndarray  # (3,) direction of increasing column index
    col: np.ndarray  # (3,) direction of increasing row index
    pixel_spacing: tuple[float, float]  # (along row, along column) mm
    shape: tuple[int, int]  # (rows, columns)

    @classmethod
    def from_reader(cls, reader: sitk.ImageSeriesReader, image: sitk.Image) -> "SliceStack | None":
        """The stack as `reader` (with its per-slice metadata) read it; None without positions."""
        n = image.GetDepth()
        if not all(reader.HasMetaDataKey(k, TAG_POSITION) for k in range(n)) \
                or not reader.HasMetaDataKey(0, TAG_ORIENTATION):
            return None
        positions = np.array([_numbers(reader.GetMetaData(k, TAG_POSITION), 3) for k in range(n)])
        orientation = _numbers(reader.GetMetaData(0, TAG_ORIENTATION), 6)
        row, col = orientation[:3], orientation[3:]
        return cls(positions, row / np.linalg.norm(row), col / np.linalg.norm(col),
                   (float(image.GetSpacing()[0]), float(image.GetSpacing()[1])),
                   (int(image.GetHeight()), int(image.GetWidth())))

    @classmethod
    def from_datasets(cls, datasets) -> "SliceStack":
        """The stack of pydicom datasets (file order kept): single-frame images, or one
        enhanced multi-frame image (frame order kept)."""
        if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
            return cls.from_multiframe(datasets[0])
        first = datasets[0]
        return cls._build([ds.ImagePositionPatient for ds in datasets], first.ImageOrientationPatient,
                          first.PixelSpacing, first.Rows, first.Columns)

    @classmethod
    def from_multiframe(cls, ds) -> "SliceStack":
        """The frames of an enhanced multi-frame image (Enhanced / Legacy Converted Enhanced CT):
        positions per frame, orientation and pixel spacing per frame or shared by all frames."""
        frames = list(getattr(ds, "PerFrameFunctionalGroupsSequence", []))
        if not frames:
            raise ValueError("multi-frame image without per-frame functional groups")
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None

        def per_frame(name: str, attribute: str) -> list:
            values = []
            for k, frame in enumerate(frames):
                group = frame if name in frame else shared if shared is not None and name in shared else None
                if group is None:
                    raise ValueError(f"frame {k + 1} has no {name}")
                values.append([float(v) for v in getattr(group[name][0], attribute)])
            return values

        orientations = per_frame("PlaneOrientationSequence", "ImageOrientationPatient")
        spacings = per_frame("PixelMeasuresSequence", "PixelSpacing")
        if not np.allclose(orientations, orientations[0], atol=1e-4) or not np.allclose(spacings, spacings[0]):
            raise ValueError("frames differ in orientation or pixel spacing (not one volume)")
        return cls._build(per_frame("PlanePositionSequence", "ImagePositionPatient"), orientations[0],
                          spacings[0], ds.Rows, ds.Columns)

    @classmethod
    def _build(cls, positions, orientation, pixel_spacing, rows, columns) -> "SliceStack":
        orientation = np.array([float(v) for v in orientation])
        row_spacing, column_spacing = (float(v) for v in pixel_spacing)  # DICOM: (between rows, columns)
        return cls(np.array([[float(v) for v in p] for p in positions]),
                   orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:]),
                   (column_spacing, row_spacing), (int(rows), int(columns)))

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row, self.col)
        return n / np.linalg.norm(n)

    def along_normal(self) -> np.ndarray:
        """Each slice's distance along the normal, mm."""
        return self.positions @ self.normal

    def in_plane_offsets(self) -> np.ndarray:
        """(n, 2) each slice origin's offset from the first slice's along (row, col), mm."""
        delta = self.positions - self.positions[0]
        return np.stack([delta @ self.row, delta @ self.col], axis=1)


def irregularity(stack: SliceStack) -> str | None:
    """What makes the stack irregular (gantry tilt, uneven steps), or None when ITK's evenly
    spaced, unsheared reading is exact. Two slices at one position are a ValueError."""
    distance = np.sort(stack.along_normal())
    steps = np.diff(distance)
    if steps.size == 0:
        return None
    if steps.min() < STEP_TOLERANCE_MM:
        at = float(distance[int(np.argmin(steps))])
        raise ValueError(f"two slices at the same position ({at:.2f} mm along the slice normal): "
                         "duplicate files or two acquisitions in one series")
    reasons = []
    step = float(np.median(steps))
    if np.abs(steps - step).max() > STEP_TOLERANCE_MM + 0.01 * step:
        gaps = steps > 1.5 * step
        reasons.append(f"slice spacing varies {steps.min():.2f}-{steps.max():.2f} mm"
                       + (f" ({int(gaps.sum())} gap(s): missing slices?)" if gaps.any() else ""))
    offsets = stack.in_plane_offsets() / np.asarray(stack.pixel_spacing)
    if np.hypot(offsets[:, 0], offsets[:, 1]).max() > SHIFT_TOLERANCE_PX:
        drift = np.hypot(*stack.in_plane_offsets()[-1])
        height = abs(stack.along_normal()[-1] - stack.along_normal()[0])
        reasons.append(f"gantry tilt {np.degrees(np.arctan2(drift, height)):.1f} deg")
    return "; ".join(reasons) or None


def regularize(volume: np.ndarray, stack: SliceStack) -> sitk.Image:
    """The stack's voxels (n, rows, columns, in file order) on a regular grid: direction
    (row, col, normal), in-plane spacing kept, slice step = the median step, in-plane extent
    grown to hold every shifted slice; linear interpolation along the normal."""
    order, distance, low, shifts, plane, step, n_out = _regular_grid(stack)
    rows, cols = stack.shape

    def placed(k: int) -> np.ndarray:  # slice k on the output plane at its true in-plane position
        canvas = np.full(plane, AIR_HU, dtype=np.float32)
        canvas[:rows, :cols] = volume[order[k]]
        if not shifts[k].any():
            return canvas
        return ndimage.shift(canvas, (shifts[k, 1], shifts[k, 0]), order=1, mode="constant", cval=AIR_HU)

    out = np.empty((n_out, *plane), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for j in range(n_out):
        target = distance[0] + j * step
        k = int(np.clip(np.searchsorted(distance, target, side="right") - 1, 0, len(distance) - 2))
        weight = float(np.clip((target - distance[k]) / (distance[k + 1] - distance[k]), 0.0, 1.0))
        cache = {i: cache[i] if i in cache else placed(i) for i in (k, k + 1)}
        out[j] = (1.0 - weight) * cache[k] + weight * cache[k + 1]
    image = sitk.GetImageFromArray(out)
    image.SetSpacing((*stack.pixel_spacing, step))
    first = stack.positions[order[0]]
    origin = first + low[0] * stack.pixel_spacing[0] * stack.row + low[1] * stack.pixel_spacing[1] * stack.col
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.column_stack([stack.row, stack.col, stack.normal]).ravel()))
    return image


def regular_size(stack: SliceStack) -> tuple[int, int, int]:
    """(columns, rows, slices) of the grid `regularize` builds, known before it allocates: slice
    positions far apart (a stray or corrupt position) can make it far larger than the series."""
    *_, plane, _, n_out = _regular_grid(stack)
    return plane[1], plane[0], n_out


def _regular_grid(stack: SliceStack):
    order = np.argsort(stack.along_normal())
    distance = stack.along_normal()[order]
    offsets = (stack.in_plane_offsets()[order] / np.asarray(stack.pixel_spacing))  # pixels (x, y)
    low = offsets.min(axis=0)
    shifts = offsets - low
    rows, cols = stack.shape
    plane = (rows + int(np.ceil(shifts[:, 1].max())), cols + int(np.ceil(shifts[:, 0].max())))
    step = float(np.median(np.diff(distance)))
    n_out = int(round((distance[-1] - distance[0]) / step)) + 1
    return order, distance, low, shifts, plane, step, n_out


def sample_on_slices(mask: sitk.Image, stack: SliceStack) -> np.ndarray:
    """(n, rows, columns) uint8: `mask` (any grid) at the pixel centres of each acquired slice,
    nearest neighbour, in file order; 0 outside the mask's grid."""
    rows, cols = stack.shape
    j, i = np.mgrid[0:rows, 0:cols]
    array = sitk.GetArrayViewFromImage(mask)
    direction = np.asarray(mask.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * np.asarray(mask.GetSpacing()))  # physical offset -> (x, y, z) index
    origin = np.asarray(mask.GetOrigin())
    size = np.asarray(mask.GetSize())
    frames = np.zeros((len(stack.positions), rows, cols), dtype=np.uint8)
    in_plane = (i[..., None] * stack.pixel_spacing[0] * stack.row + j[..., None] * stack.pixel_spacing[1] * stack.col)
    for k, position in enumerate(stack.positions):
        index = np.rint((in_plane + position - origin) @ to_index.T).astype(np.int64)
        inside = np.all((index >= 0) & (index < size), axis=-1)
        x, y, z = index[inside].T
        frames[k][inside] = array[z, y, x] > 0
    return frames


def _numbers(text: str, count: int) -> np.ndarray:
    values = np.array([float(v) for v in text.strip().split("\\")])
    if values.size != count:
        raise ValueError(f"expected {count} numbers, got {text!r}")
    return values
