"""Round trips through real NIfTI and DICOM files, and the preprocessing geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, io
from common.data.contract import Case
from common.data.preprocess import Geometry, load_case, resample, to_canonical, to_original_grid, window_channels
from common.errors import DataError


def known_volume(spacing=(0.45, 0.5, 5.2), origin=(-60.0, -70.5, 12.25), size=(20, 16, 7)):
    """A volume whose every voxel has a distinct integer HU, so any axis mix-up shows."""
    nx, ny, nz = size
    hu = (np.arange(nx * ny * nz).reshape(nz, ny, nx) % 2000 - 1000).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image, hu


@pytest.mark.parametrize("name, pixel", [("ct.nii.gz", sitk.sitkInt16), ("ct.nii", sitk.sitkFloat32),
                                         ("ct.nrrd", sitk.sitkInt16), ("ct.mha", sitk.sitkFloat32)])
@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LPI"])
def test_nifti_round_trip_exact_hu_and_geometry(tmp_path, name, pixel, orientation):
    image, hu = known_volume()
    stored = sitk.Cast(sitk.DICOMOrient(image, orientation), pixel)
    io.write_image(stored, tmp_path / name, compress=name.endswith(".gz"))
    back = io.read_ct(tmp_path / name)
    assert back.GetSpacing() == pytest.approx(stored.GetSpacing(), abs=1e-5)
    assert back.GetOrigin() == pytest.approx(stored.GetOrigin(), abs=1e-4)
    assert back.GetDirection() == pytest.approx(stored.GetDirection(), abs=1e-6)
    canonical = to_canonical(back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(canonical), hu)
    assert canonical.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-4)
    assert canonical.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-5)


def test_dicom_round_trip_exact_hu_geometry_and_rescale(tmp_path):
    image, hu = known_volume()
    dicom_io.write_dicom_series(image, tmp_path / "series", patient_id="p1")
    files = sorted((tmp_path / "series").iterdir())
    assert len(files) == image.GetDepth()
    raw = sitk.ReadImage(str(files[0]))  # one slice: stored values carry the -1024 intercept
    assert raw.GetMetaData(dicom_io.TAG_RESCALE_INTERCEPT).strip() == "-1024"
    assert raw.GetMetaData(dicom_io.TAG_MODALITY).strip() == "CT"
    back = io.read_ct(tmp_path / "series")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu)
    assert back.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-4)
    assert back.GetOrigin() == pytest.approx(image.GetOrigin(), abs=1e-4)


@pytest.mark.parametrize("compression", ["RLE", "JPEG2000", "JPEG"])
def test_compressed_dicom_series_read_exactly(tmp_path, compression):
    """PACS exports often compress losslessly: RLE (written with pydicom), JPEG 2000 and JPEG
    lossless (written with GDCM) must give the same HU and geometry as the plain series."""
    import pydicom
    from pydicom.uid import RLELossless

    image, hu = known_volume(size=(20, 16, 5))
    dicom_io.write_dicom_series(image, tmp_path / "plain", patient_id="p5")
    (tmp_path / "packed").mkdir()
    for file in (tmp_path / "plain").iterdir():
        if compression == "RLE":
            ds = pydicom.dcmread(file)
            ds.compress(RLELossless)
            ds.save_as(tmp_path / "packed" / file.name)
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(file))
        reader.SetOutputPixelType(sitk.sitkInt16)
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(tmp_path / "packed" / file.name))
        writer.KeepOriginalImageUIDOn()
        writer.UseCompressionOn()
        writer.SetCompressor(compression)
        writer.Execute(reader.Execute())
    syntax = pydicom.dcmread(next((tmp_path / "packed").iterdir()), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    back = io.read_ct(tmp_path / "packed")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), hu)
    assert back.GetSpacing() == pytest.approx(image.GetSpacing(), abs=1e-4)
    assert io.slice_spacing_mm(tmp_path / "packed") == pytest.approx(5.2, abs=1e-3)


def test_dicom_non_ct_modality_is_refused(tmp_path):
    image, _ = known_volume()
    dicom_io.write_dicom_series(image, tmp_path / "mr", patient_id="p2", extra_tags={"0008|0060": "MR"})
    with pytest.raises(DataError, match=r"mr: DICOM modality is 'MR', expected 'CT'"):
        io.read_ct(tmp_path / "mr")


def test_broken_file_gives_one_line_error_naming_it(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError) as err:
        io.read_ct(bad)
    assert str(err.value).startswith(str(bad)) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "mask.nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, name):
    # ITK's NIfTI reader zero-fills a short file and reports success; hemex must not.
    image, _ = known_volume(size=(64, 64, 12))
    io.write_image(sitk.Cast(image, sitk.sitkInt16), tmp_path / name, compress=name.endswith(".gz"))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * 0.6)])
    read = io.read_mask if name.startswith("mask") else io.read_ct
    with pytest.raises(DataError, match=rf"{name}: file is truncated") as err:
        read(tmp_path / name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_metaimage_is_named_as_such(tmp_path, compress):
    image, hu = known_volume()
    path = tmp_path / "ct.mha"
    sitk.WriteImage(image, str(path), useCompression=compress)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_ct(path)), hu)  # complete: read as written
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DataError, match=r"ct.mha: file is truncated: \d+ bytes of voxel data where its header "
                                        r"needs \d+"):  # ITK alone: "No such file or directory"
        io.read_ct(path)
    sitk.WriteImage(image, str(tmp_path / "pair.mhd"))  # header + separate data file
    (tmp_path / "pair.raw").unlink()
    with pytest.raises(DataError, match=r"pair.mhd: voxel data file 'pair.raw' \(ElementDataFile\) not found"):
        io.read_ct(tmp_path / "pair.mhd")


def test_empty_file_and_uncompressed_nifti_named_gz(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.nii.gz: file is empty \(0 bytes\)"):
        io.read_ct(tmp_path / "empty.nii.gz")
    # A plain NIfTI under a .nii.gz name is complete and readable: no false alarm.
    image, hu = known_volume()
    io.write_image(image, tmp_path / "plain.nii", compress=False)
    (tmp_path / "plain.nii").rename(tmp_path / "plain.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_ct(tmp_path / "plain.nii.gz")), hu)
    # A MetaImage converted from NIfTI carries the NIfTI header keys in its metadata: not checked as NIfTI.
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "plain.nii.gz")), str(tmp_path / "converted.mha"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_ct(tmp_path / "converted.mha")), hu)


def test_slice_spacing_from_headers_whatever_the_storage(tmp_path, enhanced_copy):
    image, _ = known_volume()  # slices 5.2 mm apart
    io.write_image(sitk.PermuteAxes(image, [2, 0, 1]), tmp_path / "permuted.nii.gz")  # slice axis stored first
    assert io.slice_spacing_mm(tmp_path / "permuted.nii.gz") == pytest.approx(5.2)
    io.write_image(sitk.DICOMOrient(image, "RAI"), tmp_path / "flipped.nrrd")
    assert io.slice_spacing_mm(tmp_path / "flipped.nrrd") == pytest.approx(5.2)
    dicom_io.write_dicom_series(image, tmp_path / "series", "P9")
    assert io.slice_spacing_mm(tmp_path / "series") == pytest.approx(5.2, abs=1e-4)
    gapped = enhanced_copy(tmp_path / "series", tmp_path / "enhanced", drop=3)  # GDCM alone reads 1 mm here
    assert io.slice_spacing_mm(gapped) == pytest.approx(5.2, abs=1e-4)  # the median step, as read_ct rebuilds it
    with pytest.raises(DataError, match="missing.nii.gz"):
        io.slice_spacing_mm(tmp_path / "missing.nii.gz")


def test_broken_or_stray_files_beside_a_series_are_left_out_with_a_note(tmp_path):
    import pydicom

    image, hu = known_volume()
    dicom_io.write_dicom_series(image, tmp_path / "s", "P1")
    files = dicom_io.dicom_series_files(tmp_path / "s")  # position order
    data = open(files[3], "rb").read()
    open(files[3], "wb").write(data[: len(data) // 2])  # an interrupted transfer, mid-volume
    (tmp_path / "s" / "zero.dcm").write_bytes(b"")
    (tmp_path / "s" / "README.txt").write_text("exported by PACS\n")  # not DICOM: not reported
    localizer = pydicom.dcmread(files[0])  # a scout in the same series: another image size
    localizer.Rows = localizer.Columns = 8
    localizer.PixelData = np.zeros((8, 8), np.int16).tobytes()
    localizer.SOPInstanceUID += ".9"
    localizer.ImagePositionPatient = [0, 0, -300]
    localizer.save_as(tmp_path / "s" / "scout.dcm")
    notes = []
    read = io.read_ct(tmp_path / "s", notes)
    assert read.GetSize() == image.GetSize() and read.GetSpacing() == pytest.approx(image.GetSpacing())
    array = sitk.GetArrayFromImage(read)
    np.testing.assert_array_equal(np.delete(array, 3, axis=0), np.delete(hu, 3, axis=0))  # the rest, exact
    np.testing.assert_allclose(array[3], (hu[2] + hu[4]) / 2)  # the lost slice, interpolated
    left_out = f"{files[3].split('/')[-1]}, scout.dcm, zero.dcm"
    assert notes[0] == f"3 DICOM file(s) in the folder left out of the volume (unreadable, no pixel data or " \
                       f"another image size): {left_out}"
    assert "1 gap(s): missing slices?" in notes[1]


def test_write_image_is_atomic(tmp_path, monkeypatch):
    image, _ = known_volume()
    target = tmp_path / "out.nii.gz"
    io.write_image(image, target)
    before = target.read_bytes()

    def crash(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    with pytest.raises(RuntimeError):
        io.write_image(image * 2, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_oblique_scan_is_resampled_axis_aligned_keeping_physical_positions():
    # A field linear in position: linear interpolation reproduces it exactly inside the volume.
    k, j, i = np.mgrid[0:8, 0:24, 0:24]
    image = sitk.GetImageFromArray((3.0 * i + 5.0 * j + 7.0 * k).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 3.0))
    tilt = np.deg2rad(15)
    image.SetDirection([1, 0, 0, 0, np.cos(tilt), -np.sin(tilt), 0, np.sin(tilt), np.cos(tilt)])
    canonical = to_canonical(image)
    assert canonical.GetDirection() == pytest.approx(np.eye(3).ravel().tolist())
    centre = image.TransformContinuousIndexToPhysicalPoint([11.5, 11.5, 3.5])
    expected = 3.0 * 11.5 + 5.0 * 11.5 + 7.0 * 3.5
    sampled = canonical.EvaluateAtPhysicalPoint(centre, sitk.sitkLinear)
    assert sampled == pytest.approx(expected, abs=1e-3)


def test_load_case_resamples_image_and_mask_to_working_spacing(tmp_path):
    hu = np.full((10, 40, 40), 30.0, dtype=np.float32)
    hu[:, :, :4] = -1000
    mask = np.zeros(hu.shape, dtype=np.uint8)
    mask[3:7, 10:30, 10:30] = 1  # 4 x 20 x 20 voxels of 0.5 x 0.5 x 5 mm = 1.25 uL each: 2 mL
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.5, 0.5, 5.0))
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(image)
    io.write_image(sitk.DICOMOrient(image, "RAS"), tmp_path / "c.nii.gz")
    io.write_image(sitk.DICOMOrient(mask_image, "RAS"), tmp_path / "m.nii.gz")
    case = Case("A", "c", 1, tmp_path / "c.nii.gz", tmp_path / "m.nii.gz")
    sample = load_case(case, spacing=(1.0, 1.0, 5.0))
    assert sample.hu.shape == (10, 20, 20)
    assert sample.spacing == pytest.approx((1.0, 1.0, 5.0))
    assert sample.image.shape == (3, 10, 20, 20)
    assert sample.mask.sum() * sample.voxel_ml == pytest.approx(2.0, rel=0.05)
    assert sample.hu[5, 10, 10] == pytest.approx(30.0)
    assert sample.original == Geometry.of(io.read_ct(tmp_path / "c.nii.gz"))
    back = to_original_grid(sample.mask, sample.working, sample.original)
    assert back.GetSize() == sample.original.size
    assert back.GetDirection() == pytest.approx(sample.original.direction)
    assert sitk.GetArrayFromImage(back).sum() == mask.sum()


def test_mask_on_another_grid_is_refused(tmp_path):
    image, _ = known_volume()
    io.write_image(image, tmp_path / "c.nii.gz")
    shifted = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    shifted.CopyInformation(image)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    io.write_image(shifted, tmp_path / "m.nii.gz")
    with pytest.raises(DataError, match=r"m.nii.gz: mask not on the image grid: origin"):
        load_case(Case("A", "c", 0, tmp_path / "c.nii.gz", tmp_path / "m.nii.gz"))


def test_window_channels_map_each_window_to_unit_range():
    hu = np.array([-1000.0, 0.0, 40.0, 60.0, 80.0, 2000.0], dtype=np.float32)
    channels = window_channels(hu, windows=((40.0, 80.0), (60.0, 40.0)))
    np.testing.assert_allclose(channels[0], [0, 0, 0.5, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(channels[1], [0, 0, 0, 0.5, 1.0, 1.0])


def test_window_channels_are_monais_intensity_scaling_bit_for_bit():
    """The windows are computed without importing MONAI (seconds per ClientApp process); the
    values must stay exactly what MONAI's ScaleIntensityRange gives, which trained models expect."""
    from monai.transforms import ScaleIntensityRange

    hu = (np.random.default_rng(0).standard_normal((6, 40, 40)) * 300).astype(np.float32)
    windows = ((40.0, 80.0), (60.0, 40.0), (75.0, 215.0), (35.5, 70.3))
    ours = window_channels(hu, windows)
    for channel, (level, width) in zip(ours, windows):
        monai = ScaleIntensityRange(a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True,
                                    dtype=np.float32)(hu)
        assert channel.dtype == np.float32 and np.array_equal(channel, np.asarray(monai))


def test_resample_mask_stays_binary():
    mask = sitk.GetImageFromArray(np.pad(np.ones((3, 5, 5), np.uint8), 2))
    out = resample(mask, (0.37, 0.37, 0.9), is_mask=True)
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= {0, 1}
