"""`hemex check`: a valid cohort passes; each broken rule yields exactly its own problem."""

from __future__ import annotations

import shutil
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from rich.console import Console

from common.data import dicom_io, io
from common.data.check import Problem, check_data_root, print_report, run_check

# A/cases.csv lines: 1 header, 2 a1 (he=1, mask), 3 a2 (he=0, mask), 4 a3 (he unknown, no mask).
# B/cases.csv lines: 1 header, 2 b1 (he=1, DICOM, mask), 3 b2 (he=0, DICOM).


def assert_only(root: Path, path: str, phrase: str) -> Problem:
    """Exactly one problem, at `path`, whose reason contains `phrase`."""
    problems, _ = check_data_root(root)
    assert [p.path for p in problems] == [path], [str(p) for p in problems]
    assert phrase in problems[0].reason, str(problems[0])
    return problems[0]


def assert_clean(root: Path) -> None:
    problems, _ = check_data_root(root)
    assert problems == [], [str(p) for p in problems]


def set_line(table: Path, line: int, text: str) -> None:
    """Replace (or, one past the end, append) a 1-based line of a CSV file."""
    lines = table.read_text(encoding="utf-8").splitlines()
    if line == len(lines) + 1:
        lines.append(text)
    else:
        lines[line - 1] = text
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")


def head_array(head_ct) -> np.ndarray:
    image, _ = head_ct()
    return sitk.GetArrayFromImage(image)


