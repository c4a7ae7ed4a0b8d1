"""Classification statistics against known values, marker features against hand-built masks,
and the baselines' fitting conventions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from common.metrics import classification as st
from common.metrics.markers import axial_slabs, count_components, marker_features, solidity


def noisy_scores(n=400, separation=1.0, prevalence=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    return y, separation * y + rng.normal(0, 1, n)


# ----------------------------------------------------------------------------- AUC and CIs

def test_perfect_predictor_has_auc_one_and_a_degenerate_ci():
    y = np.array([0] * 30 + [1] * 10)
    score = np.concatenate([np.linspace(0, 0.4, 30), np.linspace(0.6, 1, 10)])
    auc, lo, hi, se = st.delong_ci(y, score)
    assert auc == 1.0 and lo == 1.0 and hi == 1.0 and se == 0.0
    assert st.bootstrap_auc_ci(y, score, n_boot=500) == (1.0, 1.0, 1.0)
    # A perfectly inverted predictor: AUC 0.
    assert st.delong_ci(y, -score)[:3] == (0.0, 0.0, 0.0)


def test_random_predictor_is_near_one_half_and_its_ci_covers_it():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.25).astype(int)
    score = rng.random(2000)
    auc, lo, hi, _ = st.delong_ci(y, score)
    assert auc == pytest.approx(0.5, abs=0.04)
    assert lo < 0.5 < hi


def test_auc_agrees_with_sklearn_including_ties():
    for seed in range(5):
        y, score = noisy_scores(seed=seed)
        score = np.round(score, 1)  # many ties
        expected = roc_auc_score(y, score)
        assert st.auc(y, score) == pytest.approx(expected, abs=1e-9)
        assert st.delong_ci(y, score)[0] == pytest.approx(expected, abs=1e-9)
        assert st.bootstrap_auc_ci(y, score, n_boot=200)[0] == pytest.approx(expected, abs=1e-9)
        aucs, _ = st.delong_covariance(y, score, -score)
        assert aucs[0] == pytest.approx(expected, abs=1e-9) and aucs[1] == pytest.approx(1 - expected, abs=1e-9)


def test_delong_variance_matches_the_textbook_placement_formula():
    # Direct O(m n) computation of DeLong's structural components on a small example with ties.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.4, 0.4, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05])
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None]).astype(float) + 0.5 * (pos[:, None] == neg[None])
    v10, v01 = psi.mean(1), psi.mean(0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    auc, cov = st.delong_covariance(y, s)
    assert auc[0] == pytest.approx(psi.mean(), abs=1e-12)
    assert cov[0, 0] == pytest.approx(var, abs=1e-12)


def test_delong_ci_is_close_to_the_bootstrap_ci_at_n400():
    y, score = noisy_scores(n=400, separation=1.0)
    _, lo, hi, _ = st.delong_ci(y, score)
    _, blo, bhi = st.bootstrap_auc_ci(y, score, n_boot=2000, seed=0)
    assert abs(lo - blo) < 0.03 and abs(hi - bhi) < 0.03
    assert hi - lo == pytest.approx(bhi - blo, rel=0.25)


def test_bootstrap_is_stratified_and_reproducible():
    y, score = noisy_scores(n=120)
    assert st.bootstrap_auc_ci(y, score, n_boot=300, seed=5) == st.bootstrap_auc_ci(y, score, n_boot=300, seed=5)
    unstratified = st.bootstrap_auc_ci(y, score, n_boot=300, seed=5, stratified=False)
    assert unstratified[0] == st.auc(y, score) and unstratified[1] < unstratified[0] < unstratified[2]


def test_one_class_gives_nan_not_a_crash():
    y = np.zeros(10, int)
    assert np.isnan(st.auc(y, np.arange(10)))
    assert all(np.isnan(v) for v in st.delong_ci(y, np.arange(10)))


# ----------------------------------------------------------------------------- DeLong test

def test_delong_test_separates_different_models_and_not_identical_ones():
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    strong = 2.0 * y + rng.normal(0, 1, 300)
    weak = 0.2 * y + rng.normal(0, 1, 300)
    different = st.delong_test(y, strong, weak)
    assert different["diff"] > 0.2 and different["p"] < 1e-4
    assert different["diff_ci"][0] > 0
    same = st.delong_test(y, strong, strong)
    assert same["diff"] == 0 and same["p"] == 1.0
    # Two noisy copies of the same signal: no significant difference.
    signal = 1.0 * y + rng.normal(0, 1, 300)
    close = st.delong_test(y, signal + rng.normal(0, 0.1, 300), signal + rng.normal(0, 0.1, 300))
    assert close["p"] > 0.05


# ----------------------------------------------------------------------------- operating point, Brier, calibration

def test_youden_threshold_on_a_hand_example():
    y = [0, 0, 0, 1, 1, 1]
    score = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    # score >= 0.7: sens 2/3, spec 1 -> J 0.667; >= 0.4: sens 1, spec 2/3 -> J 0.667 (tie: the
    # higher threshold wins); >= 0.6: sens 2/3, spec 2/3 -> J 0.333.
    assert st.youden_threshold(y, score) == 0.7
    y2, s2 = [0, 0, 1, 0, 1, 1], [0.1, 0.2, 0.3, 0.35, 0.8, 0.9]
    # >= 0.8: sens 2/3, spec 1 (J .667); >= 0.3: sens 1, spec 2/3 (J .667): tie -> 0.8.
    assert st.youden_threshold(y2, s2) == 0.8
    y3, s3 = [0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.5, 0.4, 0.9]
    assert st.youden_threshold(y3, s3) == 0.4  # sens 1, spec 3/4 (J .75) beats sens 1/2, spec 1 (J .5)


def test_operating_point_counts_and_undefined_ppv():
    y = np.array([1, 1, 0, 0, 0])
    p = np.array([0.9, 0.2, 0.8, 0.1, 0.3])
    op = st.operating_point(y, p, 0.5)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (1, 1, 1, 2)
    assert op["sensitivity"] == 0.5 and op["specificity"] == pytest.approx(2 / 3)
    assert op["ppv"] == 0.5 and op["npv"] == pytest.approx(2 / 3)
    lo, hi = op["sensitivity_ci"]
    assert 0 < lo < 0.5 < hi < 1
    none_called = st.operating_point(y, p, 0.95)
    assert np.isnan(none_called["ppv"]) and none_called["specificity"] == 1.0


def test_brier_of_a_hand_example():
    # ((0.9-1)^2 + (0.2-0)^2 + (0.6-1)^2 + (0.5-0)^2) / 4 = (0.01 + 0.04 + 0.16 + 0.25) / 4
    assert st.brier([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.5]) == pytest.approx(0.115, abs=1e-12)
    with pytest.raises(ValueError, match="probabilities"):
        st.brier([1, 0], [1.5, 0.2])


def test_calibration_of_well_and_badly_calibrated_probabilities():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.98, 20000)
    y = (rng.random(p.size) < p).astype(int)
    curve = st.calibration_curve(y, p, n_bins=10)
    assert np.allclose(curve["predicted"], curve["observed"], atol=0.03) and sum(curve["count"]) == p.size
    intercept, slope = st.calibration_slope(y, p)
    assert intercept == pytest.approx(0, abs=0.1) and slope == pytest.approx(1, abs=0.1)
    overconfident = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))
    assert st.calibration_slope(y, overconfident)[1] == pytest.approx(1 / 3, abs=0.05)


def test_summary_is_strict_json_and_plots_are_pngs(tmp_path):
    y, score = noisy_scores(n=200)
    prob = 1 / (1 + np.exp(-score))
    summary = st.summarize(y, prob, threshold=0.5, n_boot=200)
    json.dumps(summary, allow_nan=True)
    assert summary["n"] == 200 and summary["auc_ci_delong"][0] < summary["auc"] < summary["auc_ci_delong"][1]
    roc = st.plot_roc({"model": (y, prob), "flip": (y, -score)}, tmp_path / "roc.png")
    cal = st.plot_calibration({"model": (y, prob)}, tmp_path / "cal.png")
    for path in (roc, cal):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# ----------------------------------------------------------------------------- markers

def test_marker_volume_components_and_cv_of_hand_built_masks():
    spacing = (0.5, 0.5, 5.0)  # (x, y, z) mm: a voxel is 1.25 mm^3
    mask = np.zeros((6, 60, 60), np.uint8)
    mask[1:5, 10:30, 10:30] = 1  # 4 x 20 x 20 = 1600 voxels = 2.0 mL
    mask[2:4, 45:47, 45:48] = 1  # an island: 12 voxels = 0.015 mL (2 px wide: no interior)
    mask[3, 55, 55] = 1  # a 1-voxel speck: 0.00125 mL < 0.01 mL, not counted
    hu = np.full(mask.shape, 30.0, np.float32)
    hu[mask > 0] = 60.0
    hu[1:5, 10:30, 10:20] = 40.0  # half of the main clot 20 HU darker
    f = marker_features(hu, mask, spacing)
    assert f["volume_ml"] == pytest.approx((1600 + 12 + 1) * 1.25 / 1000)
    assert f["log_volume_ml"] == pytest.approx(np.log(f["volume_ml"]))
    assert f["n_components"] == 2
    assert count_components(mask, 1.25 / 1000, min_component_ml=0.0) == 3
    # Interior (1-voxel in-plane erosion): 4 x 18 x 18 voxels, 9 columns at 40 HU and 9 at 60
    # (the island and speck erode away).
    values = np.array([40.0] * 9 + [60.0] * 9)
    assert f["hu_mean"] == pytest.approx(50.0)
    assert f["hu_sd"] == pytest.approx(np.std(np.repeat(values, 4 * 18), ddof=1))
    assert f["hu_cv"] == pytest.approx(f["hu_sd"] / 50.0)
    # Hypodense: >= 18 HU below the 75th percentile (60 HU) -> the 40 HU half.
    assert f["hypodense_fraction"] == pytest.approx(0.5)


def test_markers_of_a_thin_reconstruction_match_its_thick_slices():
    """One hematoma reconstructed at 0.625 mm and at 5 mm (the average of each 8 thin slices, as
    a scanner makes a thick slice): the markers agree, though a thin voxel is ~2.8x noisier."""
    rng = np.random.default_rng(0)
    nz, n = 48, 64
    z, y, x = np.mgrid[0:nz, 0:n, 0:n] * np.array([0.625, 0.9, 0.9])[:, None, None, None]
    inside = ((x - 29) / 14) ** 2 + ((y - 29) / 11) ** 2 + ((z - 15) / 9) ** 2 <= 1
    hu = np.where(inside, 62.0, 30.0) - 20.0 * (inside & (x < 26))  # a blend-sign half 20 HU darker
    thin = (hu + rng.normal(0, 12.0, hu.shape)).astype(np.float32)
    thick = thin.reshape(6, 8, n, n).mean(axis=1)
    thick_mask = inside.reshape(6, 8, n, n).mean(axis=1) >= 0.5
    f_thin = marker_features(thin, inside, (0.9, 0.9, 0.625))
    f_thick = marker_features(thick, thick_mask, (0.9, 0.9, 5.0))
    assert f_thin["volume_ml"] == pytest.approx(inside.sum() * 0.9 * 0.9 * 0.625 / 1000)  # exact, on thin slices
    assert f_thin["volume_ml"] == pytest.approx(f_thick["volume_ml"], rel=0.1)  # 5 mm staircase: 8 % here
    for name in ("hu_mean", "hu_sd", "hu_cv", "hypodense_fraction", "solidity", "n_components"):
        assert f_thin[name] == pytest.approx(f_thick[name], rel=1e-4), name
    assert 0.15 < f_thick["hypodense_fraction"] < 0.4  # the darker part (about a third), not noise
    eroded = thin[ndimage.binary_erosion(inside, structure=np.array([[[0] * 3] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                                                                     [[0] * 3] * 3], bool))]
    assert eroded.std() > 1.3 * f_thick["hu_sd"]  # what thin voxels would have read as heterogeneity
    three_mm = np.zeros((4, 4, 4), np.float32)
    assert axial_slabs(three_mm, three_mm > 0, 3.0)[0] is three_mm  # 3 mm and thicker: as acquired


def test_solidity_of_a_box_a_sphere_and_an_l_shape():
    sp = (1.0, 1.0, 1.0)
    box = np.zeros((12, 12, 12), bool)
    box[2:10, 2:10, 2:10] = True
    assert solidity(box, sp) == pytest.approx(1.0, abs=1e-6)
    z, y, x = np.mgrid[:30, :30, :30]
    sphere = (x - 14.5) ** 2 + (y - 14.5) ** 2 + (z - 14.5) ** 2 <= 10**2
    assert 0.85 < solidity(sphere, sp) < 0.9  # digitisation: voxel cubes bulge out of the sphere
    ell = np.zeros((4, 20, 20), bool)
    ell[:, 0:20, 0:5] = True
    ell[:, 15:20, 0:20] = True  # an L: area 175 of its hull's 287.5
    assert solidity(ell, sp) == pytest.approx(175 / 287.5, abs=0.01)


def test_marker_features_reject_empty_masks():
    with pytest.raises(ValueError, match="empty"):
        marker_features(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), (1, 1, 1))


# ----------------------------------------------------------------------------- baselines

def test_baselines_standardise_on_training_data_and_keep_the_volume_ranking():
    from common.baselines import fit_baseline

    rng = np.random.default_rng(0)
    volume = rng.lognormal(2.5, 1.0, 200)
    y = (rng.random(200) < 1 / (1 + np.exp(-(np.log(volume) - 2.5)))).astype(int)
    base = fit_baseline(np.log(volume)[:, None], y, ("log_volume_ml",))
    p = base.predict_proba(np.log(volume)[:, None])
    assert roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, volume), abs=1e-12)  # monotone in volume
    d = base.describe()
    assert d["mean"]["log_volume_ml"] == pytest.approx(np.log(volume).mean(), abs=1e-3)
    assert d["coef_per_sd"]["log_volume_ml"] > 0
