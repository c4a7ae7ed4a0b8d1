"""Segmentation metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from common.metrics.segmentation import hd95, segmentation_metrics, summarize


def _box(shape, z, y, x):
    m = np.zeros(shape, dtype=np.uint8)
    m[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = 1
    return m


def test_dice_iou_of_overlapping_cubes():
    # 4x4x4 cubes offset by 2 slices: |A| = |B| = 64, |A n B| = 2*4*4 = 32.
    a = _box((10, 10, 10), (0, 4), (2, 6), (2, 6))
    b = _box((10, 10, 10), (2, 6), (2, 6), (2, 6))
    m = segmentation_metrics(a, b, spacing=(1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(2 * 32 / (64 + 64))  # 0.5
    assert m["iou"] == pytest.approx(32 / (64 + 64 - 32))  # 1/3


@pytest.mark.parametrize(
    "axis, spacing, expected_mm",
    [
        ("z", (0.5, 0.7, 5.0), 3 * 5.0),  # shift of 3 slices of 5 mm
        ("x", (0.5, 0.7, 5.0), 3 * 0.5),  # shift of 3 columns of 0.5 mm
        ("y", (0.5, 0.7, 5.0), 3 * 0.7),
    ],
)
def test_hd95_of_shifted_cubes_in_anisotropic_spacing(axis, spacing, expected_mm):
    # 2x2x2 cubes are all surface. Shifted by 3 voxels along one axis, the directed
    # distances are [2, 2, 2, 2, 3, 3, 3, 3] voxels; numpy's 95th percentile of that is 3.
    base = dict(z=(2, 4), y=(2, 4), x=(2, 4))
    moved = dict(base)
    moved[axis] = (5, 7)
    a = _box((10, 10, 10), **base)
    b = _box((10, 10, 10), **moved)
    assert hd95(a, b, spacing) == pytest.approx(expected_mm)
    assert segmentation_metrics(a, b, spacing)["hd95_mm"] == pytest.approx(expected_mm)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation notice
def test_hd95_matches_monai():
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    a = _box((12, 20, 20), (2, 9), (3, 15), (4, 14))
    b = _box((12, 20, 20), (3, 10), (5, 16), (2, 13))
    b[rng.random(b.shape) < 0.05] = 1
    spacing = (0.45, 0.5, 5.0)  # (x, y, z)
    ours = hd95(a, b, spacing)

    def onehot(m):
        return torch.from_numpy(np.stack([1 - m, m])[None].astype(np.float32))

    ref = compute_hausdorff_distance(onehot(a), onehot(b), percentile=95, spacing=spacing[::-1]).item()
    assert ours == pytest.approx(ref, rel=1e-6)


def test_volume_errors_in_ml():
    # 1000 voxels of 0.5 x 0.5 x 5 mm = 1.25 mm^3 each -> 1.25 mL; 600 voxels -> 0.75 mL.
    ref = _box((10, 20, 20), (0, 10), (0, 10), (0, 10))
    pred = _box((10, 20, 20), (0, 6), (0, 10), (0, 10))
    m = segmentation_metrics(pred, ref, spacing=(0.5, 0.5, 5.0))
    assert m["vol_ref_ml"] == pytest.approx(1.25)
    assert m["vol_pred_ml"] == pytest.approx(0.75)
    assert m["vol_diff_ml"] == pytest.approx(-0.5)
    assert m["volume_abs_err_ml"] == pytest.approx(0.5)
    assert m["rel_vol_err"] == pytest.approx(0.4)


def test_both_empty_is_perfect_agreement():
    z = np.zeros((4, 8, 8), dtype=bool)
    m = segmentation_metrics(z, z, spacing=(1, 1, 1))
    assert (m["dice"], m["iou"], m["hd95_mm"], m["hd95_defined"]) == (1.0, 1.0, 0.0, True)
    assert m["empty_pred"] and m["empty_ref"]
    assert m["volume_abs_err_ml"] == 0.0 and math.isnan(m["rel_vol_err"])


def test_one_empty_mask_flags_undefined_hd95():
    ref = _box((4, 8, 8), (1, 3), (1, 3), (1, 3))
    m = segmentation_metrics(np.zeros_like(ref), ref, spacing=(1, 1, 1))
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["hd95_mm"]) and not m["hd95_defined"]
    assert m["empty_pred"] and not m["empty_ref"]
    m = segmentation_metrics(ref, np.zeros_like(ref), spacing=(1, 1, 1))
    assert math.isnan(m["hd95_mm"]) and math.isnan(m["rel_vol_err"])


def test_accepts_torch_tensors_and_rejects_bad_inputs():
    a = _box((4, 8, 8), (1, 3), (1, 3), (1, 3))
    assert segmentation_metrics(torch.from_numpy(a), torch.from_numpy(a), (1, 1, 1))["dice"] == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(a, a[:2], (1, 1, 1))
    with pytest.raises(ValueError, match=r"3D \(z, y, x\)"):
        segmentation_metrics(a[0], a[0], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, a, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segmentation_metrics(a, a, (1, 0, 1))


def test_summarize_ignores_nan_and_counts_flags():
    cases = [
        {"dice": 0.5, "hd95_mm": 2.0, "hd95_defined": True},
        {"dice": 1.0, "hd95_mm": float("nan"), "hd95_defined": False},
        {"dice": 0.0, "hd95_mm": 4.0, "hd95_defined": True},
    ]
    s = summarize(cases)
    assert s["dice"]["mean"] == pytest.approx(0.5)
    assert s["dice"]["median"] == pytest.approx(0.5)
    assert (s["dice"]["n"], s["dice"]["n_nan"]) == (3, 0)
    assert s["hd95_mm"]["mean"] == pytest.approx(3.0)
    assert (s["hd95_mm"]["n"], s["hd95_mm"]["n_nan"]) == (2, 1)
    assert (s["hd95_mm"]["min"], s["hd95_mm"]["max"]) == (2.0, 4.0)
    assert s["hd95_defined"] == {"n": 3, "n_true": 2}


def test_summarize_all_nan_metric():
    s = summarize([{"hd95_mm": float("nan")}])
    assert s["hd95_mm"]["n"] == 0 and math.isnan(s["hd95_mm"]["mean"])
