"""A study export (several series, flat or in subfolders): the axial soft-tissue NCCT is read."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, io
from common.data.dicom_study import find_series
from common.errors import DataError
from common.inference.predict import find_cases

STUDY = "2.25.424242"


def head(shift=0.0, size=(24, 24, 8), spacing=(0.9, 0.9, 5.0)):
    """An axial volume whose voxels are distinct, plus `shift` HU (tells the series apart)."""
    nx, ny, nz = size
    hu = (np.arange(nx * ny * nz).reshape(nz, ny, nx) % 1500 - 500 + shift).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin((-10.0, -12.0, 20.0))
    return image, hu


def write(image, folder, description, patient="p1", study=STUDY, date="20250101", **tags):
    extra = {"0020|000d": study, "0008|0020": date, **tags}
    dicom_io.write_dicom_series(image, folder, patient_id=patient, series_description=description, extra_tags=extra)
    return folder


def export(root, layout="flat"):
    """One examination as a PACS exports it: brain and bone kernels at 5 mm, thin 1 mm slices, a
    localizer and a sagittal reformat. `flat`: one folder; `nested`: PATIENT/STUDY/SERIES."""
    brain, hu = head()
    thin, _ = head(shift=7.0, size=(24, 24, 40), spacing=(0.9, 0.9, 1.0))
    scout, _ = head(size=(32, 20, 1))
    sagittal, _ = head(shift=3.0)
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))  # slice normal along patient x
    series = {"HEAD 5mm": (brain, {"0018|1210": "H30s", "0028|1050": "40", "0028|1051": "80"}),
              "HEAD BONE": (head(shift=100.0)[0], {"0018|1210": "H70h", "0028|1050": "700", "0028|1051": "3000"}),
              "HEAD 1mm": (thin, {"0018|1210": "H30s", "0028|1051": "80"}),
              "SCOUT": (scout, {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"}),
              "SAG MPR": (sagittal, {"0008|0008": "DERIVED\\SECONDARY\\MPR"})}
    staging = root.parent / f".{root.name}-series"
    for k, (description, (image, tags)) in enumerate(series.items()):
        write(image, staging / f"SE{k:03d}", description, **tags)
    if layout == "flat":
        root.mkdir(parents=True)
        for file in staging.rglob("*.dcm"):
            shutil.move(str(file), root / file.name)
    else:
        (root / "PAT0001").mkdir(parents=True)
        shutil.move(str(staging), root / "PAT0001" / "ST0001")
    shutil.rmtree(staging, ignore_errors=True)
    return hu


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_a_study_export_reads_its_axial_soft_tissue_series_and_says_so(tmp_path, layout):
    hu = export(tmp_path / "export", layout)
    notes = []
    image = io.read_ct(tmp_path / "export", notes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)  # the brain-kernel 5 mm series, exactly
    assert image.GetSpacing() == pytest.approx((0.9, 0.9, 5.0), abs=1e-4)
    assert len(notes) == 1, notes  # the other series are accounted for, not reported as stray files
    note = notes[0]
    assert note.startswith("DICOM folder holds 5 series; read 'HEAD 5mm' (8 image(s), 5 mm, H30s) as the head NCCT")
    assert "'HEAD BONE' (8 image(s), 5 mm, H70h): bone or lung reconstruction" in note
    assert "'HEAD 1mm' (40 image(s), 1 mm, H30s): thickness further from 5 mm" in note
    assert "'SCOUT' (1 image(s), 5 mm): localizer" in note
    assert "'SAG MPR' (8 image(s), 5 mm): not axial" in note
    assert io.slice_spacing_mm(tmp_path / "export") == pytest.approx(5.0, abs=1e-3)  # the same series
    assert len(dicom_io.dicom_series_files(tmp_path / "export")) == 8


def test_preferences_fall_back_in_order(tmp_path):
    """Without a soft-tissue 5 mm series, the thin soft-tissue one beats the 5 mm bone one."""
    thin, thin_hu = head(shift=7.0, size=(24, 24, 40), spacing=(0.9, 0.9, 1.0))
    write(thin, tmp_path / "a", "HEAD 1mm", **{"0028|1051": "80"})
    write(head(shift=100.0)[0], tmp_path / "b", "HEAD BONE", **{"0018|1210": "BONEPLUS"})
    notes = []
    image = io.read_ct(tmp_path, notes)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), thin_hu)
    assert "'HEAD BONE' (8 image(s), 5 mm, BONEPLUS): bone or lung reconstruction" in notes[0]


def test_baseline_and_follow_up_in_one_folder_are_refused_not_chosen_between(tmp_path):
    write(head()[0], tmp_path / "case" / "a", "HEAD 5mm", study="2.25.1", date="20250101")
    write(head(shift=5.0)[0], tmp_path / "case" / "b", "HEAD 5mm FU", study="2.25.2", date="20250102")
    with pytest.raises(DataError, match=r"case: folder holds series of 2 different studies \(patient p1, study of "
                                        r"20250101: 'HEAD 5mm' .*; patient p1, study of 20250102: 'HEAD 5mm FU' .*\); "
                                        r"one case folder must hold one examination"):
        io.read_ct(tmp_path / "case")


def test_a_folder_without_an_axial_ct_volume_names_each_series_and_why(tmp_path):
    scout, _ = head(size=(32, 20, 1))
    write(scout, tmp_path / "s" / "1", "SCOUT", **{"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    write(head()[0], tmp_path / "s" / "2", "HEAD MR", **{"0008|0060": "MR"})
    with pytest.raises(DataError, match=r"none of the folder's 2 DICOM series is an axial CT volume "
                                        r"\('SCOUT' .*: localizer; 'HEAD MR' .*: modality MR\)"):
        io.read_ct(tmp_path / "s")


def test_subfolders_deeper_than_an_export_are_not_searched(tmp_path):
    deep = tmp_path / "a" / "b" / "c" / "d" / "e"
    write(head()[0], deep, "HEAD 5mm")
    assert find_series(tmp_path) == []
    assert len(find_series(tmp_path / "a")) == 1


def test_predict_takes_one_export_as_one_case_and_a_folder_of_cases_as_cases(tmp_path):
    export(tmp_path / "one" / "export", "nested")
    study = tmp_path / "one" / "export" / "PAT0001" / "ST0001"  # five series folders of one examination
    assert find_cases(study) == [study]
    assert find_cases(tmp_path / "one" / "export") == [tmp_path / "one" / "export" / "PAT0001"]  # one case, named
    for patient in ("p1", "p2"):
        write(head()[0], tmp_path / "batch" / patient, "HEAD 5mm", patient=patient, study=f"2.25.{len(patient)}{patient[-1]}")
    assert find_cases(tmp_path / "batch") == [tmp_path / "batch" / "p1", tmp_path / "batch" / "p2"]


def test_the_dicom_seg_of_an_export_references_the_series_read(tmp_path):
    import pydicom

    from common.inference.dicom_seg import write_dicom_seg

    hu = export(tmp_path / "export", "nested")
    source = io.read_ct(tmp_path / "export")
    mask = sitk.GetImageFromArray((hu > 800).astype(np.uint8))
    mask.CopyInformation(source)
    seg = pydicom.dcmread(write_dicom_seg(tmp_path / "export", mask, tmp_path / "mask.seg.dcm", "test-1"))
    referenced = seg.ReferencedSeriesSequence[0]
    read = [pydicom.dcmread(f) for f in dicom_io.dicom_series_files(tmp_path / "export")]
    assert {d.SeriesDescription for d in read} == {"HEAD 5mm"}
    assert referenced.SeriesInstanceUID == read[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == {d.SOPInstanceUID for d in read}
