"""DICOM series I/O through SimpleITK and pydicom: a folder (a PACS or CD export) in, the axial NCCT
series chosen, its slices ordered, tilt and gaps corrected, as an HU image; CT series written out.

Reading the study layout lives in `dicom_study.py`, slice geometry in `dicom_geometry.py`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.data.dicom_geometry import SliceStack, irregularity, regular_size, regularize
from common.data.dicom_study import MAX_DEPTH, choose_series, find_series, header, tag
from common.data.image_limits import error_message, size_problem
from common.errors import DataError

# DICOM tags (group|element) that hemex reads or writes.
TAG_MODALITY = "0008|0060"
TAG_RESCALE_INTERCEPT = "0028|1052"
TAG_RESCALE_SLOPE = "0028|1053"
SLICE_GRID = ("ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")  # a slice's in-plane geometry


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


def dicom_slice_spacing_mm(path: Path) -> float:
    """Median slice step (mm) along the slice normal of a DICOM series folder, from headers only."""
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
            for key_tag, value in common_tags.items():
                slice_image.SetMetaData(key_tag, value)
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
