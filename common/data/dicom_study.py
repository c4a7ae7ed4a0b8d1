"""Which DICOM series of a study folder is the head NCCT to read.

A PACS or CD export of one examination rarely holds a single series: a scout, the brain-kernel
axial series, the same data reconstructed with a bone kernel, thin slices, sagittal and coronal
reformats, a dose report, each perhaps in its own subfolder (PATIENT/STUDY/SERIES/...). hemex reads
one axial CT series per case and picks it by fixed rules, the way a radiologist picks the series to
read, so that pointing `hemex predict` at an export does the expected thing and says what it did:

1. Excluded: not CT, a localizer (ImageType LOCALIZER), fewer than ``MIN_IMAGES`` images, or
   slices more than 45 degrees away from axial (sagittal or coronal reformats).
2. Then preferred, in order: a soft-tissue reconstruction over a bone or lung one (a default
   display window of ``SHARP_WINDOW_HU`` width or more, or a kernel named BONE / LUNG /
   SHARP / EDGE / DETAIL); the slice thickness closest to ``READING_SLICE_MM`` (the thickness
   NCCT is read at, and the one hemex's models and markers work at); ORIGINAL over DERIVED images;
   more images; then the lowest series number.

Series of two studies or two patients in one folder are refused rather than chosen between: a
baseline scan exported together with its follow-up is the likeliest case, and reading the
follow-up would predict expansion from the wrong scan.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.errors import DataError

MIN_IMAGES = 5  # fewer is a scout, a dose screen or a key image, not a head volume
SHARP_WINDOW_HU = 1000.0  # brain windows are 80-150 HU wide, subdural ~250, bone and lung 1500-4000
SHARP_KERNEL_WORDS = ("BONE", "LUNG", "SHARP", "EDGE", "DETAIL")
READING_SLICE_MM = 5.0
MAX_AXIAL_DEG = 45.0
MAX_DEPTH = 4  # PATIENT/STUDY/SERIES/files and one spare level

TAGS = {"modality": "0008|0060", "image_type": "0008|0008", "description": "0008|103e",
        "thickness": "0018|0050", "kernel": "0018|1210", "window_width": "0028|1051",
        "orientation": "0020|0037", "number": "0020|0011", "study_uid": "0020|000d",
        "patient_id": "0010|0020", "study_date": "0008|0020", "frames": "0028|0008"}


def header(file: str) -> sitk.ImageFileReader | None:
    """A reader holding the file's header (size, geometry, public tags), or None if unreadable."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def tag(reader: sitk.ImageFileReader | None, key: str) -> str:
    return reader.GetMetaData(key).strip() if reader is not None and reader.HasMetaDataKey(key) else ""


def _number(text: str) -> float | None:
    """The first value of a (possibly multi-valued) numeric DICOM string, or None."""
    try:
        value = float(text.split("\\")[0])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Series:
    """One DICOM series of a folder, described from its first file's header."""

    uid: str
    files: tuple[str, ...]
    description: str = ""
    modality: str = ""
    image_type: str = ""
    thickness_mm: float | None = None
    kernel: str = ""
    window_width: float | None = None
    tilt_deg: float | None = None  # angle between the slice normal and the patient's head-foot axis
    number: int | None = None
    study_uid: str = ""
    patient_id: str = ""
    study_date: str = ""
    frames: int = 1

    @classmethod
    def read(cls, uid: str, files: list[str]) -> "Series":
        reader = header(files[0])
        orientation = [_number(v) for v in tag(reader, TAGS["orientation"]).split("\\")]
        tilt = None
        if len(orientation) == 6 and None not in orientation:
            normal = np.cross(orientation[:3], orientation[3:])
            if np.linalg.norm(normal) > 0:
                tilt = math.degrees(math.acos(min(1.0, abs(normal[2]) / np.linalg.norm(normal))))
        number = _number(tag(reader, TAGS["number"]))
        frames = _number(tag(reader, TAGS["frames"]))
        return cls(uid, tuple(files), tag(reader, TAGS["description"]), tag(reader, TAGS["modality"]),
                   tag(reader, TAGS["image_type"]).upper(), _number(tag(reader, TAGS["thickness"])),
                   tag(reader, TAGS["kernel"]), _number(tag(reader, TAGS["window_width"])), tilt,
                   None if number is None else int(number), tag(reader, TAGS["study_uid"]),
                   tag(reader, TAGS["patient_id"]), tag(reader, TAGS["study_date"]),
                   int(frames) if frames and len(files) == 1 else 1)

    @property
    def n_images(self) -> int:
        return self.frames if len(self.files) == 1 else len(self.files)

    @property
    def sharp(self) -> bool:
        """A bone or lung reconstruction (by its display window or its kernel name)."""
        wide = self.window_width is not None and self.window_width >= SHARP_WINDOW_HU
        return wide or any(word in self.kernel.upper() for word in SHARP_KERNEL_WORDS)

    def label(self) -> str:
        """'HEAD 5mm' (32 images, 5 mm, H30s): how a PACS viewer would name the series."""
        details = [f"{self.n_images} image(s)"]
        if self.thickness_mm is not None:
            details.append(f"{self.thickness_mm:g} mm")
        if self.kernel:
            details.append(self.kernel)
        return f"{self.description or 'no description'!r} ({', '.join(details)})"

    def exclusion(self) -> str | None:
        """Why this series cannot be the head NCCT volume, or None."""
        if self.modality != "CT":
            return f"modality {self.modality or 'missing'}"
        if "LOCALIZER" in self.image_type:
            return "localizer"
        if self.n_images < MIN_IMAGES:
            return f"only {self.n_images} image(s)"
        if self.tilt_deg is not None and self.tilt_deg > MAX_AXIAL_DEG:
            return "not axial"
        return None

    def preference(self) -> tuple:
        """Sort key: smaller is preferred (see the module docstring)."""
        thickness = self.thickness_mm if self.thickness_mm and self.thickness_mm > 0 else READING_SLICE_MM
        return (self.sharp, round(abs(math.log(thickness / READING_SLICE_MM)), 3), "DERIVED" in self.image_type,
                -self.n_images, self.number if self.number is not None else math.inf, self.uid)


