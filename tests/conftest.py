"""Shared fixtures: tiny synthetic head CTs and a small valid multi-centre cohort on disk."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, io

CASES_HEADER = ["case_id", "he", "onset_to_ct_h", "followup_volume_ml"]


def synthetic_head_ct(size=(24, 24, 6), spacing=(0.9, 0.9, 5.0), origin=(0.0, 0.0, 0.0)):
    """(image, mask): an axial head-like HU volume and its hematoma mask on the same grid.

    Air -1000 HU outside an elliptical skull (1000 HU) around brain (30 HU) holding a 60 HU
    blob: enough to pass every HU plausibility check while staying a few kB on disk.
    """
    nx, ny, nz = size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    radius = ((x - (nx - 1) / 2) / (0.45 * nx)) ** 2 + ((y - (ny - 1) / 2) / (0.4 * ny)) ** 2
    blob = ((x - nx // 2 - 2) ** 2 + (y - ny // 2) ** 2 <= 4) & (np.abs(z - nz // 2) <= 1)
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    hu[radius <= 1.0] = 1000.0
    hu[radius <= 0.75] = 30.0
    hu[blob] = 60.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    mask = sitk.GetImageFromArray(blob.astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def write_cases(path: Path, rows: list[dict], header=CASES_HEADER) -> None:
    """Write a cases.csv; missing columns in a row are left empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def build_cohort(root: Path) -> Path:
    """A valid DATA_ROOT with two centres and every storage format.

    A (NIfTI): a1 he=1 .nii.gz + mask; a2 he=0 .nii + mask at 0.45/2.5 mm; a3 he unknown, stored
        with permuted axes (array axis 0 is patient z), no mask.
    B (DICOM): b1 he=1 series + mask at 0.5/3 mm; b2 he=0 series, no mask.
    Root: truth.csv, README.md and a hidden file, all allowed.
    """
    root = Path(root)
    image, mask = synthetic_head_ct()
    io.write_image(image, root / "A/images/a1.nii.gz")
    io.write_image(mask, root / "A/masks/a1.nii.gz")
    image, mask = synthetic_head_ct(spacing=(0.45, 0.45, 2.5))
    io.write_image(image, root / "A/images/a2.nii", compress=False)
    io.write_image(mask, root / "A/masks/a2.nii.gz")
    image, _ = synthetic_head_ct()
    io.write_image(sitk.PermuteAxes(image, [2, 0, 1]), root / "A/images/a3.nii.gz")
    write_cases(root / "A/cases.csv", [
        {"case_id": "a1", "he": "1", "onset_to_ct_h": "2.5", "followup_volume_ml": "31.2"},
        {"case_id": "a2", "he": "0", "onset_to_ct_h": "4", "followup_volume_ml": ""},
        {"case_id": "a3", "he": ""},
    ])
    image, mask = synthetic_head_ct(spacing=(0.5, 0.5, 3.0), origin=(-6.0, -6.0, 10.0))
    dicom_io.write_dicom_series(image, root / "B/images/b1", "b1")
    io.write_image(mask, root / "B/masks/b1.nii.gz")
    dicom_io.write_dicom_series(image, root / "B/images/b2", "b2")
    write_cases(root / "B/cases.csv", [{"case_id": "b1", "he": "1"}, {"case_id": "b2", "he": "0"}],
                header=["case_id", "he"])
    (root / "truth.csv").write_text("center,case_id,he\n", encoding="utf-8")
    (root / "README.md").write_text("synthetic test cohort\n", encoding="utf-8")
    (root / ".DS_Store").write_bytes(b"\0")
    return root


def enhanced_dicom(series, folder, drop: int | None = None):
    """The series as one Legacy Converted Enhanced CT image (highdicom): the single-file,
    multi-frame form that current scanners and PACS export. `drop` leaves one slice out."""
    import warnings

    import highdicom as hd
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    files = dicom_io.dicom_series_files(series)
    if drop is not None:
        del files[drop]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name.*")
        image = LegacyConvertedEnhancedCTImage([pydicom.dcmread(f) for f in files], hd.UID(), 99, hd.UID(), 1)
    folder.mkdir(parents=True)
    image.save_as(folder / "enhanced.dcm")
    return folder


@pytest.fixture
def site_replies(monkeypatch) -> list:
    """Every reply content hemex's ClientApp sends in this test, as it passes the whitelist."""
    import client.messages as client_messages

    replies = []
    check = client_messages.check_reply
    monkeypatch.setattr(client_messages, "check_reply",
                        lambda content, model=None: replies.append(content) or check(content, model))
    return replies


@pytest.fixture
def task_identity():
    """Messages outside a Flower runtime need a task identity; restore it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def enhanced_copy():
    """The enhanced_dicom converter, for tests of multi-frame DICOM input."""
    return enhanced_dicom


@pytest.fixture
def head_ct():
    """The synthetic_head_ct factory, for tests that write their own images."""
    return synthetic_head_ct


@pytest.fixture(scope="session")
def _cohort_template(tmp_path_factory) -> Path:
    return build_cohort(tmp_path_factory.mktemp("cohort_template") / "data")


@pytest.fixture
def cohort(_cohort_template, tmp_path) -> Path:
    """A fresh valid cohort (see build_cohort) for a test to break: a copy of one built per
    session, since writing the images and DICOM series for every test is the slow part."""
    return Path(shutil.copytree(_cohort_template, tmp_path / "data"))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """The built-in `tiny` synthetic cohort (5 centres x 10 cases), generated once per test session.
    Read-only: a test that breaks files must copy it first."""
    from common.phantoms.cohort import generate_cohort

    root = tmp_path_factory.mktemp("cohorts") / "tiny"
    generate_cohort("tiny", root, seed=0)
    return root
