"""A site's preprocessed scans on its own disk (common/data/dataset.py): the same sample back
without re-reading the scan, and a fresh read when the scan, its mask or its label changes."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import SimpleITK as sitk

import common.data.dataset as dataset
from common.data.contract import Case
from common.data.dataset import SampleCache


def write_case(folder, value: float = 60.0, he: int | None = 1) -> Case:
    hu = np.full((6, 40, 40), 30.0, np.float32)
    hu[2:4, 15:25, 15:25] = value
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.9, 0.9, 5.0))
    mask = sitk.GetImageFromArray((hu > 45).astype(np.uint8))
    mask.CopyInformation(image)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "c1.nii.gz"))
    sitk.WriteImage(mask, str(folder / "c1-mask.nii.gz"))
    return Case("A", "c1", he, folder / "c1.nii.gz", folder / "c1-mask.nii.gz", onset_to_ct_h=2.0)


def test_a_cached_case_comes_back_identical_without_reading_the_scan(tmp_path, monkeypatch):
    case = write_case(tmp_path / "data")
    first = SampleCache((2.0, 2.0, 5.0), disk=tmp_path / "cache").get(case)
    assert len(list((tmp_path / "cache").glob("A-c1-*.npz"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the scan was read again")

    monkeypatch.setattr(dataset, "load_case", no_reading)
    again = SampleCache((2.0, 2.0, 5.0), disk=tmp_path / "cache").get(case)
    for field in dataclasses.fields(first):
        a, b = getattr(first, field.name), getattr(again, field.name)
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, field.name
    assert np.array_equal(first.image, again.image)


def test_an_edited_scan_label_or_spacing_is_read_again_and_a_broken_cache_file_ignored(tmp_path):
    case = write_case(tmp_path / "data")
    cache = tmp_path / "cache"
    before = SampleCache((2.0, 2.0, 5.0), disk=cache).get(case)
    edited = write_case(tmp_path / "data", value=75.0)
    os.utime(edited.image_path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    after = SampleCache((2.0, 2.0, 5.0), disk=cache).get(edited)
    assert after.hu.max() > before.hu.max() + 10
    relabelled = SampleCache((2.0, 2.0, 5.0), disk=cache).get(dataclasses.replace(edited, he=0))
    assert relabelled.he == 0
    assert SampleCache((1.0, 1.0, 5.0), disk=cache).get(edited).hu.shape != after.hu.shape
    for path in cache.glob("*.npz"):
        path.write_bytes(b"not an npz")
    assert np.array_equal(SampleCache((2.0, 2.0, 5.0), disk=cache).get(edited).hu, after.hu)


def test_reference_roi_datasets_come_back_identical_and_are_rebuilt_when_a_case_changes(tiny_cohort, tmp_path):
    from common.config import load_profile
    from common.data.contract import read_center
    from common.data.preprocess import DEFAULT_WINDOWS
    from common.training.classification.roi_cache import cached_reference_rois
    from common.training.classification.rois import build_roi_dataset
    from common.training.classification.settings import ClassifierSettings

    settings = ClassifierSettings.from_profile(load_profile("smoke"))
    cases = read_center(tiny_cohort / "center1")
    builds = []

    def build(these=cases):
        builds.append(1)
        return build_roi_dataset(these, settings, with_markers=True)

    first = cached_reference_rois(tmp_path, cases, settings, DEFAULT_WINDOWS, True, build)
    again = cached_reference_rois(tmp_path, cases, settings, DEFAULT_WINDOWS, True, build)
    assert len(builds) == 1 and len(first.cases) == len(again.cases) > 0
    for a, b in zip(first.cases, again.cases):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, field.name
    assert [str(s) for s in first.excluded] == [str(s) for s in again.excluded]
    for name, features in first.markers.items():
        for marker, value in features.items():
            other = again.markers[name][marker]
            assert (value is None and other is None) or value == pytest.approx(other, nan_ok=True), (name, marker)
    # Another label, or other ROI settings, is another dataset.
    relabelled = [dataclasses.replace(c, he=1 - c.he) if i == 0 else c for i, c in enumerate(cases)]
    cached_reference_rois(tmp_path, relabelled, settings, DEFAULT_WINDOWS, True, lambda: build(relabelled))
    cached_reference_rois(tmp_path, cases, dataclasses.replace(settings, pixels=settings.pixels * 2),
                          DEFAULT_WINDOWS, True, build)
    assert len(builds) == 3
