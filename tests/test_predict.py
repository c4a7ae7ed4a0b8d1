"""hemex predict: bundle checksums, mask back on the original grid, volume, batch with a broken case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from common.data import dicom_io, io
from common.errors import DataError
from common.inference.bundle import load_bundle, write_manifest, write_untrained_bundle
from common.inference.predict import predict_case, predict_inputs, risk_band, volume_ml


def head_ct(size=(48, 48, 8), spacing=(1.0, 1.0, 5.0), origin=(-23.5, -23.5, 0.0), direction=None):
    nx, ny, nz = size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    radius = ((x - (nx - 1) / 2) / (0.45 * nx)) ** 2 + ((y - (ny - 1) / 2) / (0.4 * ny)) ** 2
    blob = ((x - nx // 2 - 6) ** 2 + (y - ny // 2) ** 2 <= 36) & (np.abs(z - nz // 2) <= 1)
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    hu[radius <= 1.0] = 1000.0
    hu[radius <= 0.75] = 30.0
    hu[blob] = 65.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return write_untrained_bundle(tmp_path_factory.mktemp("bundle") / "model", "smoke",
                                  preprocessing={"slice_thickness_mm": [1.0, 5.0]})


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return load_bundle(bundle_dir)


def assert_same_grid(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def check_outputs(out: Path, source: sitk.Image, bundle, marker_volume: bool = True):
    mask = sitk.ReadImage(str(out / "mask.nii.gz"))
    assert_same_grid(mask, source)
    assert mask.GetPixelID() == sitk.sitkUInt8
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    assert result["volume_ml"] == pytest.approx(volume_ml(mask), abs=1e-3)
    assert result["model_version"] == bundle.version
    assert result["threshold"] == 0.5
    if result["probability"] is None:
        assert "no hematoma found" in result["warnings"] and result["band"] is None
    else:
        assert 0 <= result["probability"] <= 1 and result["band"] in ("low", "intermediate", "high")
        # The markers the classifier used, measured on the same predicted hematoma.
        if marker_volume:
            assert result["markers"]["volume_ml"] == pytest.approx(result["volume_ml"], rel=0.02, abs=1e-3)
        # The slices the classifier scored (its Grad-CAM maps are in report.png): real axial slices.
        assert result["classifier_slices"] and all(0 <= z < source.GetSize()[2] for z in result["classifier_slices"])
    assert (out / "report.png").stat().st_size > 1000
    assert set(result["timing"]) >= {"load_s", "segment_s", "classify_s", "write_s"}
    return result


def test_nifti_ras_mask_on_original_grid(bundle, tmp_path):
    ras = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS voxel order in SimpleITK's LPS terms
    path = tmp_path / "ras_case.nii.gz"
    io.write_image(head_ct(direction=ras, origin=(40.0, 30.0, -12.0)), path)
    source = io.read_ct(path)
    result = predict_case(bundle, path, tmp_path / "out")
    check_outputs(tmp_path / "out", source, bundle)
    assert result["case"] == "ras_case"


def test_dicom_series_mask_on_original_grid(bundle, tmp_path):
    series = tmp_path / "dicom_case"
    dicom_io.write_dicom_series(head_ct(spacing=(0.8, 0.8, 6.0)), series, "P001")
    source = io.read_ct(series)
    result = predict_case(bundle, series, tmp_path / "out")
    check_outputs(tmp_path / "out", source, bundle)
    assert any("slice thickness 6.00 mm outside the training range" in w for w in result["warnings"])
    assert result["outputs"]["dicom_seg"] == "mask.seg.dcm" and (tmp_path / "out" / "mask.seg.dcm").is_file()


# Patient and study attributes that de-identification tools commonly remove (DICOM PS3.15 basic
# profile: X / Z / D actions), Type 2 ones included.
DEIDENTIFIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyDate", "StudyTime",
                "SeriesDate", "SeriesTime", "ContentDate", "AcquisitionDate", "AccessionNumber",
                "ReferringPhysicianName", "StudyID", "InstitutionName")


def test_a_deidentified_dicom_series_gets_its_mask_result_report_and_seg(bundle, tmp_path):
    import highdicom as hd
    import pydicom

    series = tmp_path / "deidentified"
    dicom_io.write_dicom_series(head_ct(spacing=(0.8, 0.8, 5.0)), series, "P004")
    for path in dicom_io.dicom_series_files(series):
        dataset = pydicom.dcmread(path)
        for keyword in DEIDENTIFIED:
            if keyword in dataset:
                delattr(dataset, keyword)
        dataset.save_as(path)
    assert "PatientBirthDate" not in pydicom.dcmread(dicom_io.dicom_series_files(series)[0])
    result = predict_case(bundle, series, tmp_path / "out")
    check_outputs(tmp_path / "out", io.read_ct(series), bundle)
    assert result["outputs"]["dicom_seg"] == "mask.seg.dcm"
    seg = hd.seg.segread(tmp_path / "out" / "mask.seg.dcm")
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):
        assert keyword in seg and not seg.data_element(keyword).value, keyword  # present, empty (Type 2)
    source = pydicom.dcmread(dicom_io.dicom_series_files(series)[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert "PatientBirthDate" not in source  # the series on disk is left as it was


def test_gantry_tilted_series_is_predicted_on_its_regular_grid(bundle, tmp_path):
    import highdicom as hd

    image = head_ct(spacing=(1.0, 1.0, 5.0))
    t = np.deg2rad(12.0)  # slices tilted about x, their origins advancing along the table only
    image.SetDirection((1.0, 0.0, 0.0, 0.0, np.cos(t), 0.0, 0.0, np.sin(t), 1.0))
    series = tmp_path / "tilted"
    dicom_io.write_dicom_series(image, series, "P003")
    regular = io.read_ct(series)
    result = predict_case(bundle, series, tmp_path / "out")
    # mask.nii.gz lies on the rebuilt, unsheared grid. (The markers are measured on the axis-aligned
    # grid, a different one for an oblique scan; an untrained model's probabilities hover near the
    # 0.5 threshold, so its two interpolated masks differ: no volume comparison here.)
    check_outputs(tmp_path / "out", regular, bundle, marker_volume=False)
    assert "DICOM series resampled to a regular 4.89 mm grid: gantry tilt 12.0 deg" in result["warnings"]
    seg = hd.seg.segread(tmp_path / "out" / "mask.seg.dcm")
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == image.GetDepth()


def test_scan_of_a_trunk_or_a_thin_slab_is_scored_with_warnings(bundle, tmp_path):
    trunk = head_ct(size=(90, 70, 8), spacing=(4.0, 4.0, 5.0), origin=(0.0, 0.0, 0.0))  # ~324 x 224 mm
    result = predict_case(bundle, _written(trunk, tmp_path / "trunk.nii.gz"), tmp_path / "t")
    assert any("larger than a head" in w for w in result["warnings"])
    slab = head_ct(size=(48, 48, 2))
    result = predict_case(bundle, _written(slab, tmp_path / "slab.nii.gz"), tmp_path / "s")
    assert any("scan covers only 10 mm craniocaudally (2 slice(s))" in w for w in result["warnings"])


def _written(image: sitk.Image, path: Path) -> Path:
    io.write_image(image, path)
    return path


def test_dicom_seg_references_the_source_and_holds_the_mask(tmp_path):
    import highdicom as hd
    import pydicom

    from common.inference.dicom_seg import write_dicom_seg

    series = tmp_path / "dicom_case"
    image = head_ct(spacing=(0.8, 0.8, 5.0))
    dicom_io.write_dicom_series(image, series, "P002")
    source = io.read_ct(series)
    hu = sitk.GetArrayFromImage(source)
    mask = sitk.GetImageFromArray(((hu > 50) & (hu < 100)).astype(np.uint8))  # the planted clot
    mask.CopyInformation(source)
    path = write_dicom_seg(series, mask, tmp_path / "mask.seg.dcm", "test-1")
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f) for f in dicom_io.dicom_series_files(series)]
    assert seg.Modality == "SEG" and seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in referenced.ReferencedInstanceSequence} == \
        {d.SOPInstanceUID for d in sources}
    assert seg.SegmentSequence[0].SegmentLabel == "hematoma"
    uids = [d.SOPInstanceUID for d in sources]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[..., 0]
    expected = sitk.GetArrayFromImage(mask)
    assert expected.sum() > 0 and np.array_equal(pixels, expected)  # frame k = the k-th slice GDCM sorts


def test_dicom_seg_of_an_enhanced_multiframe_source_references_its_frames(tmp_path, enhanced_copy):
    import highdicom as hd
    import pydicom

    from common.inference.dicom_seg import write_dicom_seg

    dicom_io.write_dicom_series(head_ct(spacing=(0.8, 0.8, 5.0)), tmp_path / "series", "P003")
    folder = enhanced_copy(tmp_path / "series", tmp_path / "enhanced_case")
    source = io.read_ct(folder)
    hu = sitk.GetArrayFromImage(source)
    mask = sitk.GetImageFromArray(((hu > 50) & (hu < 100)).astype(np.uint8))
    mask.CopyInformation(source)
    seg = hd.seg.segread(write_dicom_seg(folder, mask, tmp_path / "mask.seg.dcm", "test-1"))
    enhanced = pydicom.dcmread(folder / "enhanced.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == enhanced.SeriesInstanceUID
    frames = list(range(1, enhanced.NumberOfFrames + 1))
    pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=enhanced.SOPInstanceUID,
                                            source_frame_numbers=frames, segment_numbers=[1],
                                            assert_missing_frames_are_empty=True)[..., 0]
    stored = enhanced.pixel_array.astype(float) - 1024.0  # the series' rescale: slope 1, intercept -1024
    assert pixels.sum() > 0 and np.array_equal(pixels, (stored > 50) & (stored < 100))  # per stored frame


def test_volume_ml_of_a_known_phantom():
    array = np.zeros((8, 20, 20), np.uint8)
    array[2:6, 5:15, 5:15] = 1  # 400 voxels
    mask = sitk.GetImageFromArray(array)
    mask.SetSpacing((0.5, 0.5, 5.0))  # 1.25 mm^3 per voxel
    assert volume_ml(mask) == pytest.approx(0.5)
    mask.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # orientation does not change a volume
    assert volume_ml(mask) == pytest.approx(0.5)


def test_risk_bands():
    assert risk_band(None, 0.4) is None
    assert risk_band(0.25, 0.4) == "low"
    assert risk_band(0.35, 0.4) == "intermediate"
    assert risk_band(0.45, 0.4) == "intermediate"
    assert risk_band(0.5, 0.4) == "high"


def test_batch_with_a_broken_case(bundle, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    io.write_image(head_ct(), cases / "good1.nii.gz")
    dicom_io.write_dicom_series(head_ct(), cases / "good2", "P002")
    io.write_image(head_ct(), cases / "good3.nrrd")
    io.write_image(head_ct(), cases / "good4.mhd")  # header + data file: one case
    (cases / "broken.nii.gz").write_bytes(b"not a nifti file")
    (cases / "notes.txt").write_text("scanner log\n", encoding="utf-8")  # not read, and said so
    (cases / "loose.dcm").write_bytes(b"\0" * 132 + b"DICM")
    # Stored values without the rescale (air at 24 instead of -1000): refused, not scored.
    io.write_image(sitk.Cast(head_ct() + 1024, sitk.sitkUInt16), cases / "raw.nii.gz")
    summary = predict_inputs(bundle, cases, tmp_path / "out")
    assert summary["failed"] == 2
    assert summary["cases"]["raw"]["error"].endswith(
        "raw.nii.gz: not a head NCCT in Hounsfield units: no voxel below -200 HU: probably not HU "
        "(rescale intercept missing?)")
    assert not (tmp_path / "out" / "raw").exists()
    assert all(summary["cases"][name]["status"] == "ok" for name in ("good1", "good2", "good3", "good4"))
    assert set(summary["skipped"]) == {"notes.txt", "loose.dcm"}
    assert "a DICOM series goes in a folder of its own" in summary["skipped"]["loose.dcm"]
    error = summary["cases"]["broken"]["error"]
    assert "broken.nii.gz" in error and "\n" not in error
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["cases"]["broken"]["status"] == "error"
    for name in ("good1", "good2"):
        assert (tmp_path / "out" / name / "mask.nii.gz").is_file()
    assert not (tmp_path / "out" / "broken" / "mask.nii.gz").exists()


def test_cli_predict(bundle_dir, tmp_path, capsys):
    from common.cli import main

    path = tmp_path / "one.nii.gz"
    io.write_image(head_ct(size=(40, 40, 6)), path)
    assert main(["predict", str(path), "--model", str(bundle_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "one" / "result.json").is_file()
    assert main(["predict", str(tmp_path / "missing.nii.gz"), "--model", str(bundle_dir),
                 "--out", str(tmp_path / "out2")]) == 2
    assert "input not found" in capsys.readouterr().err


@pytest.fixture()
def copy_bundle(bundle_dir, tmp_path):
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def test_tampered_weights_are_named(copy_bundle):
    weights = copy_bundle / "segmentation" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"segmentation/model\.safetensors: SHA-256 checksum mismatch"):
        load_bundle(copy_bundle)


def test_missing_file_and_unknown_format(copy_bundle):
    (copy_bundle / "classifier" / "classifier.json").unlink()
    with pytest.raises(DataError, match=r"classifier/classifier\.json: missing"):
        load_bundle(copy_bundle)
    manifest = copy_bundle / "manifest.json"
    manifest.write_text(json.dumps({"format": "something-else/9", "files": {}}), encoding="utf-8")
    with pytest.raises(DataError, match="unknown bundle format"):
        load_bundle(copy_bundle)
    manifest.unlink()
    with pytest.raises(DataError, match="manifest.json: missing"):
        load_bundle(copy_bundle)


@pytest.mark.parametrize("key", ["spacing", "roi_size"])
def test_a_bundle_without_its_segmentation_plan_is_refused(copy_bundle, key):
    manifest_path = copy_bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["preprocessing"]["spacing"] and manifest["preprocessing"]["roi_size"]  # the plan is written
    del manifest["preprocessing"][key]
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(DataError, match=f"manifest.json: bundle preprocessing lacks the segmentation plan's {key}"):
        load_bundle(copy_bundle)


def test_write_manifest_lists_every_file(copy_bundle):
    write_manifest(copy_bundle, {"centers": ["center1", "center2"], "rounds": {"seg": 3}, "version": "v-test"},
                   {"spacing": [4.0, 4.0, 5.0], "roi_size": [8, 32, 32]})
    manifest = json.loads((copy_bundle / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["files"]) == {"segmentation/model.safetensors", "segmentation/model.json",
                                      "classifier/classifier.safetensors", "classifier/classifier.json"}
    assert manifest["preprocessing"]["windows"]  # taken from the classifier record
    loaded = load_bundle(copy_bundle)
    assert loaded.version == "v-test" and loaded.manifest["provenance"]["centers"] == ["center1", "center2"]


def test_a_found_hematoma_is_classified_with_the_slices_and_maps_of_where_the_classifier_looked(bundle, tmp_path,
                                                                                              monkeypatch):
    import common.inference.segmentation as inference

    def dense_blob(model, image, roi_size, *, hu, **kwargs):  # a segmentation that finds the blob
        mask = ((hu > 50) & (hu < 90)).astype(np.uint8)
        return mask, mask.astype(np.float32)

    monkeypatch.setattr(inference, "segment", dense_blob)
    source = head_ct()
    io.write_image(source, tmp_path / "ct.nii.gz")
    result = predict_case(bundle, tmp_path / "ct.nii.gz", tmp_path / "out")
    assert result["probability"] is not None and result["volume_ml"] > 0
    # The blob spans slices 3-5 of 8 (identity direction: canonical order is the stored order).
    assert result["classifier_slices"] and set(result["classifier_slices"]) <= {3, 4, 5}
    assert not any("attention" in w for w in result["warnings"])
    check_outputs(tmp_path / "out", source, bundle)
