"""Preprocessed cases held in memory for one run: each case is read and resampled once.

Training touches every training case many times (random patches) and evaluation once more;
re-reading and resampling a scan costs far more than a training step, so a run keeps its
`Sample`s here. Cases that cannot serve segmentation (no mask) are reported, never dropped
silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from common.data.contract import Case
from common.data.io import read_mask
from common.data.preprocess import DEFAULT_WINDOWS, Sample, load_case


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

    def __init__(self, spacing, windows=DEFAULT_WINDOWS):
        self.spacing = tuple(float(s) for s in spacing)
        self.windows = tuple(tuple(float(v) for v in w) for w in windows)
        self._samples: dict[tuple[str, str], Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def get(self, case: Case) -> Sample:
        key = (case.center, case.case_id)
        if key not in self._samples:
            sample = load_case(case, self.spacing, self.windows)
            if case.mask_path is not None:
                # The stored mask's own volume: the reference for volume errors, free of the
                # resampling error of the working-grid mask.
                sample.meta["mask_volume_original_ml"] = stored_mask_volume_ml(case)
            self._samples[key] = sample
        return self._samples[key]

    def load(self, cases: Iterable[Case], progress: Callable[[int, int], None] | None = None) -> list[Sample]:
        cases = list(cases)
        samples = []
        for done, case in enumerate(cases, start=1):
            samples.append(self.get(case))
            if progress is not None:
                progress(done, len(cases))
        return samples


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
