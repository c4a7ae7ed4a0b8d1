"""Hematoma ROIs of a list of cases (every case left out named with its reason), the network
input of a case, its marker rows, and the stratified fit / held-out split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from common.data.contract import Case
from common.data.dataset import SkippedCase
from common.data.preprocess import DEFAULT_WINDOWS, Sample, load_case
from common.data.roi import CaseROIs, extract_rois
from common.errors import DataError, HemexError
from common.metrics.markers import marker_features, marker_vector
from common.training.classification.settings import ClassifierSettings

MaskProvider = Callable[[Sample], "np.ndarray | None"]


@dataclass
class ROIDataset:
    """ROIs of the usable cases, their marker features, and every case left out with the reason."""

    cases: list[CaseROIs] = field(default_factory=list)
    markers: dict[str, dict] = field(default_factory=dict)  # "center/case_id" -> features
    excluded: list[SkippedCase] = field(default_factory=list)
    # With a mask provider and reference_markers=True: the markers of the reference masks, where
    # cases have one (the auxiliary targets when ROIs are cut by a segmentation model).
    reference_markers: dict[str, dict] = field(default_factory=dict)

    def labels(self) -> np.ndarray:
        return np.array([c.he for c in self.cases], dtype=int)

    def subset(self, keep: Sequence[int]) -> "ROIDataset":
        chosen = [self.cases[i] for i in keep]
        return ROIDataset(chosen, {key(c): self.markers[key(c)] for c in chosen if key(c) in self.markers},
                          list(self.excluded))


def key(case) -> str:
    return f"{case.center}/{case.case_id}"


def reference_mask(sample: Sample) -> np.ndarray | None:
    """The default mask provider: the case's reference mask (None when it has none)."""
    return sample.mask


def build_roi_dataset(cases: Iterable[Case], settings: ClassifierSettings, *, mask_provider: MaskProvider | None = None,
                      windows=DEFAULT_WINDOWS, require_label: bool = True, with_markers: bool = True,
                      reference_markers: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> ROIDataset:
    """ROIs for `cases`, never silently dropping one: a case without a label (when required),
    without a mask, with an empty mask, or whose image cannot be read goes to ``excluded``.

    mask_provider: ``None`` = the reference masks (``masks/<case_id>``); otherwise a callable
    receiving the loaded ``Sample`` (without reference mask) and returning a (z, y, x) mask
    on its grid, e.g. a segmentation model's prediction.
    with_markers: also measure the marker features (``.markers``); always done for a
    marker-fusion classifier, whose ROIs carry them (``CaseROIs.features``).
    reference_markers: with a mask provider, also measure the markers of each case's reference
    mask where it has one (``.reference_markers``); a case without one is not excluded for it.
    """
    cases = list(cases)
    out = ROIDataset()
    reference = mask_provider is None
    for i, case in enumerate(cases):
        reason = None
        if require_label and case.he is None:
            reason = "no HE label (he is empty in cases.csv)"
        elif reference and case.mask_path is None:
            reason = "no reference mask (masks/<case_id> missing)"
        if reason is None:
            try:
                sample = load_case(case, spacing=settings.spacing, windows=windows,
                                   with_mask=reference or (reference_markers and case.mask_path is not None))
                mask = reference_mask(sample) if reference else mask_provider(sample)
                if not reference and reference_markers and sample.mask is not None and sample.mask.any():
                    out.reference_markers[key(case)] = marker_features(sample.hu, sample.mask, sample.spacing,
                                                                       settings.hypodense_hu)
                if mask is None:
                    reason = "mask provider returned no mask"
                elif not np.asarray(mask).any():
                    reason = "empty hematoma mask (nothing to centre an ROI on)"
                else:
                    mask = (np.asarray(mask) != 0).astype(np.uint8)
                    rois = extract_rois(sample, mask, k=settings.k_slices, size_mm=settings.size_mm,
                                        pixels=settings.pixels, windows=windows)
                    rois.he = case.he
                    if with_markers or settings.marker_fusion:
                        features = marker_features(sample.hu, mask, sample.spacing, settings.hypodense_hu)
                        rois.features = marker_vector(features)
                        features["onset_to_ct_h"] = case.onset_to_ct_h
                        out.markers[key(case)] = features
                    out.cases.append(rois)
            except HemexError as err:
                reason = str(getattr(err, "reason", err))
            except (ValueError, RuntimeError) as err:  # SimpleITK / provider failures
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if reason is not None:
            out.excluded.append(SkippedCase(case.center, case.case_id, reason))
        if progress is not None:
            progress(i + 1, len(cases))
    return out


def roi_array(rois: CaseROIs, mask_channel: bool) -> np.ndarray:
    """(k, C[+1], P, P) float32 network input of one case: HU windows [+ mask]."""
    images = rois.images.astype(np.float32)
    if mask_channel:
        images = np.concatenate([images, rois.masks[:, None].astype(np.float32)], axis=1)
    return images


def stratified_split(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: `fraction` of each (group, label) stratum held out, at least one
    of each label per group when that group has two or more of it."""
    rng = np.random.default_rng(seed)
    labels, groups = np.asarray(labels), np.asarray(groups)
    held = []
    if fraction > 0:
        for g in sorted(set(groups.tolist())):
            for label in (0, 1):
                idx = np.flatnonzero((groups == g) & (labels == label))
                if len(idx) < 2:
                    continue
                n = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
                held += rng.choice(idx, size=n, replace=False).tolist()
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def case_markers(rois: CaseROIs, n_markers: int) -> np.ndarray:
    """The case's scaled marker vector, checked (a marker-fusion classifier cannot score without it)."""
    if rois.features is None:
        raise DataError(key(rois), "no marker features: this classifier fuses the NCCT markers, "
                        "build the ROIs with build_roi_dataset (or set CaseROIs.features)")
    features = np.asarray(rois.features, np.float32).reshape(-1)
    if len(features) != n_markers or not np.isfinite(features).all():
        raise DataError(key(rois), f"marker features must be {n_markers} finite values, got {features.tolist()}")
    return features


def slice_markers(rois: Sequence[CaseROIs], n_markers: int, n_extra: int = 0) -> np.ndarray | None:
    """(n_slices, n_markers) marker rows: each real case's vector repeated for its slices, then
    `n_extra` rows of reference values (zeros) for synthetic HE ROIs: a 2D synthetic image has no
    volume to measure, so it trains the image path only. (Pairing each synthetic ROI with a random
    real HE case's markers instead lowered the federated arm's pooled AUC on the development
    cohort, 0.750 -> 0.712.) None when the classifier takes no markers."""
    if n_markers == 0:
        return None
    rows = [np.repeat(case_markers(r, n_markers)[None], len(r.images), axis=0) for r in rois]
    rows.append(np.zeros((n_extra, n_markers), np.float32))
    return np.concatenate(rows)
