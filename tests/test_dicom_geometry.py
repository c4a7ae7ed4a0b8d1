"""DICOM series whose slices ITK would misplace: gantry tilt, missing slices, duplicates.

The voxels hold a field linear in physical position (HU = 2x + 3y + 4z, mm), so wherever a slice
really lies its values are known exactly, and linear interpolation reproduces the field.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, io
from common.data.dicom_geometry import SliceStack, sample_on_slices
from common.errors import DataError

COEF = np.array([2.0, 3.0, 4.0])


def linear_field_series(folder, tilt_deg=0.0, size=(40, 36, 10), spacing=(1.0, 1.0, 5.0)):
    """Write a CT series whose slices lie where a scanner with `tilt_deg` gantry tilt puts them:
    the column direction tilts about x, the slice origins advance along the table (z) only."""
    t = np.deg2rad(tilt_deg)
    row, col, step = np.array([1.0, 0, 0]), np.array([0, np.cos(t), np.sin(t)]), np.array([0, 0, 1.0])
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, -18.0, 30.0))
    image.SetDirection(np.column_stack([row, col, step]).ravel().tolist())  # sheared when tilted
    k, j, i = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    points = (np.asarray(image.GetOrigin()) + i[..., None] * spacing[0] * row + j[..., None] * spacing[1] * col
              + k[..., None] * spacing[2] * step)
    values = np.asarray(points @ COEF, dtype=np.float32)
    stored = sitk.GetImageFromArray(values)
    stored.CopyInformation(image)
    dicom_io.write_dicom_series(stored, folder, "tilt")
    return values


def field_error(image: sitk.Image, margin: int = 2) -> float:
    """Largest |HU - field| over voxels at least `margin` voxels inside the acquired slab."""
    array = sitk.GetArrayFromImage(image)
    k, j, i = np.mgrid[0:array.shape[0], 0:array.shape[1], 0:array.shape[2]]
    index = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    points = np.asarray(image.GetOrigin()) + (index * np.asarray(image.GetSpacing())) @ direction.T
    expected = (points @ COEF).reshape(array.shape)
    inside = array > -1000  # the air around the shifted slices is not the field
    inside &= ndi_erode(inside, margin)
    return float(np.abs(array - expected)[inside].max())


def ndi_erode(mask: np.ndarray, margin: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=margin)


def test_gantry_tilted_series_is_rebuilt_where_its_slices_lie(tmp_path):
    linear_field_series(tmp_path / "tilt", tilt_deg=15.0)
    naive = sitk.ReadImage(dicom_io.dicom_series_files(tmp_path / "tilt"), sitk.sitkFloat32)
    assert field_error(naive) > 30  # ITK alone: the top slices sit ~13 mm off (x 3 HU/mm)
    notes = []
    image = io.read_ct(tmp_path / "tilt", notes)
    assert field_error(image) < 0.55  # the series stores whole HU: rounding only
    # True slice step along the normal: 5 mm x cos(15 deg); in-plane spacing unchanged.
    assert image.GetSpacing() == pytest.approx((1.0, 1.0, 5.0 * np.cos(np.deg2rad(15))), abs=1e-3)
    assert notes == ["DICOM series resampled to a regular 4.83 mm grid: gantry tilt 15.0 deg"]


def test_missing_slice_keeps_true_spacing_and_interpolates_the_gap(tmp_path):
    values = linear_field_series(tmp_path / "full")
    complete = io.read_ct(tmp_path / "full")
    files = dicom_io.dicom_series_files(tmp_path / "full")
    (tmp_path / "full" / files[4].split("/")[-1]).unlink()
    notes = []
    image = io.read_ct(tmp_path / "full", notes)
    assert image.GetSize() == complete.GetSize() and image.GetSpacing() == pytest.approx(complete.GetSpacing())
    assert image.GetOrigin() == pytest.approx(complete.GetOrigin(), abs=1e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), values, atol=0.51)  # stored HU are rounded
    assert "slice spacing varies 5.00-10.00 mm (1 gap(s): missing slices?)" in notes[0]


def test_regular_series_is_read_unchanged_without_notes(tmp_path):
    values = linear_field_series(tmp_path / "s")
    notes = []
    image = io.read_ct(tmp_path / "s", notes)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), np.round(values))
    assert notes == []


def test_two_slices_at_one_position_are_refused(tmp_path):
    linear_field_series(tmp_path / "s", size=(16, 16, 6))
    dicom_io.write_dicom_series(sitk.ReadImage(dicom_io.dicom_series_files(tmp_path / "s")[:2]), tmp_path / "copy", "tilt",
                          series_description="NCCT")  # same series UID, positions of slices 0 and 1
    for path in (tmp_path / "copy").iterdir():
        path.rename(tmp_path / "s" / f"dup-{path.name}")
    with pytest.raises(DataError, match=r"s: DICOM slice geometry: two slices at the same position"):
        io.read_ct(tmp_path / "s")


@pytest.mark.parametrize("tilt_deg", [0.0, 15.0])
def test_mask_on_the_read_grid_maps_back_onto_each_acquired_slice(tmp_path, tilt_deg):
    linear_field_series(tmp_path / "s", tilt_deg=tilt_deg)
    image = io.read_ct(tmp_path / "s")
    mask = sitk.Cast(image > 180.0, sitk.sitkUInt8)  # a level set of the field
    files = dicom_io.dicom_series_files(tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    acquired = reader.Execute()
    frames = sample_on_slices(mask, SliceStack.from_reader(reader, acquired))
    field = sitk.GetArrayFromImage(acquired)
    expected = field > 180.0
    if tilt_deg == 0:
        np.testing.assert_array_equal(frames, expected)  # the same voxels: exact
        return
    # Nearest neighbour may only differ within one voxel of the level set (the field changes by at
    # most (2 x 1 + 3 x 1 + 4 x 4.83) / 2 ~ 12 HU over half a voxel) or at the slab's shifted rim.
    clear = np.abs(field - 180.0) > 15.0
    clear[:, :3] = clear[:, -3:] = False
    assert clear.mean() > 0.6
    np.testing.assert_array_equal(frames[clear], expected[clear])


# ----------------------------------------------------------------------------- enhanced multi-frame

def test_enhanced_multiframe_image_reads_exactly_like_its_series(tmp_path, enhanced_copy):
    linear_field_series(tmp_path / "s")
    series = io.read_ct(tmp_path / "s")
    notes = []
    image = io.read_ct(enhanced_copy(tmp_path / "s", tmp_path / "mf"), notes)
    assert image.GetSize() == series.GetSize() and notes == []
    assert image.GetSpacing() == pytest.approx(series.GetSpacing())
    assert image.GetOrigin() == pytest.approx(series.GetOrigin(), abs=1e-4)
    assert image.GetDirection() == pytest.approx(series.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(series))


@pytest.mark.parametrize("tilt_deg, drop, problem", [(15.0, None, "gantry tilt 15.0 deg"),
                                                     (0.0, 4, "1 gap(s): missing slices?")])
def test_enhanced_multiframe_image_is_placed_by_its_frame_positions(tmp_path, enhanced_copy, tilt_deg, drop, problem):
    values = linear_field_series(tmp_path / "s", tilt_deg=tilt_deg)
    folder = enhanced_copy(tmp_path / "s", tmp_path / "mf", drop=drop)
    naive = sitk.ReadImage(str(folder / "enhanced.dcm"), sitk.sitkFloat32)
    assert field_error(naive) > 30  # GDCM stacks the frames at one step, unsheared
    notes = []
    image = io.read_ct(folder, notes)
    assert field_error(image) < 0.55  # stored whole HU: rounding only
    assert len(notes) == 1 and notes[0].startswith("enhanced DICOM frames resampled") and problem in notes[0]
    if drop is not None:  # the gap is interpolated on the true 5 mm grid
        assert image.GetSpacing() == pytest.approx((1.0, 1.0, 5.0))
        np.testing.assert_allclose(sitk.GetArrayFromImage(image), values, atol=0.51)


def test_enhanced_frames_with_their_own_rescales_read_in_hu(tmp_path, enhanced_copy):
    import copy

    import pydicom

    values = linear_field_series(tmp_path / "s", size=(16, 16, 6))
    path = enhanced_copy(tmp_path / "s", tmp_path / "mf") / "enhanced.dcm"
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    ascending = float(ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[2]) < \
        float(ds.PerFrameFunctionalGroupsSequence[-1].PlanePositionSequence[0].ImagePositionPatient[2])
    stored = ds.pixel_array.astype(np.int32) + 1024  # stored = HU + 1024 at the series' intercept
    for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):  # per frame: slope 0.5 or 1, intercepts vary
        item = copy.deepcopy(shared.PixelValueTransformationSequence[0])
        item.RescaleSlope, item.RescaleIntercept = ("0.5", str(-1024 - 7 * k)) if k % 2 else ("1", str(-1024 + 9 * k))
        frame.PixelValueTransformationSequence = pydicom.Sequence([item])
        hu = values[k if ascending else len(values) - 1 - k]  # the frame's true HU (rounded when stored)
        raw = (np.round(hu) - float(item.RescaleIntercept)) / float(item.RescaleSlope)
        stored[k] = np.round(raw)
    del shared.PixelValueTransformationSequence
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path)
    image = io.read_ct(tmp_path / "mf")
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), values, atol=1.01)  # slope 0.5 stores 2 HU steps
    bad = pydicom.dcmread(path)
    bad.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence[0].RescaleSlope = "0"
    bad.save_as(path)
    with pytest.raises(DataError, match=r"mf: enhanced DICOM frame geometry: a frame's rescale slope is 0"):
        io.read_ct(tmp_path / "mf")


def test_mask_maps_back_onto_each_enhanced_frame(tmp_path, enhanced_copy):
    import pydicom

    linear_field_series(tmp_path / "s")
    folder = enhanced_copy(tmp_path / "s", tmp_path / "mf")
    image = io.read_ct(folder)
    mask = sitk.Cast(image > 180.0, sitk.sitkUInt8)
    source = pydicom.dcmread(folder / "enhanced.dcm")
    frames = sample_on_slices(mask, SliceStack.from_datasets([source]))
    stored = source.pixel_array.astype(float) * float(source.SharedFunctionalGroupsSequence[0]
                                                      .PixelValueTransformationSequence[0].RescaleSlope) - 1024.0
    assert frames.shape == stored.shape and frames.sum() > 0
    np.testing.assert_array_equal(frames, stored > 180.0)  # frame k = the k-th stored frame, whatever its order
