"""Hostile or broken input files: each refused with one line naming the file and what is wrong,
by `hemex check` and by the training loaders alike (they share `io`'s readers), never by an
allocation, a silent zero or a parser's own exception."""

from __future__ import annotations

import gzip
import resource
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, image_limits, io
from common.data.check import check_data_root
from common.data.contract import Case
from common.data.preprocess import load_case
from common.errors import ConfigError, DataError


def problems_of(root: Path) -> list[str]:
    problems, _ = check_data_root(root)
    return [str(p) for p in problems]


# ----------------------------------------------------------------------------------------------
# Voxel limit, from the header


def write_zero_bomb(path: Path, n: int = 2048) -> Path:
    """A valid n^3 all-zero uint8 .nii.gz (8 GiB of voxels for n = 2048) in about 8 MB: a NIfTI
    header claiming n^3, then one 16 MiB run of compressed zeros repeated as concatenated gzip
    members (one stream to every gzip reader). `gzip -dc` of it yields 352 + n^3 bytes."""
    tiny = path.with_name("tiny.nii")
    sitk.WriteImage(sitk.Image([1, 1, 1], sitk.sitkUInt8), str(tiny))
    header = bytearray(tiny.read_bytes()[:352])  # 348-byte NIfTI-1 header + 4-byte extension flag
    tiny.unlink()
    struct.pack_into("<3h", header, 42, n, n, n)  # dim[1..3]
    chunk = 1 << 24
    zeros = gzip.compress(bytes(chunk), compresslevel=9, mtime=0)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(bytes(header), mtime=0))
        for _ in range(n ** 3 // chunk):
            handle.write(zeros)
    return path


@pytest.fixture(scope="session")
def zero_bomb(tmp_path_factory) -> Path:
    return write_zero_bomb(tmp_path_factory.mktemp("bomb") / "bomb.nii.gz")


BOMB_REASON = ("image size 2048 x 2048 x 2048 (8,589,934,592 voxels) is over hemex's limit of 1,073,741,824 "
               "voxels (HEMEX_MAX_VOXELS sets it); not read")


def test_the_bomb_is_what_it_claims(zero_bomb):
    assert zero_bomb.stat().st_size < 10_000_000
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(zero_bomb))
    reader.ReadImageInformation()
    assert reader.GetSize() == (2048, 2048, 2048)
    with gzip.open(zero_bomb) as stream:  # a complete stream, not a truncated header
        assert len(stream.read(352 + (1 << 20))) == 352 + (1 << 20)


@pytest.mark.parametrize("read", [io.read_ct, io.read_mask])
def test_a_2048_cubed_zero_nifti_is_refused_from_its_header_without_allocating(zero_bomb, read):
    # Decompressing it takes ~30 s here and reading it allocates 8-32 GiB: neither may happen.
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        read(zero_bomb)
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100 * 1024
    assert str(err.value) == f"{zero_bomb}: {BOMB_REASON}"


def test_check_and_the_training_loader_refuse_the_bomb_alike(cohort, zero_bomb):
    shutil.copy(zero_bomb, cohort / "A/images/a3.nii.gz")  # a3: no mask
    shutil.copy(zero_bomb, cohort / "A/masks/a2.nii.gz")
    start = time.perf_counter()
    assert problems_of(cohort) == [f"A/masks/a2.nii.gz: {BOMB_REASON}", f"A/images/a3.nii.gz: {BOMB_REASON}"]
    assert time.perf_counter() - start < 10.0  # the rest of the cohort is read as usual
    with pytest.raises(DataError, match=r"a3.nii.gz: image size 2048 x 2048 x 2048 .* not read$"):
        load_case(Case("A", "a3", None, cohort / "A/images/a3.nii.gz", None), spacing=(2.0, 2.0, 5.0))
    with pytest.raises(DataError, match=r"masks/a2.nii.gz: image size 2048 x 2048 x 2048 .* not read$"):
        load_case(Case("A", "a2", 0, cohort / "A/images/a2.nii", cohort / "A/masks/a2.nii.gz"))


