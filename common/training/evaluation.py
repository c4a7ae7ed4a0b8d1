"""Segmentation evaluation on held-out cases: per case, per centre and overall.

Overlap and distance metrics (Dice, IoU, HD95) are computed on the working grid, where the
model predicts. Volumes are reported twice: on the working grid, and with the prediction
mapped back onto the stored scan's grid and compared with the stored mask, which is the
volume a clinician would measure (it carries no resampling error of the reference).
Given the case at its own resolution (`native`), the mask hemex delivers is scored too: mapped
onto the scan's pixels, its boundary redrawn there (`postprocess.refine_boundary`, as `hemex
predict` and the held-out sites' classifier ROIs do), against the stored mask (`dice_native`,
`volume_abs_err_native_ml`).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
from torch import nn

from common.data.preprocess import Sample
from common.metrics.segmentation import overlap_metrics, segmentation_metrics, summarize
from common.inference.segmentation import mask_on_grid, segment
from common.inference.postprocess import refine_boundary

# The per-centre summaries keep these (flags and raw volumes stay in the per-case records).
SUMMARY_KEYS = ("dice", "iou", "hd95_mm", "volume_abs_err_ml", "rel_vol_err", "volume_abs_err_original_ml",
                "dice_native", "volume_abs_err_native_ml", "inference_seconds")


def original_grid_volume_ml(pred: np.ndarray, probabilities: np.ndarray, sample: Sample) -> float:
    """Volume (mL) of a working-grid prediction once mapped onto the stored image's grid."""
    image = mask_on_grid(pred, probabilities, sample.working, sample.original)
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(image)))
    return voxels * float(np.prod(sample.original.spacing)) / 1000.0


def delivered_mask(pred: np.ndarray, probabilities: np.ndarray, sample: Sample, native: Sample) -> np.ndarray:
    """The mask hemex delivers on the scan's own grid: the working-grid prediction of `sample`
    mapped onto `native` (the same case at its own resolution) and its boundary refined there."""
    mask = sitk.GetArrayFromImage(mask_on_grid(pred, probabilities, sample.working, native.working))
    return refine_boundary(mask, native.hu, native.spacing)


def native_scores(mask: np.ndarray, native: Sample) -> dict:
    """Dice and absolute volume error (mL) of a delivered mask against `native`'s stored mask."""
    scores = overlap_metrics(mask, native.mask, native.spacing)
    return {"dice_native": scores["dice"], "volume_abs_err_native_ml": scores["volume_abs_err_ml"],
            "vol_ref_native_ml": scores["vol_ref_ml"]}


def evaluate_case(model: nn.Module, sample: Sample, roi_size, *, overlap: float, sw_batch_size: int,
                  device, satellite_mm: float = 0.0, native: Sample | None = None,
                  keep_delivered: Callable[[Sample, np.ndarray], None] | None = None) -> dict:
    start = time.perf_counter()
    pred, probabilities = segment(model, sample.image, roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                                  device=device, name=f"{sample.center}/{sample.case_id}", spacing=sample.spacing,
                                  satellite_mm=satellite_mm, hu=sample.hu)
    seconds = time.perf_counter() - start
    record = {"center": sample.center, "case_id": sample.case_id,
              **segmentation_metrics(pred, sample.mask, sample.spacing), "inference_seconds": seconds}
    reference_ml = sample.meta.get("mask_volume_original_ml")
    if reference_ml is not None:
        predicted_ml = original_grid_volume_ml(pred, probabilities, sample)
        record.update(vol_pred_original_ml=predicted_ml, vol_ref_original_ml=reference_ml,
                      volume_abs_err_original_ml=abs(predicted_ml - reference_ml))
    if native is not None and native.mask is not None:
        mask = delivered_mask(pred, probabilities, sample, native)
        record.update(native_scores(mask, native))
        if keep_delivered is not None:
            keep_delivered(native, mask)
    return record


def evaluate_segmentation(model: nn.Module, samples: list[Sample], roi_size, *, overlap: float = 0.25,
                          sw_batch_size: int = 4, device="cpu", satellite_mm: float = 0.0,
                          progress: Callable[[int, int], None] | None = None,
                          native: Callable[[Sample], Sample] | None = None,
                          keep_delivered: Callable[[Sample, np.ndarray], None] | None = None) -> dict:
    """Predict every sample (all must have masks) and summarise.

    Inference seconds per case include the post-processing (`satellite_mm`, see `segment`).
    `native` loads a sample's case at its own resolution: the delivered mask is scored there too,
    and handed to `keep_delivered(native_sample, mask)` when given (a site keeps it for its ROIs).

    Returns {"per_case": [...], "per_center": {centre: {metric: stats}}, "overall": {...}},
    stats as in `common.metrics.segmentation.summarize`.
    """
    per_case = []
    for done, sample in enumerate(samples, start=1):
        if sample.mask is None:
            raise ValueError(f"{sample.center}/{sample.case_id} has no reference mask to evaluate against")
        per_case.append(evaluate_case(model, sample, roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                                      device=device, satellite_mm=satellite_mm,
                                      native=native(sample) if native is not None else None,
                                      keep_delivered=keep_delivered))
        if progress is not None:
            progress(done, len(samples))
    centers = sorted({r["center"] for r in per_case})
    return {
        "per_case": per_case,
        "per_center": {c: summary([r for r in per_case if r["center"] == c]) for c in centers},
        "overall": summary(per_case),
    }


def summary(records: list[dict]) -> dict:
    return summarize([{k: r[k] for k in SUMMARY_KEYS if k in r} for r in records])
