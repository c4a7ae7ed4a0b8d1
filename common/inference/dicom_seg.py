"""DICOM SEG (highdicom) of a predicted hematoma mask, referencing the source CT series.

The mask may lie on any grid (the series as read, or its regularized grid when the series was
gantry-tilted or had gaps): frame k samples it at the pixel centres of the k-th source image, so
every frame lies exactly on the image it references. One binary segment, "hematoma" (SCT 35566002), produced by an
automatic algorithm identified by hemex and the bundle's model version.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common import __version__
from common.data.dicom_geometry import SliceStack, sample_on_slices
from common.data.dicom_io import dicom_series_files, read_dicom_dataset
from common.errors import DataError


def write_dicom_seg(series_folder: Path, mask: sitk.Image, path: Path, model_version: str) -> Path:
    """Write `mask` (uint8 on the series' own grid) as a DICOM SEG at `path` (atomically)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [read_dicom_dataset(f, pixels=True) for f in dicom_series_files(Path(series_folder))]
    for source in sources:  # in memory only: the series on disk is never changed
        fill_deidentified(source)
    try:
        stack = SliceStack.from_datasets(sources)
    except (AttributeError, ValueError, TypeError) as err:
        raise DataError(series_folder, f"cannot place the DICOM SEG frames on the source slices: {err}") from err
    pixels = sample_on_slices(mask, stack)  # (frames, rows, columns), one frame per source image
    algorithm = hd.AlgorithmIdentificationSequence(name="hemex", version=model_version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="hematoma",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hematoma,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
    with warnings.catch_warnings():
        # highdicom copies the source's patient name and warns about its format: not ours to fix.
        warnings.filterwarnings("ignore", message=".*intended person name.*")
        seg = segmentation(hd, sources, pixels, segment)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    seg.save_as(tmp)
    os.replace(tmp, path)
    return path


# Type 2 patient and study attributes highdicom copies from the source; de-identification
# profiles commonly remove them. Absent ones are written empty in the SEG (Type 2 allows that).
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")


def fill_deidentified(dataset) -> None:
    for keyword in TYPE2_COPIED:
        if keyword not in dataset:
            setattr(dataset, keyword, None)


def segmentation(hd, sources, pixels: np.ndarray, segment):
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="hemex", manufacturer_model_name="hemex",
        software_versions=__version__, device_serial_number="hemex",
        series_description="hemex hematoma segmentation",
        # An empty mask is still a result ("no hematoma found"): keep every frame.
        omit_empty_frames=bool(pixels.any()))
