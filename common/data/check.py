"""`hemex check DATA_ROOT`: validate a site's data against the contract, reporting every problem.

`contract.read_cohort` stops at the first violation, which is right for training but turns fixing
a site export into a slow edit-run loop. This validator walks the whole tree, lists every problem
as one "path: reason" line (paths relative to DATA_ROOT) and ends with a per-centre summary, so a
site can also see whether the cohort looks like what it meant to export (counts, prevalence,
spacings, formats).

Images and masks are read with the same readers training uses (`io.read_ct`, `io.read_mask`),
so whatever passes here also loads there.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from common.data import io
from common.data.check_content import axis_spacings, image_problems, mask_problems
from common.data.contract import (IMAGE_SUFFIXES, MASK_SUFFIXES, OPTIONAL_NUMERIC_COLUMNS, case_id_problem,
                                  missing_columns_problem, ROOT_FILES, find_image, find_mask, list_centers, parse_he,
                                  parse_optional_float, read_numbered_table, storage_format, strip_suffix)
from common.errors import DataError

ROOT_FILE_PATTERNS = (*ROOT_FILES, "README*")  # besides centre folders; hidden entries are ignored
CENTER_ENTRIES = ("cases.csv", "images", "masks")


@dataclass(frozen=True)
class Problem:
    """One contract violation: what (a path, relative to DATA_ROOT where possible) and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        # Always one line: the report promises one problem per line (and grep-able output).
        return " ".join(f"{self.path}: {self.reason}".splitlines())


@dataclass(frozen=True)
class CenterSummary:
    """What a centre holds, as far as it could be read; ranges are None when no image was readable."""

    center: str
    n_cases: int
    n_he: int
    n_nhe: int
    n_unknown: int
    prevalence: float | None  # HE / (HE + NHE); None without labelled cases
    inplane_spacing_range: tuple[float, float] | None  # mm, over both in-plane axes of every image
    slice_spacing_range: tuple[float, float] | None  # mm
    storage: tuple[str, ...]  # sorted subset of 'dicom', 'mha', 'nii', 'nii.gz', 'nrrd'
    n_masks: int


@dataclass
class _Tally:
    """Accumulates a centre's summary while its cases are checked."""

    center: str
    n_cases: int = 0
    he_counts: dict = field(default_factory=lambda: {1: 0, 0: 0, None: 0})
    inplane: list[float] = field(default_factory=list)
    slice: list[float] = field(default_factory=list)
    storage: set[str] = field(default_factory=set)
    n_masks: int = 0

    def summary(self) -> CenterSummary:
        n_he, n_nhe = self.he_counts[1], self.he_counts[0]
        return CenterSummary(
            center=self.center, n_cases=self.n_cases, n_he=n_he, n_nhe=n_nhe, n_unknown=self.he_counts[None],
            prevalence=n_he / (n_he + n_nhe) if n_he + n_nhe else None,
            inplane_spacing_range=(min(self.inplane), max(self.inplane)) if self.inplane else None,
            slice_spacing_range=(min(self.slice), max(self.slice)) if self.slice else None,
            storage=tuple(sorted(self.storage)), n_masks=self.n_masks)


@dataclass(frozen=True)
class _Row:
    """A cases.csv row after the table checks; image / mask are set only when exactly one exists."""

    case_id: str
    he: int | None
    he_valid: bool
    image: Path | None
    mask: Path | None


# ----------------------------------------------------------------------------------------------
# Entry points


def check_data_root(root: Path) -> tuple[list[Problem], list[CenterSummary]]:
    """Every contract violation under DATA_ROOT, and a summary per centre."""
    root = Path(root)
    problems: list[Problem] = []
    try:
        centers = list_centers(root)
    except DataError as err:
        centers = []
        problems.append(Problem(err.path, err.reason))
    except OSError as err:
        centers = []
        problems.append(Problem(str(root), f"cannot list data root: {err.strerror or err}"))
    if root.is_dir():
        problems[:0] = _check_root_entries(root)
    summaries = []
    for center in centers:
        center_problems, summary = _check_center(root, center)
        problems += center_problems
        summaries.append(summary)
    return problems, summaries


def print_report(problems: list[Problem], summaries: list[CenterSummary], console: Console | None = None) -> None:
    """Problems one per line, then the per-centre table, then a one-line verdict."""
    console = console or Console()
    for problem in problems:
        # No markup or highlighting: paths may hold '[' and must print exactly as str(problem).
        console.print(str(problem), markup=False, highlight=False, soft_wrap=True)
    if summaries:
        console.print(_summary_table(summaries))
    if problems:
        console.print(f"FAILED: {len(problems)} problem(s)", markup=False, highlight=False)
    else:
        n_cases = sum(s.n_cases for s in summaries)
        console.print(f"OK: {len(summaries)} centres, {n_cases} cases", markup=False, highlight=False)