def test_the_limit_applies_to_every_format_and_can_be_set(tmp_path, monkeypatch, head_ct, enhanced_copy):
    image, _ = head_ct()  # 24 x 24 x 6 = 3456 voxels
    io.write_image(image, tmp_path / "ct.nrrd")
    dicom_io.write_dicom_series(image, tmp_path / "series", "p1")
    enhanced_copy(tmp_path / "series", tmp_path / "enhanced")
    monkeypatch.setenv(image_limits.MAX_VOXELS_ENV, "3456")
    for path in (tmp_path / "ct.nrrd", tmp_path / "series", tmp_path / "enhanced"):
        assert io.read_ct(path).GetSize() == (24, 24, 6)
    monkeypatch.setenv(image_limits.MAX_VOXELS_ENV, "3455")
    limit = "(3,456 voxels) is over hemex's limit of 3,455 voxels (HEMEX_MAX_VOXELS sets it); not read"
    with pytest.raises(DataError) as err:
        io.read_ct(tmp_path / "ct.nrrd")
    assert str(err.value) == f"{tmp_path / 'ct.nrrd'}: image size 24 x 24 x 6 {limit}"
    for name in ("series", "enhanced"):
        with pytest.raises(DataError) as err:
            io.read_ct(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: DICOM series size 24 x 24 x 6 {limit}"
    monkeypatch.setenv(image_limits.MAX_VOXELS_ENV, "lots")
    with pytest.raises(ConfigError, match=r"^HEMEX_MAX_VOXELS='lots': expected a whole number of voxels >= 1$"):
        io.read_ct(tmp_path / "ct.nrrd")


# ----------------------------------------------------------------------------------------------
# Non-finite voxels in float data


def with_values(image: sitk.Image, dtype, change) -> sitk.Image:
    array = sitk.GetArrayFromImage(image).astype(dtype)
    change(array)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def nan_slab(array: np.ndarray) -> None:
    array[2:4] = np.nan  # two of six slices
    array[0, 0, 0] = np.inf
    array[5, 0, 0] = -np.inf


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_and_infinite_voxels_of_a_float_nifti_are_found_in_the_raw_data(tmp_path, head_ct, name, dtype):
    image, _ = head_ct()  # 24 x 24 x 6
    sitk.WriteImage(with_values(image, dtype, nan_slab), str(tmp_path / name))
    # Why the raw data: ITK's NIfTI reader hands back 0 for every NaN and infinite value.
    assert np.isfinite(sitk.GetArrayViewFromImage(sitk.ReadImage(str(tmp_path / name)))).all()
    reason = ("1,154 of 3,456 stored float values are NaN or infinite (ITK's NIfTI reader would silently turn "
              "them into 0)")
    for read in (io.read_ct, io.read_mask):
        with pytest.raises(DataError) as err:
            read(tmp_path / name)
        assert str(err.value) == f"{tmp_path / name}: {reason}"


def test_a_value_split_between_two_read_chunks_is_counted(tmp_path):
    # Float64 voxels from byte 352, chunks of 4 MiB after the 540 header bytes: value 524311
    # straddles the first chunk boundary.
    array = np.zeros((160, 64, 64))
    array.flat[524311] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "big.nii"))
    with pytest.raises(DataError, match=r"big.nii: 1 of 655,360 stored float values are NaN or infinite"):
        io.read_ct(tmp_path / "big.nii")


def test_other_formats_report_non_finite_voxels_with_their_count(tmp_path, head_ct):
    image, _ = head_ct()
    sitk.WriteImage(with_values(image, np.float32, nan_slab), str(tmp_path / "ct.nrrd"))
    with pytest.raises(DataError) as err:
        io.read_ct(tmp_path / "ct.nrrd")
    assert str(err.value) == f"{tmp_path / 'ct.nrrd'}: 1,154 of 3,456 voxel values are NaN or infinite"


