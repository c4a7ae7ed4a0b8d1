"""A site's reference-mask ROI dataset on its own disk.

Cutting the classifier's ROIs reads every labelled scan at its own resolution (512 px slices) and
measures its markers: 7-10 s per site on the paper cohort, paid again by every process that needs
them (a deployed SuperNode starts one per message; a simulated site's messages move between
processes). ROIs cut on the reference masks depend only on the cases' files and labels and on the
ROI settings, so they are kept, keyed by those, next to the site's other caches. ROIs cut by a
segmentation model are not cached (they change with its weights every run).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from common.data.contract import Case
from common.data.dataset import SkippedCase, update_with_case
from common.data.roi import CaseROIs
from common.files import write_npz
from common.training.classification.rois import ROIDataset
from common.training.classification.settings import ClassifierSettings

ROI_FORMAT = 2  # bump when build_roi_dataset's output changes: older cache files are then ignored


def roi_digest(cases: Sequence[Case], settings: ClassifierSettings, windows, with_markers: bool,
               require_label: bool = True) -> str:
    """What a reference-mask ROI dataset depends on: the cases, the ROI and marker settings."""
    h = hashlib.sha256(json.dumps([ROI_FORMAT, None if settings.spacing is None else list(settings.spacing),
                                   settings.k_slices, settings.size_mm, settings.pixels, settings.hypodense_hu,
                                   settings.marker_fusion, [list(w) for w in windows], with_markers,
                                   require_label]).encode())
    for case in cases:
        update_with_case(h, case)
    return h.hexdigest()


def cached_reference_rois(folder: Path, cases: Sequence[Case], settings: ClassifierSettings, windows,
                          with_markers: bool, build: Callable[[], ROIDataset], require_label: bool = True) -> ROIDataset:
    """The dataset cached in `folder` for these inputs, or `build()`'s, then cached."""
    digest = roi_digest(cases, settings, windows, with_markers, require_label)
    path = Path(folder) / f"reference-{digest[:24]}.npz"
    dataset = read_rois(path)
    if dataset is None:
        dataset = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rois(path, dataset)
    return dataset


def write_rois(path: Path, dataset: ROIDataset) -> None:
    rows = [{"case_id": r.case_id, "center": r.center, "slices": [int(z) for z in r.slices],
             "centre_mm": [float(v) for v in r.centre_mm], "pixel_mm": float(r.pixel_mm), "he": r.he,
             "features": r.features is not None} for r in dataset.cases]
    meta = {"cases": rows, "markers": dataset.markers, "reference_markers": dataset.reference_markers,
            "excluded": [s.as_dict() for s in dataset.excluded]}  # an undefined marker (NaN) round-trips as NaN
    arrays = {}
    for i, r in enumerate(dataset.cases):
        arrays[f"images_{i}"], arrays[f"masks_{i}"] = r.images, r.masks
        if r.features is not None:
            arrays[f"features_{i}"] = np.asarray(r.features)
    write_npz(path, meta, **arrays)


def read_rois(path: Path) -> ROIDataset | None:
    """The dataset at `path`, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            cases = [CaseROIs(row["case_id"], row["center"], data[f"images_{i}"], data[f"masks_{i}"], row["slices"],
                              tuple(row["centre_mm"]), row["pixel_mm"], row["he"],
                              data[f"features_{i}"] if row["features"] else None)
                     for i, row in enumerate(meta["cases"])]
        return ROIDataset(cases, meta["markers"], [SkippedCase(**s) for s in meta["excluded"]],
                          meta["reference_markers"])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None

