"""What a segmentation costs downstream, for bench/seg_bench.py: every external case's delivered
mask (the model's prediction mapped onto the scan's own grid and refined, as `hemex predict`
delivers it) scored against the stored mask, and the NCCT-marker baseline (the same features and
logistic model as the study's) scored on delivered masks, on the reference masks, and on the
reference masks moved by one voxel at the boundary (the ceiling: what any segmentation error of
one voxel costs).

The marker baseline is fitted once on the training centres' reference-mask markers, as the
classifier is trained on reference-mask ROIs, and only scored on the external centres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.baselines import MARKER_MODEL_FEATURES, fit_baseline
from common.data.contract import Case
from common.data.preprocess import load_case
from common.metrics.classification import auc
from common.metrics.markers import marker_features
from common.metrics.segmentation import overlap_metrics
from common.training.classification.settings import ClassifierSettings
from common.training.evaluation import delivered_mask
from common.inference.segmentation import segment

SMALL_ML = 5.0  # lesions below this are reported separately (the small-lesion Dice)
HYPODENSE_HU = ClassifierSettings().hypodense_hu  # the classifier's marker setting


def markers_row(hu, mask, spacing) -> list[float] | None:
    if not np.asarray(mask).any():
        return None
    features = marker_features(hu, mask, spacing, HYPODENSE_HU)
    return [features[name] for name in MARKER_MODEL_FEATURES]


def one_voxel_perturbed(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask eroded or dilated (at random) by one in-plane voxel: a one-voxel boundary error."""
    disk = np.zeros((1, 3, 3), bool)
    disk[0, 1, :] = disk[0, :, 1] = True
    mask = np.asarray(mask) != 0
    moved = ndimage.binary_dilation(mask, disk) if rng.random() < 0.5 else ndimage.binary_erosion(mask, disk)
    return moved if moved.any() else mask


class MarkerModel:
    """The marker baseline fitted on the training centres' reference masks (native grids)."""

    def __init__(self, train_cases: list[Case]):
        x, y = [], []
        for case in train_cases:
            if case.he is None or case.mask_path is None:
                continue
            native = load_case(case, spacing=None)
            row = markers_row(native.hu, native.mask, native.spacing)
            if row is not None:
                x.append(row)
                y.append(case.he)
        self.model = fit_baseline(np.asarray(x), np.asarray(y), MARKER_MODEL_FEATURES)
        self.n_train = len(y)

    def score(self, rows: list[list[float] | None]) -> np.ndarray:
        """Probabilities; a case without a mask (nothing found) scores the lowest possible risk."""
        out = np.zeros(len(rows))
        present = [i for i, r in enumerate(rows) if r is not None]
        if present:
            out[present] = self.model.predict_proba(np.asarray([rows[i] for i in present]))
        return out


def reference_rows(cases: list[Case], seed: int) -> dict:
    """Per external case: HE label, reference volume, reference and one-voxel-perturbed markers."""
    rng = np.random.default_rng(seed)
    out = {}
    for case in cases:
        native = load_case(case, spacing=None)
        out[(case.center, case.case_id)] = {
            "he": case.he, "ref_ml": float(np.count_nonzero(native.mask)) * float(np.prod(native.spacing)) / 1000,
            "ref_markers": markers_row(native.hu, native.mask, native.spacing),
            "perturbed_markers": markers_row(native.hu, one_voxel_perturbed(native.mask, rng), native.spacing),
        }
    return out


def delivered_records(model, samples, cases: list[Case], settings) -> list[dict]:
    """Per external case: working-grid Dice, delivered-mask Dice and volume on the scan's grid, and
    the delivered mask's markers."""
    by_key = {(c.center, c.case_id): c for c in cases}
    records = []
    for sample in samples:
        pred, probabilities = segment(model, sample.image, settings.inference_roi, overlap=settings.sw_overlap,
                                      sw_batch_size=settings.sw_batch_size, spacing=sample.spacing,
                                      satellite_mm=settings.satellite_mm, hu=sample.hu)
        native = load_case(by_key[(sample.center, sample.case_id)], spacing=None)
        mask = delivered_mask(pred, probabilities, sample, native)
        scores = overlap_metrics(mask, native.mask, native.spacing)
        records.append({"center": sample.center, "case_id": sample.case_id,
                        "dice_grid": overlap_metrics(pred, sample.mask, sample.spacing)["dice"],
                        "dice_native": scores["dice"], "vol_pred_ml": scores["vol_pred_ml"],
                        "vol_ref_ml": scores["vol_ref_ml"], "volume_abs_err_ml": scores["volume_abs_err_ml"],
                        "markers": markers_row(native.hu, mask, native.spacing)})
    return records


def summarize_arm(records: list[dict], references: dict, markers: MarkerModel) -> dict:
    dice = np.array([r["dice_native"] for r in records])
    small = np.array([r["vol_ref_ml"] < SMALL_ML for r in records])
    errors = np.array([r["volume_abs_err_ml"] for r in records])
    labelled = [r for r in records if references[(r["center"], r["case_id"])]["he"] is not None]
    y = np.array([references[(r["center"], r["case_id"])]["he"] for r in labelled])
    return {
        "cases": len(records),
        "dice_grid": float(np.mean([r["dice_grid"] for r in records])),
        "dice_native": float(dice.mean()),
        "dice_native_small": float(dice[small].mean()) if small.any() else float("nan"),
        "n_small": int(small.sum()),
        "dice_native_large": float(dice[~small].mean()) if (~small).any() else float("nan"),
        "volume_mae_ml": float(errors.mean()),
        "volume_median_abs_err_ml": float(np.median(errors)),
        "marker_auc": auc(y, markers.score([r["markers"] for r in labelled])),
    }


def reference_aucs(references: dict, markers: MarkerModel) -> dict:
    labelled = [v for v in references.values() if v["he"] is not None]
    y = np.array([v["he"] for v in labelled])
    return {"reference": auc(y, markers.score([v["ref_markers"] for v in labelled])),
            "one_voxel_perturbed": auc(y, markers.score([v["perturbed_markers"] for v in labelled]))}