def run_check(root: Path, console: Console | None = None) -> int:
    """`hemex check`: print the report; exit code 0 when the data root is clean, 1 otherwise."""
    problems, summaries = check_data_root(Path(root))
    print_report(problems, summaries, console)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------
# Folder layout


def _check_root_entries(root: Path) -> list[Problem]:
    """Stray files at DATA_ROOT: usually a centre's data copied one level too high."""
    entries, problems = _visible_entries(root, root)
    for entry in entries:
        if not entry.is_dir() and not any(fnmatch.fnmatch(entry.name, p) for p in ROOT_FILE_PATTERNS):
            problems.append(Problem(_rel(entry, root), "unknown file at DATA_ROOT (allowed: centre folders, "
                                    f"{', '.join(ROOT_FILE_PATTERNS)})"))
    return problems


def _check_center_entries(root: Path, center_dir: Path) -> list[Problem]:
    """Anything in a centre folder besides cases.csv, images/ and masks/ is ignored by training:
    a misspelt 'Images' or a second table would silently drop data, so it is reported."""
    entries, problems = _visible_entries(center_dir, root)
    for entry in entries:
        if entry.name not in CENTER_ENTRIES:
            problems.append(Problem(_rel(entry, root), "unknown entry (a centre folder holds only cases.csv, "
                                    "images/ and masks/)"))
    for name in ("images", "masks"):
        folder = center_dir / name
        if folder.exists() and not folder.is_dir():
            problems.append(Problem(_rel(folder, root), "must be a folder"))
    if not (center_dir / "images").exists():
        problems.append(Problem(_rel(center_dir / "images", root),
                                f"missing (expected images/<case_id>{', '.join(IMAGE_SUFFIXES)} or a DICOM folder)"))
    return problems


def _check_folder_entries(root: Path, folder: Path, case_ids: set[str], kind: str) -> list[Problem]:
    """Files in images/ or masks/ that no row claims (orphans) or that the readers never look at.

    `case_ids` holds every case_id string of the table, valid or not, so a row with a bad id is
    reported once, on its row, rather than again as an orphan file.
    """
    suffixes = IMAGE_SUFFIXES if kind == "image" else MASK_SUFFIXES
    expected = ("<case_id>" + ", ".join(suffixes) + (" or a DICOM folder <case_id>/" if kind == "image" else ""))
    entries, problems = _visible_entries(folder, root)
    companions = io.metaimage_data_files(entries)
    for entry in entries:
        if entry.name in companions:  # an .mhd header's voxel data: read with its header
            continue
        if entry.is_dir() and kind == "image":
            key = entry.name
        else:
            key = None if entry.is_dir() else strip_suffix(entry.name, suffixes)
            if key is None:
                problems.append(Problem(_rel(entry, root), f"unsupported {kind} entry (expected {expected})"))
                continue
        if key not in case_ids:
            problems.append(Problem(_rel(entry, root), f"orphan {kind}: no row for case {key!r} in cases.csv"))
    return problems


def _visible_entries(folder: Path, root: Path) -> tuple[list[Path], list[Problem]]:
    """Sorted non-hidden entries; hidden ones (.DS_Store, editor and atomic-write temporaries)
    are not data. An unlistable folder becomes a problem rather than a crash."""
    if not folder.is_dir():
        return [], []
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".")), []
    except OSError as err:
        return [], [Problem(_rel(folder, root), f"cannot list folder: {err.strerror or err}")]


# ----------------------------------------------------------------------------------------------
# One centre


def _check_center(root: Path, center: str) -> tuple[list[Problem], CenterSummary]:
    center_dir = root / center
    tally = _Tally(center)
    problems = _check_center_entries(root, center_dir)
    table = _read_cases(root, center_dir, problems)
    if table is None:  # without rows there is nothing to match files against
        return problems, tally.summary()
    rows = []
    first_line: dict[str, int] = {}
    for line, raw in table:
        where = f"{_rel(center_dir / 'cases.csv', root)}:{line}"
        case_id = raw.get("case_id", "").strip()
        if case_id in first_line:
            problems.append(Problem(where, f"duplicate case_id {case_id!r} (first on line {first_line[case_id]})"))
            continue
        first_line[case_id] = line
        reasons, row = _check_row(center_dir, raw)
        problems += [Problem(where, reason) for reason in reasons]
        rows.append(row)
        tally.n_cases += 1
        if row.he_valid:
            tally.he_counts[row.he] += 1
    case_ids = set(first_line)
    problems += _check_folder_entries(root, center_dir / "images", case_ids, "image")
    problems += _check_folder_entries(root, center_dir / "masks", case_ids, "mask")
    for row in rows:
        problems += _check_case_files(root, row, tally)
    return problems, tally.summary()