def test_check_and_the_training_loader_refuse_a_nan_scan_alike(cohort):
    image = sitk.ReadImage(str(cohort / "A/images/a1.nii.gz"))
    sitk.WriteImage(with_values(image, np.float32, nan_slab), str(cohort / "A/images/a1.nii.gz"))
    reason = "1,154 of 3,456 stored float values are NaN or infinite"
    problems = problems_of(cohort)
    assert len(problems) == 1 and problems[0].startswith(f"A/images/a1.nii.gz: {reason}")
    case = Case("A", "a1", 1, cohort / "A/images/a1.nii.gz", cohort / "A/masks/a1.nii.gz")
    with pytest.raises(DataError, match=f"a1.nii.gz: {reason}"):
        load_case(case, spacing=(2.0, 2.0, 5.0))


def big_endian_nifti(path: Path, array: np.ndarray) -> Path:
    """A minimal single-file NIfTI-1 in big-endian byte order (as some old scanners wrote them)."""
    header = bytearray(348)
    struct.pack_into(">i", header, 0, 348)
    struct.pack_into(">8h", header, 40, 3, *array.shape[::-1], 1, 1, 1, 1)  # dim: x, y, z
    struct.pack_into(">2h", header, 70, 16, 32)  # datatype FLOAT32, bitpix
    struct.pack_into(">8f", header, 76, 1, 1, 1, 1, 0, 0, 0, 0)  # pixdim
    struct.pack_into(">2f", header, 108, 352, 1)  # vox_offset, scl_slope
    header[344:348] = b"n+1\0"
    path.write_bytes(bytes(header) + bytes(4) + array.astype(">f4").tobytes())
    return path


def test_a_big_endian_float_nifti_is_read_in_its_own_byte_order(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(6, 5, 4) - 60
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_ct(big_endian_nifti(tmp_path / "be.nii", array))),
                                  array)
    array[1, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"be.nii: 1 of 120 stored float values are NaN or infinite"):
        io.read_ct(big_endian_nifti(tmp_path / "be.nii", array))


def with_pixdim(path: Path, axis: int, value: float) -> Path:
    """Overwrite pixdim[axis] of a NIfTI-1 file written by ITK (gzipped or not)."""
    raw = path.read_bytes()
    gz = raw[:2] == b"\x1f\x8b"
    data = bytearray(gzip.decompress(raw) if gz else raw)
    struct.pack_into("<f", data, 76 + 4 * axis, value)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return path


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
@pytest.mark.parametrize("axis, value", [(3, 0.0), (1, float("nan")), (2, -0.9)])
def test_a_nifti_whose_header_loses_its_voxel_size_is_refused(tmp_path, head_ct, name, axis, value):
    """ITK reads a zero or NaN pixdim as 1 mm (a 5 mm scan's hematoma would measure a fifth of its
    volume) and a negative one as a negative spacing: refused, naming the file and the field."""
    image, _ = head_ct()
    sitk.WriteImage(image, str(tmp_path / name))
    assert io.read_ct(tmp_path / name).GetSpacing() == pytest.approx(image.GetSpacing())
    with_pixdim(tmp_path / name, axis, value)
    with pytest.raises(DataError) as err:
        io.read_ct(tmp_path / name)
    assert str(err.value) == (f"{tmp_path / name}: voxel size in the header is not a positive number "
                              f"(pixdim[{axis}] = {value:g}): the scan's geometry is unknown")


def test_check_refuses_a_scan_without_a_voxel_size(cohort):
    with_pixdim(cohort / "A/images/a1.nii.gz", 3, 0.0)
    problems = problems_of(cohort)
    assert len(problems) == 1 and problems[0].startswith(
        "A/images/a1.nii.gz: voxel size in the header is not a positive number (pixdim[3] = 0)")


# ----------------------------------------------------------------------------------------------
# Masks: 0 and one whole-number hematoma label


def soft_mask(mask: sitk.Image) -> sitk.Image:
    """A probability-like map: background 0.11, lesion 0.48 (every voxel nonzero)."""
    return with_values(mask, np.float32, lambda a: a.__setitem__(slice(None), np.where(a > 0, 0.48, 0.11)))


def three_labels(mask: sitk.Image) -> sitk.Image:
    return with_values(mask, np.uint8, lambda a: a[:, :, :4].__setitem__(slice(None), 2))


SOFT = ("mask holds non-integer values (2 distinct: 0.11, 0.48): a probability or soft map, not a label mask "
        "(0 background, one whole-number hematoma label); threshold it before export")
