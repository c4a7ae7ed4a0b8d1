"""The site data contract: how a centre's cases are laid out on disk.

    DATA_ROOT/
      <center_id>/
        cases.csv                  header row; required columns: case_id, he
        images/<case_id>.nii.gz    baseline NCCT in HU (or .nii, .nrrd, .mha, .mhd + its data file,
                                   or <case_id>/ = DICOM series)
        masks/<case_id>.nii.gz     optional hematoma mask, same grid as the image: 0 background and one
                                   whole-number hematoma label (1, 255, ...; `io.mask_values_problem`)
      truth.csv                    synthetic cohorts only; never read by training code

This module only parses the layout and the table; `check.py` reports every violation at once,
while the functions here raise on the first one (training code wants a clean cohort or nothing).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError

CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
REQUIRED_COLUMNS = ("case_id", "he")
OPTIONAL_NUMERIC_COLUMNS = ("onset_to_ct_h", "followup_volume_ml")
# Volumes SimpleITK reads with their geometry: NIfTI, NRRD (3D Slicer), MetaImage (.mha, or an
# .mhd header beside the data file it names). A folder named <case_id> is a DICOM series.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
MASK_SUFFIXES = IMAGE_SUFFIXES
ROOT_FILES = ("truth.csv", "cohort.json")  # files allowed at DATA_ROOT besides centre folders (synthetic cohorts)


@dataclass(frozen=True)
class Case:
    center: str
    case_id: str
    he: int | None  # 1 expansion, 0 none, None unknown (segmentation only)
    image_path: Path
    mask_path: Path | None
    onset_to_ct_h: float | None = None
    followup_volume_ml: float | None = None

    @property
    def storage(self) -> str:
        """Storage format of the image: 'nii.gz', 'nii', 'nrrd', 'mha', 'mhd' or 'dicom'."""
        return storage_format(self.image_path)


def storage_format(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    return next((s[1:] for s in IMAGE_SUFFIXES if path.name.endswith(s)), path.suffix[1:])


def strip_suffix(name: str, suffixes=IMAGE_SUFFIXES) -> str | None:
    for suffix in suffixes:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def list_centers(root: Path) -> list[str]:
    """Centre ids (folder names) under DATA_ROOT, sorted; hidden folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "data root is not a folder")
    centers = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not centers:
        raise DataError(root, "no centre folders found (expected DATA_ROOT/<center_id>/cases.csv)")
    return centers


def parse_he(value: str) -> int | None:
    """'1' -> 1, '0' -> 0, '' -> None; anything else raises ValueError."""
    value = value.strip()
    if value == "":
        return None
    if value in ("0", "1"):
        return int(value)
    raise ValueError(f"he must be 1, 0 or empty, got {value!r}")


def parse_optional_float(value: str | None, column: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:  # float()'s own message does not name the column
        raise ValueError(f"{column} must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{column} must be a finite number >= 0, got {value!r}")
    return number


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file; raises DataError for unreadable or header-less files."""
    header, numbered = read_numbered_table(path)
    return header, [row for _, row in numbered]


def read_numbered_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Like read_table, but each row comes with its line number in the file, so messages point
    at the right line even when the file has blank lines or quoted multi-line fields."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [(reader.line_num, {(k or "").strip(): (v or "") for k, v in row.items()}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(path, f"cannot read CSV: {err}") from err
    if not header:
        raise DataError(path, "empty file (expected a header row with case_id,he)")
    return header, rows


def find_image(images_dir: Path, case_id: str) -> list[Path]:
    """Every image candidate for a case (more than one is an ambiguity the caller reports)."""
    found = [images_dir / f"{case_id}{s}" for s in IMAGE_SUFFIXES if (images_dir / f"{case_id}{s}").is_file()]
    if (images_dir / case_id).is_dir():
        found.append(images_dir / case_id)
    return found


def find_mask(masks_dir: Path, case_id: str) -> list[Path]:
    return [masks_dir / f"{case_id}{s}" for s in MASK_SUFFIXES if (masks_dir / f"{case_id}{s}").is_file()]


def case_id_problem(case_id: str) -> str | None:
    """Why `case_id` cannot name a case (the one rule of the training parser and `hemex check`)."""
    if not CASE_ID_PATTERN.match(case_id):
        return f"case_id {case_id!r} does not match [A-Za-z0-9._-]+"
    if case_id.startswith("."):  # '.', '..' name folders, and hidden files are skipped everywhere
        return f"case_id {case_id!r} must not start with '.'"
    return None


def parse_row(center_dir: Path, row: dict[str, str], line: int) -> Case:
    """One cases.csv row to a Case; raises DataError naming the file and line."""
    where = f"{center_dir / 'cases.csv'}:{line}"
    case_id = row.get("case_id", "").strip()
    problem = case_id_problem(case_id)
    if problem:
        raise DataError(where, problem)
    try:
        he = parse_he(row.get("he", ""))
        onset = parse_optional_float(row.get("onset_to_ct_h"), "onset_to_ct_h")
        followup = parse_optional_float(row.get("followup_volume_ml"), "followup_volume_ml")
    except ValueError as err:
        raise DataError(where, str(err)) from err
    images = find_image(center_dir / "images", case_id)
    if not images:
        raise DataError(where, f"no image for case {case_id!r} in {center_dir / 'images'}")
    if len(images) > 1:
        raise DataError(where, f"case {case_id!r} has several images: {', '.join(p.name for p in images)}")
    masks = find_mask(center_dir / "masks", case_id)
    if len(masks) > 1:
        raise DataError(where, f"case {case_id!r} has several masks: {', '.join(p.name for p in masks)}")
    return Case(center_dir.name, case_id, he, images[0], masks[0] if masks else None, onset, followup)


def read_center(center_dir: Path) -> list[Case]:
    """All cases of one centre, in cases.csv order; raises DataError on the first violation."""
    center_dir = Path(center_dir)
    table = center_dir / "cases.csv"
    if not table.is_file():
        raise DataError(table, "missing (every centre folder needs cases.csv)")
    header, rows = read_table(table)
    problem = missing_columns_problem(header)
    if problem:
        raise DataError(table, problem)
    cases, seen = [], set()
    for line, row in enumerate(rows, start=2):
        case = parse_row(center_dir, row, line)
        if case.case_id in seen:
            raise DataError(f"{table}:{line}", f"duplicate case_id {case.case_id!r}")
        seen.add(case.case_id)
        cases.append(case)
    return cases


def missing_columns_problem(header: list[str]) -> str | None:
    """Why a cases.csv header lacks a required column, with a hint when the file is separated by
    semicolons or tabs (spreadsheet exports in many locales) instead of commas."""
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if not missing:
        return None
    joined = ",".join(header)
    problem = f"missing required column(s): {', '.join(missing)} (header is {joined})"
    for separator, name in ((";", "semicolons"), ("\t", "tabs")):
        if separator in joined:
            return f"{problem}; cases.csv must be comma-separated, this one looks separated by {name}"
    return problem


def read_cohort(root: Path, centers: list[str] | None = None) -> dict[str, list[Case]]:
    """Cases per centre for the named centres (default: all), validated against the contract."""
    root = Path(root)
    available = list_centers(root)
    chosen = centers or available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DataError(root, f"unknown centre(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return {c: read_center(root / c) for c in chosen}
