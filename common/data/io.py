"""Medical image I/O through SimpleITK: NIfTI, NRRD and MetaImage files and DICOM series folders
(`dicom_io.py`) in, atomic writes out.

Every reader returns a SimpleITK image in Hounsfield units with its physical geometry intact;
orientation and spacing are left to `preprocess.py`.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.data.dicom_io import dicom_slice_spacing_mm, read_dicom_series
from common.data.image_limits import error_message, size_problem
from common.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_MAGIC = b"n+1\0"  # at byte 344 (single-file NIfTI-1; "ni1" pairs keep voxels in the .img)
NIFTI2_MAGIC = b"n+2\0"  # at byte 4
NIFTI2_HEADER_BYTES = 540


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
        return dicom_slice_spacing_mm(path)
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
            if problem := _nifti1_voxel_size_problem(header):
                return problem
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


def _nifti1_voxel_size_problem(header: bytes) -> str | None:
    """Why a NIfTI-1 header's voxel size (pixdim[1..3], mm) is unusable, or None. ITK reads a zero or
    NaN voxel size as 1 mm without an error, so a 5 mm scan whose pixdim[3] was lost would report a
    fifth of its hematoma volume; a negative one breaks the standard. (NIfTI-2 headers, rare for
    CT, are not checked.)"""
    if header[344:348] != NIFTI1_MAGIC:
        return None
    order = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    ndim = struct.unpack(f"{order}h", header[40:42])[0]
    pixdim = struct.unpack(f"{order}8f", header[76:108])
    bad = [f"pixdim[{i}] = {pixdim[i]:g}" for i in range(1, min(max(ndim, 0), 3) + 1)
           if not (math.isfinite(pixdim[i]) and pixdim[i] > 0)]
    return (f"voxel size in the header is not a positive number ({', '.join(bad)}): the scan's geometry "
            "is unknown") if bad else None


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


def metaimage_data_files(entries: list[Path]) -> set[str]:
    """Names of the data files that the folder's .mhd headers point to (ElementDataFile)."""
    names = set()
    for entry in entries:
        if entry.name.endswith(".mhd") and entry.is_file():
            try:
                header = metaimage_header(entry)
            except OSError:
                continue  # unreadable: reported when the image itself is read
            if header is not None:
                names.add(Path(header[0]["ElementDataFile"]).name)
    return names