def _series_by_directory(folder: Path):
    """(series uid, its files in one directory) for the folder and its subfolders, depth first."""
    reader = sitk.ImageSeriesReader()
    for directory, subdirs, files in os.walk(folder):
        depth = len(Path(directory).relative_to(folder).parts)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        if not any(not name.startswith(".") for name in files):
            continue  # PATIENT/ and STUDY/ levels of an export (GDCM would warn "No Series were found")
        try:
            uids = reader.GetGDCMSeriesIDs(directory)
        except RuntimeError as err:
            raise DataError(Path(directory), f"cannot scan for DICOM series: {err}") from err
        for uid in uids:
            yield uid, list(reader.GetGDCMSeriesFileNames(directory, uid))


def find_series(folder: Path) -> list[Series]:
    """Every DICOM series in the folder and its subfolders (up to MAX_DEPTH levels)."""
    found: dict[str, list[str]] = {}
    for uid, files in _series_by_directory(Path(folder)):
        found.setdefault(uid, []).extend(files)
    return [Series.read(uid, files) for uid, files in found.items()]


def count_studies(folder: Path, stop_at: int = 2) -> int:
    """How many examinations (patient, study) the folder's DICOM series belong to, counting no
    further than `stop_at`: a folder of many cases is told from one export after two series."""
    studies = set()
    for _, files in _series_by_directory(Path(folder)):
        reader = header(files[0])
        studies.add((tag(reader, TAGS["patient_id"]), tag(reader, TAGS["study_uid"])))
        if len(studies) >= stop_at:
            break
    return len(studies)


def choose_series(folder: Path, series: list[Series]) -> tuple[Series, str | None]:
    """(the series to read, a note saying what was chosen and what was not; None when the folder
    holds one series)."""
    if len(series) == 1:
        return series[0], None
    studies: dict[tuple[str, str], list[Series]] = {}
    for s in series:
        studies.setdefault((s.patient_id, s.study_uid), []).append(s)
    if len(studies) > 1:
        listing = "; ".join(f"patient {members[0].patient_id or '?'}, study of {members[0].study_date or 'unknown date'}: "
                            + ", ".join(m.label() for m in members) for members in studies.values())
        raise DataError(folder, f"folder holds series of {len(studies)} different studies ({listing}); "
                                "one case folder must hold one examination")
    candidates = sorted((s for s in series if s.exclusion() is None), key=Series.preference)
    if not candidates:
        listing = "; ".join(f"{s.label()}: {s.exclusion()}" for s in series)
        raise DataError(folder, f"none of the folder's {len(series)} DICOM series is an axial CT volume ({listing})")
    chosen = candidates[0]
    others = [f"{s.label()}: {s.exclusion() or _why_not(s, chosen)}" for s in series if s is not chosen]
    note = (f"DICOM folder holds {len(series)} series; read {chosen.label()} as the head NCCT; "
            f"not read: {'; '.join(others)}")
    return chosen, note


def _why_not(other: Series, chosen: Series) -> str:
    """The first rule by which `chosen` was preferred to `other` (both candidates)."""
    reasons = ("bone or lung reconstruction", f"thickness further from {READING_SLICE_MM:g} mm", "derived images",
               "fewer images", "higher series number")
    for reason, a, b in zip(reasons, other.preference(), chosen.preference()):
        if a != b:
            return reason
    return "same kind of series"