MULTI = ("mask holds 2 different nonzero labels (3 distinct values: 0, 1, 2): a multi-label map; hemex reads 0 "
         "as background and one hematoma label, so export the hematoma label alone")


@pytest.mark.parametrize("make, reason", [(soft_mask, SOFT), (three_labels, MULTI)])
def test_soft_and_multi_label_masks_are_refused_naming_the_values(tmp_path, head_ct, make, reason):
    _, mask = head_ct()
    io.write_image(make(mask), tmp_path / "mask.nii.gz")
    with pytest.raises(DataError) as err:
        io.read_mask(tmp_path / "mask.nii.gz")
    assert str(err.value) == f"{tmp_path / 'mask.nii.gz'}: {reason}"


@pytest.mark.parametrize("values, shown", [
    ((0.0, 1.0, 0.5), "non-integer values (3 distinct: 0, 0.5, 1)"),
    ((0.0, 1.0, np.nan), "non-integer values (3 distinct: 0, 1, nan)"),  # NaN in an .nrrd (NIfTI: raw check)
    ((0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0), "7 different nonzero labels (8 distinct values: 0, 1, 2, 3, 4, 5, ...)"),
    ((1.0, 2.0), "2 different nonzero labels (2 distinct values: 1, 2)"),  # no 0 background at all
])
def test_mask_values_named_in_the_refusal(tmp_path, head_ct, values, shown):
    _, mask = head_ct()
    labels = np.resize(np.asarray(values, np.float32), sitk.GetArrayViewFromImage(mask).shape)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(mask)
    io.write_image(image, tmp_path / "mask.nrrd")
    with pytest.raises(DataError, match=f"mask.nrrd: mask holds {shown.replace('(', '[(]').replace(')', '[)]')}"):
        io.read_mask(tmp_path / "mask.nrrd")


@pytest.mark.parametrize("values", [(0, 1), (0, 255), (0.0, 1.0), (0,), (0, 7)])
def test_zero_and_one_whole_number_label_is_a_mask(tmp_path, head_ct, values):
    _, mask = head_ct()
    array = sitk.GetArrayFromImage(mask)
    stored = np.where(array > 0, values[-1], values[0]).astype(np.float32 if isinstance(values[0], float) else np.uint8)
    image = sitk.GetImageFromArray(stored)
    image.CopyInformation(mask)
    io.write_image(image, tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_mask(tmp_path / "mask.nii.gz")),
                                  (stored != 0).astype(np.uint8))


def test_check_and_the_training_loader_refuse_a_soft_mask_alike(cohort):
    mask = sitk.ReadImage(str(cohort / "A/masks/a1.nii.gz"))
    io.write_image(soft_mask(mask), cohort / "A/masks/a1.nii.gz")
    assert problems_of(cohort) == [f"A/masks/a1.nii.gz: {SOFT}"]
    case = Case("A", "a1", 1, cohort / "A/images/a1.nii.gz", cohort / "A/masks/a1.nii.gz")
    with pytest.raises(DataError) as err:
        load_case(case, spacing=(2.0, 2.0, 5.0))
    assert str(err.value) == f"{cohort / 'A/masks/a1.nii.gz'}: {SOFT}"


# ----------------------------------------------------------------------------------------------
# Malformed DICOM: a DataError naming the file (or the folder and its files), never pydicom's or
# ITK's own exception, in the readers, `hemex check` and the site's info path (slice_spacing_mm)


@pytest.fixture(scope="module")
def dicom_series(tmp_path_factory) -> Path:
    from conftest import synthetic_head_ct

    folder = tmp_path_factory.mktemp("dicom") / "series"
    image, _ = synthetic_head_ct()  # 6 slices, 5 mm apart
    dicom_io.write_dicom_series(image, folder, "p1")
    return folder


def copy_series(series: Path, folder: Path) -> list[Path]:
    shutil.copytree(series, folder)
    return [Path(f) for f in dicom_io.dicom_series_files(folder)]  # position order


def truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def without(path: Path, *keywords: str) -> None:
    import pydicom

    dataset = pydicom.dcmread(path)
    for keyword in keywords:
        delattr(dataset, keyword)
    dataset.save_as(path)