def write_like(array: np.ndarray, path: Path, spacing=(0.9, 0.9, 5.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    io.write_image(image, path)


def report_text(problems, summaries) -> str:
    out = StringIO()
    print_report(problems, summaries, Console(file=out, width=120, color_system=None))
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Valid cohort, report, exit codes


def test_valid_cohort_has_no_problems_and_correct_summaries(cohort):
    problems, summaries = check_data_root(cohort)
    assert problems == []
    a, b = summaries
    assert (a.center, a.n_cases, a.n_he, a.n_nhe, a.n_unknown, a.n_masks) == ("A", 3, 1, 1, 1, 2)
    assert a.prevalence == pytest.approx(0.5)
    assert a.inplane_spacing_range == pytest.approx((0.45, 0.9))
    assert a.slice_spacing_range == pytest.approx((2.5, 5.0))  # a3 is stored z-first: still slice 5 mm
    assert a.storage == ("nii", "nii.gz")
    assert (b.center, b.n_cases, b.n_he, b.n_nhe, b.n_unknown, b.n_masks) == ("B", 2, 1, 1, 0, 1)
    assert b.prevalence == pytest.approx(0.5)
    assert b.inplane_spacing_range == pytest.approx((0.5, 0.5))
    assert b.slice_spacing_range == pytest.approx((3.0, 3.0))
    assert b.storage == ("dicom",)


def test_prevalence_is_none_without_labelled_cases(cohort):
    set_line(cohort / "B/cases.csv", 2, "b1,")
    set_line(cohort / "B/cases.csv", 3, "b2,")
    problems, summaries = check_data_root(cohort)
    assert problems == []
    assert summaries[1].prevalence is None and summaries[1].n_unknown == 2


def test_run_check_exit_code_0_on_valid_cohort(cohort):
    out = StringIO()
    assert run_check(cohort, Console(file=out, width=120, color_system=None)) == 0
    text = out.getvalue()
    assert text.rstrip().splitlines()[-1] == "OK: 2 centres, 5 cases"
    for header in ("centre", "cases", "HE", "NHE", "unknown", "storage", "masks"):
        assert header in text
    assert "0.45-0.90" in text and "dicom" in text


def test_run_check_exit_code_1_and_one_line_per_problem(cohort):
    (cohort / "A/images/a3.nii.gz").unlink()
    (cohort / "notes.txt").write_text("x", encoding="utf-8")
    problems, summaries = check_data_root(cohort)
    out = StringIO()
    assert run_check(cohort, Console(file=out, width=120, color_system=None)) == 1
    lines = out.getvalue().rstrip().splitlines()
    assert lines[: len(problems)] == [str(p) for p in problems]
    assert lines[-1] == "FAILED: 2 problem(s)"


def test_problem_str_is_one_line():
    assert str(Problem("A/cases.csv:3", "bad\nvalue")) == "A/cases.csv:3: bad value"


def test_report_prints_paths_with_brackets_verbatim():
    problem = Problem("A/images/[x].nii.gz", "orphan image: no row for case '[x]' in cases.csv")
    assert report_text([problem], []).splitlines()[0] == str(problem)


# ----------------------------------------------------------------------------------------------
# DATA_ROOT


def test_root_not_a_folder(tmp_path):
    root = tmp_path / "file.txt"
    root.write_text("x", encoding="utf-8")
    problems, summaries = check_data_root(root)
    assert [(p.path, p.reason) for p in problems] == [(str(root), "data root is not a folder")]
    assert summaries == []


def test_root_missing(tmp_path):
    problems, _ = check_data_root(tmp_path / "nowhere")
    assert len(problems) == 1 and "not a folder" in problems[0].reason


def test_root_without_centres(tmp_path):
    (tmp_path / "truth.csv").write_text("x\n", encoding="utf-8")
    assert_only(tmp_path, str(tmp_path), "no centre folders")


@pytest.mark.parametrize("name", ["notes.txt", "cases.csv", "A.nii.gz"])
def test_unknown_file_at_root(cohort, name):
    (cohort / name).write_text("x", encoding="utf-8")
    assert_only(cohort, name, "unknown file at DATA_ROOT")


@pytest.mark.parametrize("name", ["README", "README.txt", ".hidden", ".A"])
def test_allowed_or_hidden_root_entries(cohort, name):
    (cohort / name).write_text("x", encoding="utf-8")
    assert_clean(cohort)


# ----------------------------------------------------------------------------------------------
# Centre folder and cases.csv


def test_missing_cases_csv(cohort):
    (cohort / "A/cases.csv").unlink()
    assert_only(cohort, "A/cases.csv", "missing")


@pytest.mark.parametrize("content, phrase", [
    (b"", "empty file"),
    (b"case_id,he\n\xff\xfe\x00a1,1\n", "cannot read CSV"),
])
def test_unreadable_or_empty_cases_csv(cohort, content, phrase):
    (cohort / "A/cases.csv").write_bytes(content)
    assert_only(cohort, "A/cases.csv", phrase)


def test_cases_csv_with_only_a_header(cohort):
    (cohort / "C/images").mkdir(parents=True)
    (cohort / "C/cases.csv").write_text("case_id,he\n", encoding="utf-8")
    assert_only(cohort, "C/cases.csv", "no case rows")


@pytest.mark.parametrize("header, missing", [
    ("id,he,onset_to_ct_h,followup_volume_ml", "case_id"),
    ("case_id,label,onset_to_ct_h,followup_volume_ml", "he"),
])
def test_missing_required_column(cohort, header, missing):
    set_line(cohort / "A/cases.csv", 1, header)
    problem = assert_only(cohort, "A/cases.csv", "missing required column(s)")
    assert missing in problem.reason



@pytest.mark.parametrize("separator, name", [(";", "semicolons"), ("\t", "tabs")])
def test_a_cases_table_not_separated_by_commas_says_so_in_check_and_training(cohort, separator, name):
    from common.data.contract import read_cohort
    from common.errors import DataError

    lines = (cohort / "A/cases.csv").read_text(encoding="utf-8").splitlines()
    (cohort / "A/cases.csv").write_text("\n".join(line.replace(",", separator) for line in lines) + "\n",
                                        encoding="utf-8")
    problem = assert_only(cohort, "A/cases.csv", "missing required column(s): case_id, he")
    assert problem.reason.endswith(f"cases.csv must be comma-separated, this one looks separated by {name}")
    with pytest.raises(DataError, match=f"this one looks separated by {name}"):
        read_cohort(cohort, ["A"])

def test_duplicate_column(cohort):
    (cohort / "B/cases.csv").write_text("case_id,he,he\nb1,1,1\nb2,0,0\n", encoding="utf-8")
    assert_only(cohort, "B/cases.csv", "duplicate column(s): he")


@pytest.mark.parametrize("line, text, phrase", [
    (2, "a1,yes,2.5,31.2", "he must be 1, 0 or empty"),
    (2, "a1,2,2.5,31.2", "he must be 1, 0 or empty"),
    (2, "a1,1,-1,31.2", "onset_to_ct_h must be a finite number >= 0"),
    (2, "a1,1,nan,31.2", "onset_to_ct_h must be a finite number >= 0"),
    (3, "a2,0,4,abc", "followup_volume_ml must be a finite number >= 0"),
    (5, "a1,0,,", "duplicate case_id 'a1' (first on line 2)"),
])
def test_bad_row_values(cohort, line, text, phrase):
    set_line(cohort / "A/cases.csv", line, text)
    assert_only(cohort, f"A/cases.csv:{line}", phrase)


@pytest.mark.parametrize("case_id, phrase", [
    ("a 1", "does not match [A-Za-z0-9._-]+"),
    ("a1!", "does not match [A-Za-z0-9._-]+"),
    (".a1", "must not start with '.'"),
])
def test_bad_case_id(cohort, case_id, phrase):
    # Files follow the id, so only the id itself is wrong (no orphan or missing-image noise).
    set_line(cohort / "A/cases.csv", 2, f"{case_id},1,,")
    for folder in ("images", "masks"):
        (cohort / f"A/{folder}/a1.nii.gz").rename(cohort / f"A/{folder}/{case_id}.nii.gz")
    assert_only(cohort, "A/cases.csv:2", phrase)


@pytest.mark.parametrize("case_id", [".", "..", ".a1", "a 1", "a/1"])
def test_training_parser_and_check_share_one_case_id_rule(cohort, case_id):
    """A case_id `hemex check` refuses never reaches training, naming the same line and reason."""
    from common.data.contract import read_center
    from common.errors import DataError

    set_line(cohort / "A/cases.csv", 2, f"{case_id},1,,")
    problems = [p for p in check_data_root(cohort)[0] if p.path == "A/cases.csv:2"]
    assert len(problems) == 1 and "case_id" in problems[0].reason
    with pytest.raises(DataError) as err:
        read_center(cohort / "A")
    assert str(err.value) == f"{cohort / 'A/cases.csv'}:2: {problems[0].reason}"


def test_line_numbers_count_blank_lines(cohort):
    table = cohort / "A/cases.csv"
    table.write_text("case_id,he,onset_to_ct_h,followup_volume_ml\n\na1,1,,\na2,x,,\na3,,,\n", encoding="utf-8")
    assert_only(cohort, "A/cases.csv:4", "he must be 1, 0 or empty")


@pytest.mark.parametrize("entry, is_dir", [("notes.txt", False), ("Images", True), ("cases_old.csv", False)])
def test_unknown_entry_in_centre(cohort, entry, is_dir):
    path = cohort / "A" / entry
    path.mkdir() if is_dir else path.write_text("x", encoding="utf-8")
    assert_only(cohort, f"A/{entry}", "unknown entry")


def test_hidden_entries_are_ignored(cohort):
    (cohort / "A/.DS_Store").write_text("x", encoding="utf-8")
    (cohort / "A/images/.a1.nii.gz.1234.tmp.nii.gz").write_text("x", encoding="utf-8")
    (cohort / "A/masks/._a1.nii.gz").write_text("x", encoding="utf-8")
    assert_clean(cohort)


def test_missing_images_folder_is_reported_once(cohort):
    shutil.rmtree(cohort / "B/images")
    assert_only(cohort, "B/images", "missing")


def test_masks_must_be_a_folder(cohort):
    shutil.rmtree(cohort / "A/masks")
    (cohort / "A/masks").write_text("x", encoding="utf-8")
    assert_only(cohort, "A/masks", "must be a folder")


# ----------------------------------------------------------------------------------------------
# Files per case, orphans


def test_no_image(cohort):
    (cohort / "A/images/a3.nii.gz").unlink()
    assert_only(cohort, "A/cases.csv:4", "no image for case 'a3'")


@pytest.mark.parametrize("center, line, source, extra", [
    ("A", 2, "images/a1.nii.gz", "images/a1.nii"),
    ("B", 3, "../A/images/a1.nii.gz", "images/b2.nii.gz"),  # NIfTI next to the DICOM folder
])
def test_several_images(cohort, center, line, source, extra):
    shutil.copy(cohort / center / source, cohort / center / extra)
    assert_only(cohort, f"{center}/cases.csv:{line}", "several images")


def test_several_masks(cohort):
    shutil.copy(cohort / "A/masks/a1.nii.gz", cohort / "A/masks/a1.nii")
    assert_only(cohort, "A/cases.csv:2", "several masks: a1.nii.gz, a1.nii")


@pytest.mark.parametrize("source, orphan, phrase", [
    ("A/images/a1.nii.gz", "A/images/zz.nii.gz", "orphan image: no row for case 'zz'"),
    ("B/images/b2", "B/images/b3", "orphan image: no row for case 'b3'"),
    ("A/masks/a1.nii.gz", "A/masks/zz.nii", "orphan mask: no row for case 'zz'"),
    ("A/images/a1.nii.gz", "A/images/a1.img", "unsupported image entry"),  # Analyze 7.5: not read
    ("A/images/a1.nii.gz", "A/images/a1.nii.gz.bak", "unsupported image entry"),
    ("B/images/b2", "A/masks/a1", "unsupported mask entry"),
])
def test_orphan_and_unsupported_entries(cohort, source, orphan, phrase):
    copy = shutil.copytree if (cohort / source).is_dir() else shutil.copy
    copy(cohort / source, cohort / orphan)
    assert_only(cohort, orphan, phrase)


# ----------------------------------------------------------------------------------------------
# Image content


@pytest.mark.parametrize("write, phrase", [
    (lambda p, a: p.write_bytes(b"not an image"), "cannot read image"),
    (lambda p, a: write_like(a[0], p, spacing=(0.9, 0.9)), "expected a 3D volume"),
    (lambda p, a: io.write_image(sitk.Compose([sitk.GetImageFromArray(a)] * 2), p), "expected a scalar image"),
    (lambda p, a: write_like(np.where(a == 1000, 5000, a), p), "not in HU or rescale missing"),
    (lambda p, a: write_like(np.where(a == -1000, -1500 - np.arange(a.size).reshape(a.shape) % 7, a), p),
     "not in HU or rescale missing"),
    (lambda p, a: write_like(a + 1024, p), "no voxel below -200 HU: probably not HU (rescale intercept missing?)"),
    (lambda p, a: write_like(np.where(a >= 30, 200, a), p), "soft-tissue range [0, 100] HU"),
    (lambda p, a: write_like(np.full_like(a, -1000), p), "constant image"),
])
def test_bad_image_content(cohort, head_ct, write, phrase):
    write(cohort / "A/images/a1.nii.gz", head_array(head_ct))
    assert_only(cohort, "A/images/a1.nii.gz", phrase)


def test_nrrd_and_metaimage_cases_are_valid(cohort):
    # 3D Slicer's NRRD and ITK's MetaImage (one .mha, or an .mhd header with its .raw / .zraw data
    # file) carry the geometry just as NIfTI does.
    for case, suffix, compress in (("a1", ".nrrd", True), ("a2", ".mha", True), ("a3", ".mhd", True)):
        old = next((cohort / "A/images").glob(f"{case}.nii*"))
        sitk.WriteImage(sitk.ReadImage(str(old)), str(cohort / f"A/images/{case}{suffix}"), useCompression=compress)
        old.unlink()
    sitk.WriteImage(sitk.ReadImage(str(cohort / "A/masks/a1.nii.gz")), str(cohort / "A/masks/a1.nrrd"))
    (cohort / "A/masks/a1.nii.gz").unlink()
    sitk.WriteImage(sitk.ReadImage(str(cohort / "A/masks/a2.nii.gz")), str(cohort / "A/masks/a2.mhd"))
    (cohort / "A/masks/a2.nii.gz").unlink()
    assert (cohort / "A/images/a3.zraw").is_file() and (cohort / "A/masks/a2.raw").is_file()
    problems, summaries = check_data_root(cohort)
    assert problems == [], [str(p) for p in problems]
    assert summaries[0].storage == ("mha", "mhd", "nrrd")
    (cohort / "A/images/stray.raw").write_bytes(b"\0" * 8)  # no header points to it
    problems, _ = check_data_root(cohort)
    assert [(p.path, p.reason.split(" (")[0]) for p in problems] == [("A/images/stray.raw", "unsupported image entry")]


def test_scan_of_a_trunk_is_a_problem(cohort, head_ct):
    # The same outline at 15 mm pixels spans 330 x 300 mm: a trunk, not a head (a3 has no mask).
    write_like(head_array(head_ct), cohort / "A/images/a3.nii.gz", spacing=(15.0, 15.0, 5.0))
    problem = assert_only(cohort, "A/images/a3.nii.gz", "larger than a head (<= 260 mm): not a head CT?")
    assert problem.reason.startswith("body cross-section 330 x 300 mm")


def test_uniform_padding_value_is_not_a_calibration_error(cohort, head_ct):
    # Scanners pad outside the reconstruction circle with one value such as -3024.
    array = head_array(head_ct)
    array[:, :2, :] = -3024
    write_like(array, cohort / "A/images/a1.nii.gz")
    problems, _ = check_data_root(cohort)
    assert problems == []


def test_non_finite_values(cohort, monkeypatch):
    # ITK's NIfTI reader turns NaN into 0, so feed read_ct a NaN volume directly.
    real_read = io._read_file

    def read_with_nan(path):
        image = real_read(path)
        if path.name == "a1.nii.gz" and "images" in path.parts:
            array = sitk.GetArrayFromImage(image)
            array[0, 0, 0] = np.nan
            nan_image = sitk.GetImageFromArray(array)
            nan_image.CopyInformation(image)
            return nan_image
        return image

    monkeypatch.setattr(io, "_read_file", read_with_nan)
    assert_only(cohort, "A/images/a1.nii.gz", "NaN or infinite")


def test_unreadable_dicom_folder(cohort):
    shutil.rmtree(cohort / "B/images/b2")
    (cohort / "B/images/b2").mkdir()
    (cohort / "B/images/b2/slice1.dcm").write_bytes(b"not dicom")
    assert_only(cohort, "B/images/b2", "no DICOM series")


def test_dicom_without_rescale_intercept(cohort, head_ct):
    # Stored values exported as-is (intercept 0): air reads as ~24, not -1000.
    image, _ = head_ct(spacing=(0.5, 0.5, 3.0), origin=(-6.0, -6.0, 10.0))
    dicom_io.write_dicom_series(image + 1024, cohort / "B/images/b2", "b2", extra_tags={"0028|1052": "0"})
    assert_only(cohort, "B/images/b2", "rescale intercept missing")


def test_dicom_series_with_a_missing_slice(cohort):
    # It still loads (rebuilt on its true 3 mm grid), but a gap is missing data the site should see.
    files = dicom_io.dicom_series_files(cohort / "B/images/b2")
    Path(files[2]).unlink()
    problem = assert_only(cohort, "B/images/b2", "resampled to a regular 3.00 mm grid")
    assert "slice spacing varies 3.00-6.00 mm (1 gap(s): missing slices?)" in problem.reason


def test_a_case_folder_holding_a_whole_study_is_reported_with_the_series_read(cohort, head_ct):
    # It loads (the axial soft-tissue series is chosen), but a training case should be one series.
    image, _ = head_ct(spacing=(0.5, 0.5, 3.0), origin=(-6.0, -6.0, 10.0))
    dicom_io.write_dicom_series(image, cohort / "B/images/b2-bone", "b2", series_description="BONE",
                          extra_tags={"0028|1051": "2000"})
    for path in (cohort / "B/images/b2-bone").iterdir():
        path.rename(cohort / "B/images/b2" / f"bone-{path.name}")
    (cohort / "B/images/b2-bone").rmdir()
    problem = assert_only(cohort, "B/images/b2", "DICOM folder holds 2 series; read 'NCCT' (6 image(s), 3 mm)")
    assert problem.reason.endswith("not read: 'BONE' (6 image(s), 3 mm): bone or lung reconstruction")


# ----------------------------------------------------------------------------------------------
# Mask content


@pytest.mark.parametrize("change, what", [
    (lambda m: m[:, :, :5], "size"),
    (lambda m: _with(m, spacing=(0.8, 0.9, 5.0)), "spacing"),
    (lambda m: _with(m, origin=(0.0, 0.0, 7.5)), "origin"),
    (lambda m: _with(m, direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1)), "direction"),
])
def test_mask_not_on_image_grid(cohort, head_ct, change, what):
    _, mask = head_ct()
    io.write_image(change(mask), cohort / "A/masks/a1.nii.gz")
    problem = assert_only(cohort, "A/masks/a1.nii.gz", "mask not on the image grid")
    assert problem.reason.split(": ", 1)[1].startswith(what)


def _with(image: sitk.Image, **geometry) -> sitk.Image:
    image = sitk.Image(image)
    for name, value in geometry.items():
        getattr(image, f"Set{name.capitalize()}")(value)
    return image


def test_mask_on_dicom_image_grid_is_checked(cohort, head_ct):
    _, mask = head_ct()  # A's grid, not B's
    io.write_image(mask, cohort / "B/masks/b1.nii.gz")
    assert_only(cohort, "B/masks/b1.nii.gz", "mask not on the image grid")


@pytest.mark.parametrize("write, phrase", [
    (lambda p, m: p.write_bytes(b"not a mask"), "cannot read image"),
    (lambda p, m: io.write_image(m[:, :, 0], p), "expected a 3D mask"),
    (lambda p, m: io.write_image(sitk.Compose([m, m]), p), "expected a scalar mask"),
    (lambda p, m: io.write_image(_multilabel(m), p), "2 different nonzero labels (3 distinct values: 0, 1, 2)"),
    (lambda p, m: io.write_image(m * 0, p), "empty mask but he=1 is known"),
])
def test_bad_mask_content(cohort, head_ct, write, phrase):
    _, mask = head_ct()
    write(cohort / "A/masks/a1.nii.gz", mask)
    assert_only(cohort, "A/masks/a1.nii.gz", phrase)


def _multilabel(mask: sitk.Image) -> sitk.Image:
    """The hematoma as label 1 plus a second structure as label 2."""
    labels = sitk.GetArrayFromImage(mask)
    labels[:, :, :4] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(mask)
    return image


def test_empty_mask_with_unknown_he_is_fine(cohort):
    image = sitk.ReadImage(str(cohort / "A/images/a3.nii.gz"))
    empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(image)
    io.write_image(empty, cohort / "A/masks/a3.nii.gz")
    assert_clean(cohort)


def test_mask_with_255_label_is_binary(cohort, head_ct):
    _, mask = head_ct()
    io.write_image(mask * 255, cohort / "A/masks/a1.nii.gz")
    assert_clean(cohort)


# ----------------------------------------------------------------------------------------------
# Every problem at once


def test_reports_every_problem_not_just_the_first(cohort):
    set_line(cohort / "A/cases.csv", 2, "a1,maybe,,")
    (cohort / "A/images/a3.nii.gz").unlink()
    (cohort / "B/cases.csv").unlink()
    (cohort / "stray.txt").write_text("x", encoding="utf-8")
    problems, summaries = check_data_root(cohort)
    assert [p.path for p in problems] == ["stray.txt", "A/cases.csv:2", "A/cases.csv:4", "B/cases.csv"]
    assert [s.center for s in summaries] == ["A", "B"]
    assert summaries[1].n_cases == 0
