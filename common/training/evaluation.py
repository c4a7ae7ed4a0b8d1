"""Segmentation evaluation on held-out cases: per case, per centre and overall.

Overlap and distance metrics (Dice, IoU, HD95) are computed on the working grid, where the
model predicts. Volumes are reported twice: on the working grid, and with the prediction
mapped back onto the stored scan's grid and compared with the stored mask, which is the
volume a clinician would measure (it carries no resampling error of the reference).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import SimpleITK as sitk
from torch import nn

from common.data.preprocess import Sample
from common.metrics.segmentation import segmentation_metrics, summarize
from common.training.inference import mask_on_grid, segment

# The per-centre summaries keep these (flags and raw volumes stay in the per-case records).
SUMMARY_KEYS = ("dice", "iou", "hd95_mm", "abs_vol_err_ml", "rel_vol_err", "abs_vol_err_original_ml",
                "inference_seconds")


def original_grid_volume_ml(pred: np.ndarray, probabilities: np.ndarray, sample: Sample) -> float:
    """Volume (mL) of a working-grid prediction once mapped onto the stored image's grid."""
    image = mask_on_grid(pred, probabilities, sample.working, sample.original)
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(image)))
    return voxels * float(np.prod(sample.original.spacing)) / 1000.0


def evaluate_case(model: nn.Module, sample: Sample, roi_size, *, overlap: float, sw_batch_size: int,
                  device, satellite_mm: float = 0.0) -> dict:
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
                      abs_vol_err_original_ml=abs(predicted_ml - reference_ml))
    return record


def evaluate_segmentation(model: nn.Module, samples: list[Sample], roi_size, *, overlap: float = 0.25,
                          sw_batch_size: int = 4, device="cpu", satellite_mm: float = 0.0,
                          progress: Callable[[int, int], None] | None = None) -> dict:
    """Predict every sample (all must have masks) and summarise.

    Inference seconds per case include the post-processing (`satellite_mm`, see `segment`).

    Returns {"per_case": [...], "per_center": {centre: {metric: stats}}, "overall": {...}},
    stats as in `common.metrics.segmentation.summarize`.
    """
    per_case = []
    for done, sample in enumerate(samples, start=1):
        if sample.mask is None:
            raise ValueError(f"{sample.center}/{sample.case_id} has no reference mask to evaluate against")
        per_case.append(evaluate_case(model, sample, roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                                      device=device, satellite_mm=satellite_mm))
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