def without_preamble(path: Path) -> None:
    """The dataset alone, implicit VR: no 128-byte preamble, no DICM prefix, no file meta (older
    exports; GDCM reads them, pydicom only with force=True)."""
    import pydicom

    dataset = pydicom.dcmread(path)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.preamble = None
    pydicom.dcmwrite(path, dataset, implicit_vr=True, little_endian=True, enforce_file_format=False)


BREAKS = {  # what to do to the files of a copied series (in position order)
    "one slice garbage": lambda f: f[2].write_bytes(np.random.default_rng(0).bytes(3000)),
    "one slice cut in its header": lambda f: truncate(f[2], 400),
    "one slice cut in its pixels": lambda f: truncate(f[2], 0.9),
    "one slice without pixel data": lambda f: without(f[2], "PixelData"),
    "one slice without position": lambda f: without(f[2], "ImagePositionPatient"),
    "every slice without preamble": lambda f: [without_preamble(p) for p in f],
    "every slice cut in its pixels": lambda f: [truncate(p, 0.9) for p in f],
    "every slice without pixel data": lambda f: [without(p, "PixelData") for p in f],
    "every slice garbage": lambda f: [p.write_bytes(np.random.default_rng(1).bytes(2000)) for p in f],
}


@pytest.mark.parametrize("how", BREAKS)
def test_a_broken_series_reads_or_fails_with_one_line_naming_it(tmp_path, dicom_series, how):
    folder = tmp_path / "case"
    BREAKS[how](copy_series(dicom_series, folder))
    for read in (io.read_ct, io.slice_spacing_mm):
        try:
            read(folder)
        except DataError as err:  # anything else escapes and fails the test
            assert str(err).startswith(str(folder)) and "\n" not in str(err), str(err)


def test_files_without_the_dicm_preamble_are_read_by_every_dicom_path(tmp_path, dicom_series):
    # GDCM reads them, so the volume loads; pydicom refused them, and its InvalidDicomError came out
    # of slice_spacing_mm, the site's info reply, and out of the DICOM SEG writer.
    from common.inference.dicom_seg import write_dicom_seg

    files = copy_series(dicom_series, tmp_path / "case")
    for file in files:
        without_preamble(file)
        assert file.read_bytes()[128:132] != b"DICM"
    image = io.read_ct(tmp_path / "case")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(io.read_ct(dicom_series)))
    assert io.slice_spacing_mm(tmp_path / "case") == pytest.approx(5.0)
    mask = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(image)
    assert write_dicom_seg(tmp_path / "case", mask, tmp_path / "mask.seg.dcm", "1").is_file()


def test_a_slice_the_geometry_cannot_use_is_named(tmp_path, dicom_series):
    files = copy_series(dicom_series, tmp_path / "case")
    without(files[2], "ImagePositionPatient")
    with pytest.raises(DataError) as err:
        io.slice_spacing_mm(tmp_path / "case")
    assert str(err.value) == f"{files[2]}: DICOM file lacks ImagePositionPatient (truncated, or not a CT image)"


def test_a_folder_whose_every_file_is_broken_names_them(tmp_path, dicom_series, enhanced_copy):
    files = copy_series(dicom_series, tmp_path / "case")
    for file in files[1:]:
        file.unlink()
    truncate(files[0], 400)
    (tmp_path / "case/garbage.dcm").write_bytes(np.random.default_rng(0).bytes(3000))
    enhanced = enhanced_copy(dicom_series, tmp_path / "enhanced") / "enhanced.dcm"
    without(enhanced, "PixelData")
    (tmp_path / "case/sub").mkdir()
    enhanced.rename(tmp_path / "case/sub/enhanced.dcm")
    (tmp_path / "case/notes.txt").write_text("not DICOM\n")
    reason = ("no DICOM series found in folder; 3 file(s) look like DICOM but hold no readable image (truncated, "
              f"corrupt or no pixel data): {files[0].name}, garbage.dcm, sub/enhanced.dcm")
    for read in (io.read_ct, io.slice_spacing_mm):
        with pytest.raises(DataError) as err:
            read(tmp_path / "case")
        assert str(err.value) == f"{tmp_path / 'case'}: {reason}"


