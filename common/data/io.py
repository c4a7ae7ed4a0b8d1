"""Medical image I/O through SimpleITK: NIfTI files and DICOM series in, atomic writes out.

Every reader returns a SimpleITK image in Hounsfield units with its physical geometry intact;
orientation and spacing are left to `preprocess.py`.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import struct
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.data.dicom_geometry import SliceStack, irregularity, regular_size, regularize
from common.data.dicom_study import MAX_DEPTH, choose_series, find_series, header, tag
from common.errors import ConfigError, DataError

# DICOM tags (group|element) that hemex reads or writes.
TAG_MODALITY = "0008|0060"
TAG_RESCALE_INTERCEPT = "0028|1052"
TAG_RESCALE_SLOPE = "0028|1053"
SLICE_GRID = ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")  # a slice's in-plane geometry

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_MAGIC = b"n+1\0"  # at byte 344 (single-file NIfTI-1; "ni1" pairs keep voxels in the .img)
NIFTI2_MAGIC = b"n+2\0"  # at byte 4
NIFTI2_HEADER_BYTES = 540

# The largest image hemex reads (voxels x components), checked from the header before any voxel is
# decompressed or allocated: a 2048^3 all-zero .nii.gz is 16 MB on disk but 8 G voxels (32 GiB once
# read as float32). 2^30 is generous for head CT: a standard scan is 512 x 512 x 30-700 (at most
# ~0.2 G), and even a 1024 x 1024 ultra-high-resolution matrix with 1000 slices of 0.25 mm (25 cm of
# head) stays under it; read as float32 it is 4 GiB, about what one site process can afford beside
# preprocessing's copies. A site with larger scans raises it with the environment variable below.
MAX_VOXELS = 1 << 30
MAX_VOXELS_ENV = "HEMEX_MAX_VOXELS"


def dicom_series_files(folder: Path, notes: list[str] | None = None) -> list[str]:
    """The files of the folder's DICOM series to read, in GDCM's position order (the volume's z
    order): single-frame images, or one enhanced multi-frame image holding every slice. A folder
    (or its subfolders: a PACS or CD export) holding several series gets the axial NCCT series
    chosen by `dicom_study.choose_series`, and a note naming it and the others."""
    return _select_series(Path(folder), notes)[0]


def _select_series(folder: Path, notes: list[str] | None) -> tuple[list[str], list[str]]:
    """(the chosen series' files, the files of the series not chosen: accounted for, not strays)."""
    series = find_series(folder)
    if not series:
        unreadable = _dicom_like_files(folder)
        raise DataError(folder, "no DICOM series found in folder" + (
            f"; {len(unreadable)} file(s) look like DICOM but hold no readable image (truncated, corrupt or "
            f"no pixel data): {', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}"
            if unreadable else ""))
    chosen, note = choose_series(folder, series)
    if note:
        _note(notes, note)
    files = list(chosen.files)
    if len(files) < 2 and chosen.n_images < 2:
        raise DataError(folder, f"DICOM series has {len(files)} slice(s); a head CT volume needs several")
    return files, [f for s in series if s is not chosen for f in s.files]


def read_dicom_series(folder: Path, notes: list[str] | None = None) -> sitk.Image:
    """A DICOM series folder as one HU volume; slices ordered by position (GDCM), rescale applied.
    The folder holds single-frame images or one enhanced multi-frame image.

    A gantry-tilted or unevenly spaced series is rebuilt on a regular grid (`dicom_geometry`)
    and what was done is appended to `notes`.
    """
    folder = Path(folder)
    files, other_series = _select_series(folder, notes)
    first = header(files[0])  # rows, columns (and frames) from the header: the size before any pixel is read
    if first is not None:
        size = first.GetSize()
        depth = len(files) if len(files) > 1 else (size[2] if len(size) > 2 else 1)
        problem = size_problem((size[0], size[1], depth), first.GetNumberOfComponents())
        if problem:
            raise DataError(folder, f"DICOM series {problem}")
    if len(files) == 1:
        return _read_multiframe(files[0], folder, notes)
    try:
        reader, image = _read_slices(files)
    except RuntimeError as err:
        # A localizer or a stray slice of another size in the series: keep the largest group of
        # one image size (as dcm2niix splits such series), or fail with ITK's reason.
        groups: dict[tuple, list[str]] = {}
        for file in files:
            groups.setdefault(_image_size(file), []).append(file)
        kept = max(groups.values(), key=len)
        if len(groups) < 2 or len(kept) < 2:
            raise DataError(folder, f"cannot read DICOM series: {error_message(err)}") from err
        try:
            reader, image = _read_slices(kept)
        except RuntimeError as err2:
            raise DataError(folder, f"cannot read DICOM series: {error_message(err2)}") from err2
        files = kept
    left_out = _left_out_files(folder, files, other_series)
    if left_out:
        _note(notes, f"{len(left_out)} DICOM file(s) in the folder left out of the volume (unreadable, no pixel data "
                     f"or another image size): {', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}")
    _require_ct(reader.GetMetaData(0, TAG_MODALITY) if reader.HasMetaDataKey(0, TAG_MODALITY) else "", folder)
    try:
        stack = SliceStack.from_reader(reader, image)
        problem = irregularity(stack) if stack is not None else None
    except ValueError as err:
        raise DataError(folder, f"DICOM slice geometry: {err}") from err
    if problem:
        _check_regular_size(stack, folder)
        image = regularize(sitk.GetArrayFromImage(image), stack)
        _note(notes, f"DICOM series resampled to a regular {image.GetSpacing()[2]:.2f} mm grid: {problem}")
    return image


def _read_slices(files: list[str]) -> tuple[sitk.ImageSeriesReader, sitk.Image]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.SetOutputPixelType(sitk.sitkFloat32)  # GDCM applies slope/intercept; float keeps fractional HU
    return reader, reader.Execute()


def _image_size(file: str) -> tuple:
    reader = header(file)
    return ("unreadable",) if reader is None else tuple(reader.GetSize()[:2])


def _left_out_files(folder: Path, used: list[str], other_series: list[str] = ()) -> list[str]:
    """Names (relative to `folder`) of files beside the series that look like DICOM (a .dcm / .ima
    name or the DICM preamble) but are not in the volume: a truncated transfer, an image without
    pixels, a stray slice. GDCM skips them silently; an end slice lost that way shortens the scan
    unnoticed. Files of the folder's other series are accounted for by the series choice."""
    used_paths = {os.path.realpath(f) for f in [*used, *other_series]}
    out = []
    beside = sorted({Path(f).parent for f in used})
    for path in sorted(p for directory in beside for p in directory.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR" \
                or os.path.realpath(path) in used_paths:
            continue
        if _looks_like_dicom(path):
            out.append(os.path.relpath(path, folder))
    return out


def _looks_like_dicom(path: Path) -> bool:
    """A .dcm / .ima name or the DICM preamble (an unreadable file counts: it may be one)."""
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return True


def _dicom_like_files(folder: Path) -> list[str]:
    """Names (relative to `folder`) of the files that look like DICOM, as deep as series are searched."""
    found = []
    for directory, subdirs, files in os.walk(folder):
        depth = len(Path(directory).relative_to(folder).parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        paths = (Path(directory) / name for name in sorted(files)
                 if not name.startswith(".") and name.upper() != "DICOMDIR")
        found += [os.path.relpath(path, folder) for path in paths if _looks_like_dicom(path)]
    return found


def read_dicom_dataset(file, pixels: bool = False, required: tuple[str, ...] = ()):
    """One DICOM file as a pydicom dataset (headers only unless `pixels`), or a DataError naming
    the file: never pydicom's own exception. Read with force=True because GDCM, which builds the
    volume, also reads files without the 128-byte preamble and DICM prefix (older exports); pydicom
    then reads a truncated file as far as it goes, so the attributes the caller needs (`required`,
    keywords) are checked here rather than failing later without the file's name."""
    import pydicom

    try:
        dataset = pydicom.dcmread(file, force=True, stop_before_pixels=not pixels)
        missing = [name for name in (*required, *(("PixelData",) if pixels else ())) if name not in dataset]
    except Exception as err:  # noqa: BLE001 - a parser of untrusted bytes: whatever it raises, the file is malformed
        raise DataError(file, f"cannot read DICOM file: {error_message(err)}") from err
    if missing:
        raise DataError(file, f"DICOM file lacks {', '.join(missing)} (truncated, or not a CT image)")
    return dataset


def _read_multiframe(file: str, folder: Path, notes: list[str] | None) -> sitk.Image:
    """One enhanced multi-frame CT image (e.g. Enhanced or Legacy Converted Enhanced CT) as a
    volume. GDCM reads its pixels and rescale, but stacks the frames in file order at one step,
    so a tilted, gapped or unordered acquisition would come out misplaced; the volume is always
    rebuilt from each frame's own position (exact for a regular stack)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise DataError(folder, f"cannot read enhanced DICOM image: {error_message(err)}") from err
    _require_ct(tag(reader, TAG_MODALITY), folder)
    header = read_dicom_dataset(file)
    try:
        stack = SliceStack.from_multiframe(header)
        rescales = _frame_rescales(header)
        problem = irregularity(stack)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError) as err:
        raise DataError(folder, f"enhanced DICOM frame geometry: {err}") from err
    if len(stack.positions) != image.GetDepth():
        raise DataError(folder, f"enhanced DICOM image has {image.GetDepth()} frames of pixels but "
                                f"{len(stack.positions)} frame positions")
    _check_regular_size(stack, folder)
    frames = sitk.GetArrayFromImage(image)
    if rescales is not None and len(set(rescales)) > 1:
        # GDCM rescales every frame with the first frame's slope and intercept (SimpleITK 2.5,
        # checked by tests/test_dicom_geometry.py); undo that and apply each frame's own.
        (slope0, intercept0) = rescales[0]
        for k, (slope, intercept) in enumerate(rescales):
            frames[k] = (frames[k] - intercept0) / slope0 * slope + intercept
    volume = regularize(frames, stack)
    if problem:
        _note(notes, f"enhanced DICOM frames resampled to a regular {volume.GetSpacing()[2]:.2f} mm grid: {problem}")
    return volume


def _check_regular_size(stack: SliceStack, folder: Path) -> None:
    """The voxel limit, for the regular grid a series is rebuilt on (before it is allocated)."""
    problem = size_problem(regular_size(stack))
    if problem:
        raise DataError(folder, f"DICOM series rebuilt where its slices lie: {problem} "
                                "(slice positions far apart: a stray or corrupt position?)")


def _frame_rescales(header) -> list[tuple[float, float]] | None:
    """(slope, intercept) of every frame when the rescale is given per frame, else None."""
    items = [frame.PixelValueTransformationSequence[0] if "PixelValueTransformationSequence" in frame else None
             for frame in getattr(header, "PerFrameFunctionalGroupsSequence", [])]
    if not items or all(item is None for item in items):
        return None
    if any(item is None for item in items):
        raise ValueError("some frames give a rescale slope/intercept and others none")
    rescales = [(float(item.RescaleSlope), float(item.RescaleIntercept)) for item in items]
    if any(slope == 0 for slope, _ in rescales):
        raise ValueError("a frame's rescale slope is 0")
    return rescales


def _require_ct(modality: str, folder: Path) -> None:
    if modality.strip() != "CT":
        raise DataError(folder, f"DICOM modality is {modality.strip() or 'missing'!r}, expected 'CT'")


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def read_ct(path: Path, notes: list[str] | None = None) -> sitk.Image:
    """Baseline NCCT (NIfTI file or DICOM series folder) as a float32 HU image; what reading had
    to correct (a DICOM series' tilt or gaps) is appended to `notes`."""
    path = Path(path)
    if path.is_dir():
        image = read_dicom_series(path, notes)
    elif path.is_file():
        image = _read_file(path)
    else:
        raise DataError(path, "image not found")
    if image.GetDimension() != 3:
        raise DataError(path, f"expected a 3D volume, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    finite = int(np.count_nonzero(np.isfinite(values)))
    if finite < values.size:
        raise DataError(path, f"{values.size - finite:,} of {values.size:,} voxel values are NaN or infinite")
    return image


def slice_spacing_mm(path: Path) -> float:
    """Spacing between slices along the patient's head-foot axis, mm, from headers only (a
    training range for `hemex predict` to compare new scans with; not for resampling). A DICOM
    series reports its median slice step along the slice normal, as `read_ct` rebuilds it."""
    path = Path(path)
    if path.is_dir():
        files = dicom_series_files(path)
        # A multi-frame image carries its geometry per frame (checked where it is read); single
        # frames each need their position, and the first its orientation and pixel grid.
        required = () if len(files) == 1 else ("ImagePositionPatient",)
        headers = [read_dicom_dataset(f, required=required + (SLICE_GRID if k == 0 and required else ()))
                   for k, f in enumerate(files)]
        try:
            steps = np.diff(np.sort(SliceStack.from_datasets(headers).along_normal()))
        except (ValueError, AttributeError, KeyError, IndexError, TypeError) as err:
            raise DataError(path, f"DICOM slice geometry: {err}") from err
        if steps.size == 0:
            raise DataError(path, "DICOM image has one slice")
        return float(np.median(steps))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(path, f"cannot read image header: {error_message(err)}") from err
    if reader.GetDimension() < 3:
        raise DataError(path, f"expected a 3D volume, got {reader.GetDimension()}D")
    direction = np.asarray(reader.GetDirection()).reshape(reader.GetDimension(), -1)
    return float(reader.GetSpacing()[int(np.argmax(np.abs(direction[2, :3])))])  # the axis closest to patient z


def read_mask(path: Path) -> sitk.Image:
    """Hematoma mask as uint8 {0, 1}. The stored mask holds 0 (background) and at most one other
    value, a whole number (1, 255, ...: the hematoma); see `mask_values_problem`."""
    path = Path(path)
    image = _read_file(path)
    if image.GetDimension() != 3:
        raise DataError(path, f"expected a 3D mask, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:  # NotEqual below would raise a raw ITK RuntimeError
        raise DataError(path, f"expected a scalar mask, got {image.GetNumberOfComponentsPerPixel()} components")
    problem = mask_values_problem(sitk.GetArrayViewFromImage(image))  # `image` keeps the view's memory alive
    if problem:
        raise DataError(path, problem)
    return sitk.Cast(sitk.NotEqual(image, 0), sitk.sitkUInt8)


def mask_values_problem(values: np.ndarray) -> str | None:
    """Why stored mask values are not a hematoma label mask, or None.

    The rule: 0 is background and every other voxel holds one and the same whole number, the
    hematoma label (1, or 255 as some tools write). Anything else is refused rather than guessed
    at: non-integer values are a probability or soft map (read as nonzero = hematoma, a
    background of 0.11 would make every voxel hematoma), and several labels are a multi-label
    map (hematoma, edema, ventricles...) whose hematoma label hemex cannot know.
    """
    nonzero = values[values != 0]  # NaN counts as nonzero, and fails the tests below
    if nonzero.size == 0:
        return None
    low, high = nonzero.min(), nonzero.max()
    if low == high and float(low).is_integer():
        return None
    found = np.unique(values)  # sorted, NaN last; only on this error path
    shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if found.size > 6 else "")
    if not np.isfinite(found).all() or not np.all(found == np.round(found)):
        return (f"mask holds non-integer values ({found.size} distinct: {shown}): a probability or soft map, "
                "not a label mask (0 background, one whole-number hematoma label); threshold it before export")
    labels = int(np.count_nonzero(found))
    return (f"mask holds {labels} different nonzero labels ({found.size} distinct values: {shown}): a multi-label "
            "map; hemex reads 0 as background and one hematoma label, so export the hematoma label alone")


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> str | None:
    """None if both images share size, spacing, origin and direction; otherwise what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {b.GetSize()} differs from image size {a.GetSize()}"
    checks = (("spacing", a.GetSpacing(), b.GetSpacing()), ("origin", a.GetOrigin(), b.GetOrigin()),
              ("direction", a.GetDirection(), b.GetDirection()))
    for name, va, vb in checks:
        if not np.allclose(va, vb, atol=tol, rtol=tol):
            return f"{name} {tuple(round(v, 4) for v in vb)} differs from image {name} {tuple(round(v, 4) for v in va)}"
    return None


def max_voxels() -> int:
    """The voxel limit in force: MAX_VOXELS, or the site's HEMEX_MAX_VOXELS."""
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return MAX_VOXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{MAX_VOXELS_ENV}={value!r}: expected a whole number of voxels >= 1")
    return limit


def size_problem(size, components: int = 1) -> str | None:
    """Why an image of `size` (from its header) is too large to read, or None."""
    voxels = math.prod(int(n) for n in size) * max(int(components), 1)
    limit = max_voxels()
    if voxels <= limit:
        return None
    shape = " x ".join(str(int(n)) for n in size) + (f" x {components} components" if components > 1 else "")
    return (f"size {shape} ({voxels:,} voxels) is over hemex's limit of {limit:,} voxels "
            f"({MAX_VOXELS_ENV} sets it); not read")


def _read_file(path: Path) -> sitk.Image:
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: nothing decompressed or allocated yet
        problem = size_problem(reader.GetSize(), reader.GetNumberOfComponents())
        if problem:
            raise DataError(path, f"image {problem}")
        problem = _nifti_payload_problem(path, reader)
        if problem is None and path.name.lower().endswith((".mha", ".mhd")):
            problem = _metaimage_payload_problem(path, reader)
        if problem:
            raise DataError(path, problem)
        return reader.Execute()
    except RuntimeError as err:
        raise DataError(path, f"cannot read image: {error_message(err)}") from err


def _nifti_payload_problem(path: Path, reader: sitk.ImageFileReader) -> str | None:
    """Why a NIfTI file's voxel data cannot be trusted (None if complete and, for float data, finite).

    ITK's NIfTI reader zero-fills a file that ends early (an interrupted copy or download) and
    reports success, so a truncated scan would silently lose its upper slices; and it turns NaN
    and infinite float voxels into 0, so a scan with a corrupt slab would read as plausible air.
    One pass: the header, then the rest of the stream, counted without keeping it (and, for float
    data, its non-finite values counted chunk by chunk); an uncompressed integer file is only
    measured.
    """
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == GZIP_MAGIC
    header, present, counter = b"", 0, None
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as stream:
            header = stream.read(NIFTI2_HEADER_BYTES)
            # Only NIfTI is checked (other readers fail on short files themselves); its keys can
            # also ride along in another format's metadata, so the file's own magic decides.
            if header[344:348] != NIFTI1_MAGIC and header[4:8] != NIFTI2_MAGIC:
                return None
            counter = _NonFiniteCounter.for_nifti(header, reader)
            present = len(header)
            if counter is not None:
                counter.feed(header, 0)
            while (gzipped or counter is not None) and (chunk := stream.read(1 << 22)):
                if counter is not None:
                    counter.feed(chunk, present)
                present += len(chunk)
    except (EOFError, OSError, zlib.error) as err:  # a cut gzip stream ends without its trailer
        if not header:
            return None  # unreadable from the start: ITK's own error says more
        return f"file is truncated or corrupt (compressed data ends early: {err})"
    if not gzipped:
        present = path.stat().st_size
    ndim = int(reader.GetMetaData("dim[0]"))
    voxels = int(np.prod([max(int(reader.GetMetaData(f"dim[{i}]")), 1) for i in range(1, ndim + 1)]))
    expected = int(float(reader.GetMetaData("vox_offset"))) + voxels * int(reader.GetMetaData("bitpix")) // 8
    if present < expected:
        return f"file is truncated: {present} bytes where its header needs {expected}"
    if counter is not None and counter.count:
        return (f"{counter.count:,} of {counter.values:,} stored float values are NaN or infinite "
                "(ITK's NIfTI reader would silently turn them into 0)")
    return None


# NIfTI datatype codes of float voxel data, and the float each holds (complex: two per voxel).
NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}  # FLOAT32, FLOAT64, COMPLEX64, COMPLEX128


class _NonFiniteCounter:
    """Counts NaN and infinite values in the float voxel data of a byte stream fed in order."""

    def __init__(self, dtype: np.dtype, start: int, length: int):
        self.dtype, self.start, self.end = dtype, start, start + length
        self.count, self.values = 0, 0
        self._pending = b""  # bytes of a value split between two chunks

    @classmethod
    def for_nifti(cls, header: bytes, reader: sitk.ImageFileReader) -> "_NonFiniteCounter | None":
        """A counter for the file's voxel data when it is float, else None."""
        kind = NIFTI_FLOAT_TYPES.get(int(reader.GetMetaData("datatype")))
        if kind is None:
            return None
        # sizeof_hdr (348 or 540) reads right only in the file's own byte order.
        order = "<" if struct.unpack("<i", header[:4])[0] in (348, NIFTI2_HEADER_BYTES) else ">"
        ndim = int(reader.GetMetaData("dim[0]"))
        voxels = int(np.prod([max(int(reader.GetMetaData(f"dim[{i}]")), 1) for i in range(1, ndim + 1)]))
        start = int(float(reader.GetMetaData("vox_offset")))
        return cls(np.dtype(order + kind), start, voxels * int(reader.GetMetaData("bitpix")) // 8)

    def feed(self, data: bytes, offset: int) -> None:
        """`data` lies at byte `offset` of the stream; only its part inside the voxel data counts."""
        low, high = max(self.start - offset, 0), min(self.end - offset, len(data))
        if high <= low:
            return
        block = self._pending + data[low:high]
        usable = len(block) - len(block) % self.dtype.itemsize
        values = np.frombuffer(block, dtype=self.dtype, count=usable // self.dtype.itemsize)
        self.count += int(values.size - np.count_nonzero(np.isfinite(values)))
        self.values += int(values.size)
        self._pending = block[usable:]


def metaimage_header(path: Path) -> tuple[dict[str, str], int] | None:
    """A MetaImage header's fields up to ElementDataFile (the data file's name, or LOCAL) and the
    header's length in bytes; None when the file has no ElementDataFile line."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    fields, offset = {}, 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        key, _, value = line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            return fields, offset
    return None


def _metaimage_payload_problem(path: Path, reader: sitk.ImageFileReader) -> str | None:
    """Why a MetaImage (.mha, or .mhd with its data file) holds fewer voxel bytes than its header
    promises (None if complete or not checkable). ITK refuses such a file, but says "No such file
    or directory" about a file that is there."""
    header = metaimage_header(path)
    if header is None:
        return None
    fields, offset = header
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        data, start = path, offset
    elif name.upper() == "LIST" or "%" in name:  # one file per slice: ITK's own errors name them
        return None
    else:
        data, start = path.parent / name, 0
        if not data.is_file():
            return f"voxel data file {name!r} (ElementDataFile) not found beside the header"
    present = data.stat().st_size - start
    if fields.get("CompressedData", "").lower() == "true":
        expected = int(fields.get("CompressedDataSize", "0") or 0)  # absent: not checkable
    else:
        itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], reader.GetPixelID())).itemsize
        expected = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents() * itemsize
    if expected and present < expected:
        return f"file is truncated: {present} bytes of voxel data where its header needs {expected}"
    return None


def error_message(err: Exception) -> str:
    """The one line of an error worth showing: ITK messages start with a file:line banner and end
    with the useful sentence, so the last non-empty line (the exception's type when there is none)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# ----------------------------------------------------------------------------------------------
# Writing: always to a temporary sibling, then an atomic rename, so a crash leaves no half file.


def write_image(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """Write a NIfTI file atomically (temporary name in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_dicom_series(image: sitk.Image, folder: Path, patient_id: str, series_description: str = "NCCT",
                       extra_tags: dict[str, str] | None = None) -> None:
    """Write an HU volume as a CT DICOM series (16-bit, rescale intercept -1024), atomically.

    Slices carry ImagePositionPatient / ImageOrientationPatient from the image geometry, so a
    reader orders them by position regardless of file names.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    hu = sitk.GetArrayFromImage(image)
    # The buffer holds HU, not stored values: when the rescale tags are set, GDCM itself stores
    # (HU - intercept) / slope. Pre-shifting by +1024 here made every series read back 1024 HU high.
    stored = np.clip(np.round(hu), -1024, 31743).astype(np.int16)
    stored_image = sitk.GetImageFromArray(stored)
    stored_image.CopyInformation(image)
    direction = image.GetDirection()
    # UIDs derive from patient id and description, so the same phantom gives the same files; one
    # patient is one study (examination), whatever series it holds.
    key = f"{patient_id}/{series_description}"
    study_uid = _uid(f"{patient_id}/study")
    series_uid, frame_uid = (_uid(f"{key}/{part}") for part in ("series", "frame"))
    acquired = "20250101"
    common_tags = {
        "0008|0060": "CT",
        "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0008|0020": acquired, "0008|0030": "120000",
        "0008|0021": acquired, "0008|0031": "120000",
        "0008|103e": series_description,
        "0010|0010": patient_id, "0010|0020": patient_id,
        "0020|000d": study_uid, "0020|000e": series_uid, "0020|0052": frame_uid,
        "0020|0011": "1",
        "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                    direction[1], direction[4], direction[7])),
        "0018|0050": f"{image.GetSpacing()[2]:.4f}",
        TAG_RESCALE_INTERCEPT: "-1024",
        TAG_RESCALE_SLOPE: "1",
        "0028|1054": "HU",
    }
    common_tags.update(extra_tags or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        # File names carry no slice order: readers must sort by ImagePositionPatient.
        for k in range(stored_image.GetDepth()):
            slice_image = stored_image[:, :, k]
            for tag, value in common_tags.items():
                slice_image.SetMetaData(tag, value)
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
            slice_image.SetMetaData("0020|0013", str(k + 1))
            instance_uid = _uid(f"{key}/slice/{k}")
            slice_image.SetMetaData("0008|0018", instance_uid)
            slice_image.SetMetaData("0008|0016", "1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
            writer.SetFileName(str(tmp / f"{instance_uid[-12:]}.dcm"))
            writer.Execute(slice_image)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _uid(key: str) -> str:
    # 2.25.<UUID as integer> is the standard UUID-derived DICOM UID form (no registered root needed).
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'hemex:' + key).int}"
