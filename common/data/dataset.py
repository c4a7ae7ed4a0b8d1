"""Preprocessed cases held in memory for one run: each case is read and resampled once.

Training touches every training case many times (random patches) and evaluation once more;
re-reading and resampling a scan costs far more than a training step, so a run keeps its
`Sample`s here. Cases that cannot serve segmentation (no mask) are reported, never dropped
silently.

A site also keeps them on its own disk (`SampleCache(..., disk=folder)`): a deployed SuperNode
starts a fresh process for every message, and a simulated site's work moves between processes, so
without it every round re-reads and resamples every scan. A cached case is keyed by its files
(names, sizes, modification times), its labels, the working spacing and the loader's format, so an
edited scan or cases.csv row is read again; an unreadable cache file is treated as absent.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from common.data.contract import Case
from common.data.io import read_mask
from common.data.preprocess import DEFAULT_WINDOWS, Geometry, Sample, load_case
from common.files import write_npz

SAMPLE_FORMAT = 1  # bump when load_case's output changes: older cache files are then ignored


@dataclass(frozen=True)
class SkippedCase:
    """A case left out of a stage, and why (reported to the user and written to the run record)."""

    center: str
    case_id: str
    reason: str

    def as_dict(self) -> dict:
        return {"center": self.center, "case_id": self.case_id, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.center}/{self.case_id}: {self.reason}"


class SampleCache:
    """Preprocessed samples keyed by (centre, case id), loaded on first request."""

    def __init__(self, spacing, windows=DEFAULT_WINDOWS, disk: Path | None = None):
        self.spacing = tuple(float(s) for s in spacing)
        self.windows = tuple(tuple(float(v) for v in w) for w in windows)
        self.disk = Path(disk) if disk is not None else None
        self._samples: dict[tuple[str, str], Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def get(self, case: Case) -> Sample:
        key = (case.center, case.case_id)
        if key not in self._samples:
            path = self.disk / f"{case.center}-{case.case_id}-{self.digest(case)[:20]}.npz" if self.disk else None
            sample = read_cached(path, case, self.windows) if path is not None else None
            if sample is None:
                sample = load_case(case, self.spacing, self.windows)
                if case.mask_path is not None:
                    # The stored mask's own volume: the reference for volume errors, free of the
                    # resampling error of the working-grid mask.
                    sample.meta["mask_volume_original_ml"] = stored_mask_volume_ml(case)
                if path is not None:
                    write_cached(path, sample)
            self._samples[key] = sample
        return self._samples[key]

    def digest(self, case: Case) -> str:
        """What the preprocessed case depends on: its files, its labels, the spacing, the loader."""
        h = hashlib.sha256(json.dumps([SAMPLE_FORMAT, list(self.spacing)]).encode())
        update_with_case(h, case)
        return h.hexdigest()

    def load(self, cases: Iterable[Case], progress: Callable[[int, int], None] | None = None) -> list[Sample]:
        cases = list(cases)
        samples = []
        for done, case in enumerate(cases, start=1):
            samples.append(self.get(case))
            if progress is not None:
                progress(done, len(cases))
        return samples


def update_with_case(h, case: Case) -> None:
    """Feed `h` (a hashlib object) what a case's preprocessed forms depend on: its ids, labels and
    files (names, sizes and modification times; every file of a DICOM folder)."""
    h.update(json.dumps([case.center, case.case_id, case.he, case.onset_to_ct_h]).encode())
    for source in (case.image_path, case.mask_path):
        if source is None:
            h.update(b"none;")
            continue
        source = Path(source)
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for file in files:
            stat = file.stat()
            h.update(f"{file.relative_to(source) if source.is_dir() else file.name}|{stat.st_size}|"
                     f"{stat.st_mtime_ns};".encode())


def write_cached(path: Path, sample: Sample) -> None:
    meta = {"spacing": list(sample.spacing), "original": _geometry(sample.original),
            "working": _geometry(sample.working), "meta": sample.meta}
    arrays = {"hu": sample.hu} if sample.mask is None else {"hu": sample.hu, "mask": sample.mask}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, meta, **arrays)


def read_cached(path: Path, case: Case, windows) -> Sample | None:
    """The cached sample at `path`, or None when there is none or it cannot be read."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            hu = data["hu"].astype(np.float32, copy=False)
            mask = data["mask"] if "mask" in data else None
        return Sample(case.case_id, case.center, windows, hu, mask, tuple(meta["spacing"]),
                      Geometry(**_tuples(meta["original"])), Geometry(**_tuples(meta["working"])), case.he,
                      meta["meta"])
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None


def _geometry(geometry: Geometry) -> dict:
    return {"size": list(geometry.size), "spacing": list(geometry.spacing), "origin": list(geometry.origin),
            "direction": list(geometry.direction)}


def _tuples(record: dict) -> dict:
    return {k: tuple(v) for k, v in record.items()}


def stored_mask_volume_ml(case: Case) -> float:
    """Hematoma volume (mL) of the mask as stored, on its native grid."""
    mask = read_mask(case.mask_path)
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return voxels * float(np.prod(mask.GetSpacing())) / 1000.0


def with_masks(cases: Iterable[Case], stage: str = "segmentation") -> tuple[list[Case], list[SkippedCase]]:
    """Split cases into those with a hematoma mask and the skipped rest (with the reason)."""
    kept, skipped = [], []
    for case in cases:
        if case.mask_path is None:
            skipped.append(SkippedCase(case.center, case.case_id,
                                       f"no hematoma mask (masks/{case.case_id}.nii.gz): not usable for {stage}"))
        else:
            kept.append(case)
    return kept, skipped


def split_by_center(cases: list[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Hold out `fraction` of each centre's cases (at least one when the centre has two or more),
    so the validation split covers every training centre's scanner."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_center: dict[str, list[Case]] = {}
    for case in cases:
        by_center.setdefault(case.center, []).append(case)
    train, held_out = [], []
    for center in sorted(by_center):
        members = by_center[center]
        n_out = 0 if fraction == 0 or len(members) < 2 else max(1, int(round(fraction * len(members))))
        order = rng.permutation(len(members))
        out_idx = set(order[:n_out].tolist())
        for i, case in enumerate(members):
            (held_out if i in out_idx else train).append(case)
    return train, held_out