LACKS = "DICOM file lacks ImagePositionPatient, PixelData (truncated, or not a CT image)"


@pytest.mark.parametrize("content, reason", [
    (lambda: np.random.default_rng(0).bytes(3000), LACKS),
    (lambda: b"", LACKS),
    (lambda: deflated_garbage(), "cannot read DICOM file: Error -3 while decompressing data: invalid block type"),
])
def test_read_dicom_dataset_turns_every_parse_failure_into_a_data_error(tmp_path, content, reason):
    path = tmp_path / "x.dcm"
    path.write_bytes(content())
    with pytest.raises(DataError) as err:
        dicom_io.read_dicom_dataset(path, pixels=True, required=("ImagePositionPatient",))
    assert str(err.value) == f"{path}: {reason}"
    with pytest.raises(DataError, match=r"missing.dcm: cannot read DICOM file: .*No such file"):
        dicom_io.read_dicom_dataset(tmp_path / "missing.dcm")


def deflated_garbage() -> bytes:
    """A valid file meta header announcing Deflated Explicit VR Little Endian, then garbage."""
    from io import BytesIO

    import pydicom

    meta = pydicom.dataset.FileMetaDataset()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    buffer = BytesIO()
    pydicom.filewriter.write_file_meta_info(buffer, meta)
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + np.random.default_rng(0).bytes(200)


def test_check_reports_a_broken_dicom_case_and_goes_on(cohort):
    files = [Path(f) for f in dicom_io.dicom_series_files(cohort / "B/images/b2")]
    for file in files:
        truncate(file, 0.9)
    problems = problems_of(cohort)
    assert len(problems) == 1 and problems[0].startswith(
        "B/images/b2: no DICOM series found in folder; 6 file(s) look like DICOM but hold no readable image")


@pytest.mark.parametrize("enhanced", [False, True])
def test_a_slice_position_far_away_cannot_blow_up_the_rebuilt_grid(tmp_path, dicom_series, enhanced_copy, enhanced):
    # Rebuilt on a regular grid at the median 5 mm step, slices 6 and 1e8 mm apart would need
    # 2e7 slices (46 GiB): refused from the positions, before anything is allocated.
    import pydicom

    files = copy_series(dicom_series, tmp_path / "case")
    last = pydicom.dcmread(files[-1])
    last.ImagePositionPatient = [*last.ImagePositionPatient[:2], 1e8]
    last.save_as(files[-1])
    folder = enhanced_copy(tmp_path / "case", tmp_path / "enhanced") if enhanced else tmp_path / "case"
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        io.read_ct(folder)
    assert time.perf_counter() - start < 2.0
    assert str(err.value) == (f"{folder}: DICOM series rebuilt where its slices lie: size 24 x 24 x 20000001 "
                              "(11,520,000,576 voxels) is over hemex's limit of 1,073,741,824 voxels "
                              "(HEMEX_MAX_VOXELS sets it); not read (slice positions far apart: a stray or "
                              "corrupt position?)")


def test_a_corrupt_voxel_spacing_cannot_blow_up_the_working_grid(tmp_path, head_ct):
    # 24 x 24 x 6 voxels claiming 5 m each: 120 x 120 x 30 m, 2e13 voxels on a 2 x 2 x 5 mm grid.
    image, _ = head_ct(spacing=(5000.0, 5000.0, 5000.0))
    io.write_image(image, tmp_path / "ct.nii.gz")
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_case(Case("A", "x", None, tmp_path / "ct.nii.gz", None), spacing=(2.0, 2.0, 5.0))
    assert time.perf_counter() - start < 2.0
    assert str(err.value) == (f"{tmp_path / 'ct.nii.gz'}: resampled to 2 x 2 x 5 mm over its physical extent "
                              "(120000 x 120000 x 30000 mm): size 60000 x 60000 x 6000 (21,600,000,000,000 voxels) "
                              "is over hemex's limit of 1,073,741,824 voxels (HEMEX_MAX_VOXELS sets it); not read")
