"""Per-case binary segmentation metrics in physical units, and their cohort summary.

Conventions: masks are arrays indexed (z, y, x), any nonzero voxel is foreground;
``spacing`` is (x, y, z) in mm, as NIfTI/SimpleITK report it, and is reversed internally.

Empty masks are explicit rather than silently NaN-propagating:
* both empty: Dice = IoU = 1, HD95 = 0 mm (perfect agreement), volume errors 0;
* exactly one empty: Dice = IoU = 0, HD95 = NaN with ``hd95_defined = False``
  (a surface distance to nothing does not exist); relative volume error is NaN when the
  reference is empty.

HD95 follows MONAI's ``compute_hausdorff_distance(percentile=95)``: the larger of the two
directed 95th-percentile distances between the mask surfaces (surface = mask minus its
6-connected erosion), with Euclidean distances in mm.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

MM3_PER_ML = 1000.0


def _as_mask(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 3:
        raise ValueError(f"{name} must be a 3D (z, y, x) mask; got shape {a.shape}")
    return a != 0


def _zyx_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive finite mm values (x, y, z); got {spacing!r}")
    return sp[2], sp[1], sp[0]


def _surface(mask: np.ndarray) -> np.ndarray:
    # border_value=0: voxels on the array edge count as surface, as in MONAI.
    return mask & ~ndimage.binary_erosion(mask)


def _directed_surface_distances(src: np.ndarray, dst: np.ndarray, sampling) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``src`` to the nearest surface voxel of ``dst``."""
    dist_to_dst = ndimage.distance_transform_edt(~_surface(dst), sampling=sampling)
    return dist_to_dst[_surface(src)]


def hd95(pred, ref, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm; NaN if either mask is empty."""
    p, r = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    if not p.any() or not r.any():
        return 0.0 if not p.any() and not r.any() else float("nan")
    sampling = _zyx_spacing(spacing)
    d_pr = _directed_surface_distances(p, r, sampling)
    d_rp = _directed_surface_distances(r, p, sampling)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def overlap_metrics(pred, ref, spacing: Sequence[float]) -> dict:
    """Overlap and volume of one case (no surface distances): ``dice``, ``iou``, ``empty_pred`` /
    ``empty_ref``, ``vol_pred_ml``, ``vol_ref_ml``, ``vol_diff_ml`` (pred - ref), ``volume_abs_err_ml``
    and ``rel_vol_err`` (|pred - ref| / ref, NaN when the reference is empty). Arguments as in
    `segmentation_metrics`."""
    p, r = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref shapes differ: {p.shape} vs {r.shape}")
    sz, sy, sx = _zyx_spacing(spacing)
    voxel_ml = sz * sy * sx / MM3_PER_ML

    n_p, n_r = int(p.sum()), int(r.sum())
    inter = int(np.logical_and(p, r).sum())
    union = n_p + n_r - inter
    both_empty = n_p == 0 and n_r == 0
    vol_p, vol_r = n_p * voxel_ml, n_r * voxel_ml
    abs_err = abs(vol_p - vol_r)
    return {
        "dice": 1.0 if both_empty else 2.0 * inter / (n_p + n_r),
        "iou": 1.0 if both_empty else inter / union,
        "empty_pred": n_p == 0,
        "empty_ref": n_r == 0,
        "vol_pred_ml": vol_p,
        "vol_ref_ml": vol_r,
        "vol_diff_ml": vol_p - vol_r,
        "volume_abs_err_ml": abs_err,
        "rel_vol_err": abs_err / vol_r if n_r else float("nan"),
    }


def segmentation_metrics(pred, ref, spacing: Sequence[float]) -> dict:
    """Metrics for one case.

    Args:
        pred, ref: 3D masks (z, y, x); numpy arrays or torch tensors; nonzero = foreground.
        spacing: voxel size (x, y, z) in mm.

    Returns the `overlap_metrics` plus ``hd95_mm`` (float, NaN if undefined) and
    ``hd95_defined`` (bool).
    """
    overlap = overlap_metrics(pred, ref, spacing)
    dist = hd95(_as_mask(pred, "pred"), _as_mask(ref, "ref"), spacing)
    return {"dice": overlap["dice"], "iou": overlap["iou"], "hd95_mm": dist, "hd95_defined": not math.isnan(dist),
            **{k: v for k, v in overlap.items() if k not in ("dice", "iou")}}


def summarize(per_case: list[dict]) -> dict:
    """Cohort statistics per metric over cases, ignoring NaN.

    Numeric metrics map to ``{n, n_nan, mean, std, median, q25, q75, min, max}`` over the
    finite values (``n_nan`` counts the non-finite ones; stats are NaN when none is finite);
    boolean flags map to ``{n, n_true}``.
    Keys missing from some cases are summarised over the cases that have them.
    """
    keys: list[str] = []
    for case in per_case:
        keys.extend(k for k in case if k not in keys)
    out: dict[str, dict] = {}
    for key in keys:
        values = [case[key] for case in per_case if key in case]
        if all(isinstance(v, (bool, np.bool_)) for v in values):
            out[key] = {"n": len(values), "n_true": int(sum(bool(v) for v in values))}
            continue
        arr = np.asarray(values, dtype=float)
        finite = arr[np.isfinite(arr)]
        stats = {"n": int(finite.size), "n_nan": int(arr.size - finite.size)}
        if finite.size:
            stats.update(
                mean=float(finite.mean()),
                std=float(finite.std(ddof=1)) if finite.size > 1 else 0.0,
                median=float(np.median(finite)),
                q25=float(np.percentile(finite, 25)),
                q75=float(np.percentile(finite, 75)),
                min=float(finite.min()),
                max=float(finite.max()),
            )
        else:
            stats.update({k: float("nan") for k in ("mean", "std", "median", "q25", "q75", "min", "max")})
        out[key] = stats
    return out