def _read_cases(root: Path, center_dir: Path, problems: list[Problem]) -> list[tuple[int, dict]] | None:
    """Numbered rows of cases.csv, or None (with the reason appended to `problems`) when the
    table itself is unusable."""
    table = center_dir / "cases.csv"
    where = _rel(table, root)
    if not table.is_file():
        problems.append(Problem(where, "missing (every centre folder needs cases.csv)"
                                if not table.exists() else "must be a file"))
        return None
    try:
        header, rows = read_numbered_table(table)
    except DataError as err:
        problems.append(Problem(where, err.reason))
        return None
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:  # csv.DictReader keeps only the last of same-named columns
        problems.append(Problem(where, f"duplicate column(s): {', '.join(duplicates)}"))
    missing = missing_columns_problem(header)
    if missing:
        problems.append(Problem(where, missing))
        return None
    if not rows:
        problems.append(Problem(where, "no case rows (only a header)"))
    return rows


def _check_row(center_dir: Path, raw: dict[str, str]) -> tuple[list[str], _Row]:
    """Table-level problems of one row, and where its image and mask are."""
    reasons = []
    case_id = raw.get("case_id", "").strip()
    problem = case_id_problem(case_id)
    id_ok = problem is None
    if problem:
        reasons.append(problem)
    he, he_valid = None, True
    try:
        he = parse_he(raw.get("he", ""))
    except ValueError as err:
        he_valid = False
        reasons.append(str(err))
    for column in OPTIONAL_NUMERIC_COLUMNS:
        try:
            parse_optional_float(raw.get(column), column)
        except ValueError as err:
            reasons.append(str(err))
    image = mask = None
    if id_ok:
        image, image_reason = _single(find_image(center_dir / "images", case_id), case_id, "image")
        mask, mask_reason = _single(find_mask(center_dir / "masks", case_id), case_id, "mask")
        if image is None and image_reason is None and (center_dir / "images").is_dir():
            image_reason = f"no image for case {case_id!r} in images/"
        reasons += [r for r in (image_reason, mask_reason) if r]
    return reasons, _Row(case_id, he, he_valid, image, mask)


def _single(paths: list[Path], case_id: str, kind: str) -> tuple[Path | None, str | None]:
    """The one candidate file, or None with a reason when several compete (which one would a
    reader pick? neither: the site has to decide)."""
    if len(paths) > 1:
        return None, f"case {case_id!r} has several {kind}s: {', '.join(p.name for p in paths)}"
    return (paths[0] if paths else None), None


# ----------------------------------------------------------------------------------------------
# Image and mask content


def _check_case_files(root: Path, row: _Row, tally: _Tally) -> list[Problem]:
    """Read one case's image and mask, check their content and record geometry for the summary."""
    problems, image = [], None
    if row.image is not None:
        tally.storage.add(storage_format(row.image))
        found, image = image_problems(row.image)
        problems += [Problem(_rel(path, root), reason) for path, reason in found]
        if image is not None:
            inplane, slice_spacing = axis_spacings(image)
            # NIfTI stores spacing as float32: round off the 0.44999998 noise for the summary.
            tally.inplane += [round(v, 4) for v in inplane]
            tally.slice.append(round(slice_spacing, 4))
    if row.mask is not None:
        tally.n_masks += 1
        found = mask_problems(row.mask, image, row.he if row.he_valid else None)
        problems += [Problem(_rel(path, root), reason) for path, reason in found]
    return problems


# ----------------------------------------------------------------------------------------------
# Report helpers


def _summary_table(summaries: list[CenterSummary]) -> Table:
    headers = ("centre", "cases", "HE", "NHE", "unknown", "prev %", "in-plane mm", "slice mm", "storage", "masks")
    rows = [(s.center, str(s.n_cases), str(s.n_he), str(s.n_nhe), str(s.n_unknown),
             f"{100 * s.prevalence:.1f}" if s.prevalence is not None else "-",
             _format_range(s.inplane_spacing_range), _format_range(s.slice_spacing_range),
             ",".join(s.storage) or "-", str(s.n_masks)) for s in summaries]
    # No vertical rules and two-line headers: fits an 80-column terminal with room for long centre names.
    table = Table(title="Centres", box=None, pad_edge=False, header_style="bold underline")
    for header in headers:
        table.add_column(header.replace(" ", "\n", 1) if " " in header else header,
                         justify="left" if header in ("centre", "storage") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _format_range(bounds: tuple[float, float] | None) -> str:
    if bounds is None:
        return "-"
    low, high = bounds
    return f"{low:.2f}" if np.isclose(low, high) else f"{low:.2f}-{high:.2f}"


def _rel(path, root: Path) -> str:
    """Path relative to DATA_ROOT (shorter, and the same on every machine), else as given."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
