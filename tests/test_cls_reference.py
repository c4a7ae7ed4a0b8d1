"""The same seed gives the same classifier: exact figures of short training runs, recorded by the
code before `common/training/classification.py` was split into modules (see REFERENCE_COMMIT).

Every number below was produced by the pre-split code at commit REFERENCE_COMMIT, on CPU with one
torch thread. The comparison is to 1e-6: a change of behaviour (an extra random draw, another
order of operations, a different split) moves these figures far more than that. A different CPU
or torch build may round differently; re-record the figures on that machine from the reference
commit rather than loosen the tolerance.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from test_cls_training import SMALL, TEST_PROFILE, planted_cohort

from common.metrics.markers import MARKER_NAMES
from common.files import seed_everything
from common.training.classification.calibration import fit_calibration
from common.training.classification.prediction import case_logits
from common.training.classification.rois import stratified_split
from common.training.classification.settings import ClassifierSettings, create_model
from common.training.classification.training import Budget, train_classifier

torch.set_num_threads(1)
REFERENCE_COMMIT = "750fcdb8c86fa8c9cea80de1c25f6f273ef3d25e"
TOL = dict(rel=1e-6, abs=1e-6)


def marker_rows(rois, seed: int) -> dict:
    """Marker features for planted cases (they have no volume to measure): fixed random values,
    as CaseROIs.features for the fused model and as auxiliary targets."""
    rng = np.random.default_rng(seed)
    targets = {}
    for r in rois:
        r.features = rng.normal(0, 1, len(MARKER_NAMES)).astype(np.float32)
        targets[f"{r.center}/{r.case_id}"] = {n: float(v) for n, v in zip(MARKER_NAMES, r.features)}
    return targets


def reference_figures(variant: str) -> dict:
    """Split, train, score and calibrate once; the figures a behaviour change would move."""
    cases, test = planted_cohort(24, 1 / 3, seed=3), planted_cohort(10, 0.3, seed=4)
    for i, r in enumerate(cases):
        r.center = "AB"[i % 2]
    if variant == "plain":
        settings = ClassifierSettings(**SMALL)
        budget, mu, targets = Budget(steps=6), 0.0, None
    else:  # every optional path: aux loss, marker fusion, sampler, EMA, FedProx, mean-prob aggregation
        settings = ClassifierSettings(**{**SMALL, "aux_weight": 0.5, "marker_fusion": True, "balance": "sampler",
                                         "ema": 0.5, "aggregation": "mean_prob", "calibration": "temperature",
                                         "batch_size": 16})
        budget, mu = Budget(epochs=3), 0.1
        targets = marker_rows(cases, seed=5)
        marker_rows(test, seed=6)
    fit_idx, held_idx = stratified_split([r.he for r in cases], [r.center for r in cases], settings.val_fraction, 7)
    fit, held = [cases[i] for i in fit_idx], [cases[i] for i in held_idx]
    seed_everything(11)
    model = create_model(settings)
    result = train_classifier(model, fit, budget, seed=11, settings=settings, proximal_mu=mu, aux_targets=targets,
                              val_rois=held)
    z_held = case_logits(model, held, settings)
    calibration = fit_calibration(z_held, [r.he for r in held], settings.calibration, result.metrics["pos_weight"])
    return {"held": held_idx, "train_loss": result.metrics["train_loss"], "steps": result.metrics["steps"],
            "pos_weight": result.metrics["pos_weight"], "history": [h["train_loss"] for h in result.history],
            "val_auc": result.metrics["val_auc"], "calibration": (calibration.a, calibration.b),
            "test_logits": case_logits(model, test, settings).tolist()}


def train_cls_figures(data_root, tmp_path) -> dict:
    """The central `train-cls` run on the tiny cohort (the end-to-end test's profile)."""
    from common.training.classification.train_cls import run_train_cls

    profile = tmp_path / "cls-test.toml"
    profile.write_text(TEST_PROFILE, encoding="utf-8")
    metrics = run_train_cls(data_root, ["center1", "center2", "center3"], ["center4", "center5"], tmp_path / "run",
                            profile=str(profile), seed=0, threads=1, quiet=True)
    external = metrics["external"]
    return {"split": metrics["split"], "train_loss": metrics["training"]["train_loss"],
            "calibration": (metrics["calibration"]["a"], metrics["calibration"]["b"]),
            "thresholds": metrics["thresholds"],
            "auc": {f"{name}/{g}": external[name][g]["auc"] for name in external for g in external[name]},
            "auc_ci_bootstrap": external["vit"]["pooled"]["auc_ci_bootstrap"],
            "predictions": (tmp_path / "run" / "predictions.csv").read_text(encoding="utf-8")}


# Produced by the pre-split code at commit 750fcdb8c86fa8c9cea80de1c25f6f273ef3d25e (see module docstring).
EXPECTED = {
    "plain": {
        "held": [9, 11, 15, 16, 18, 20],
        "train_loss": 0.9640973806381226,
        "steps": 6.0,
        "pos_weight": 2.0,
        "history": [0.9264384508132935, 1.0084319114685059, 1.2852777242660522, 1.093335747718811,
                    1.0074255466461182, 0.9640973806381226],
        "val_auc": 0.75,
        "calibration": (0.049869415230069006, -0.7141517558010523),
        "test_logits": [0.43075908720493317, 0.41943444311618805, 0.42000311613082886, 0.4244542419910431,
                        0.41306881606578827, 0.42322665452957153, 0.4189801514148712, 0.4286854714155197,
                        0.42617717385292053, 0.42010578513145447],
    },
    "every_option": {
        "held": [9, 11, 15, 16, 18, 20],
        "train_loss": 1.1746264696121216,
        "steps": 6.0,
        "pos_weight": 1.0,
        "history": [1.2432710528373718, 1.331885039806366, 1.1746264696121216],
        "val_auc": 1.0,
        "calibration": (21.54354725242589, -0.0),
        "test_logits": [-1.0379081736993696, -0.5534404689651592, 0.8639594164053802, -0.11261192065763388,
                        -0.31809261550585927, -0.002964529707645547, 0.6699108147558611, 0.4534766278514194,
                        0.057440581555115736, -0.41924176767098614],
    },
}
EXPECTED_TRAIN_CLS = {
    "split": {"fit_cases": 21, "held_out_cases": 9, "held_out_he": 3},
    "train_loss": 2.385538935661316,
    "calibration": (-0.46392472430328163, -0.48649892443658127),
    "thresholds": {"vit": 0.3356846090080344, "volume": 0.341393897867338, "markers": 0.17334816148666982},
    "auc": {
        "vit/center4": 0.5625,
        "vit/center5": 0.25,
        "vit/pooled": 0.421875,
        "volume/center4": 0.5625,
        "volume/center5": 0.625,
        "volume/pooled": 0.59375,
        "markers/center4": 0.4375,
        "markers/center5": 0.4375,
        "markers/pooled": 0.453125,
    },
    "auc_ci_bootstrap": [0.15585937500000008, 0.75],
    "predictions": (
        'center,case_id,he,vit,volume,markers\n'
        'center4,center4-0000,0,0.335652,0.168472,0.61289\n'
        'center4,center4-0001,0,0.333148,0.108343,0.039819\n'
        'center4,center4-0002,1,0.332752,0.161802,0.081116\n'
        'center4,center4-0003,0,0.334632,0.395589,0.630033\n'
        'center4,center4-0004,0,0.331514,0.154615,0.110377\n'
        'center4,center4-0005,0,0.3343,0.418131,0.348048\n'
        'center4,center4-0006,0,0.334366,0.224138,0.076347\n'
        'center4,center4-0007,1,0.334811,0.382146,0.344859\n'
        'center4,center4-0008,0,0.332822,0.263626,0.221019\n'
        'center4,center4-0009,0,0.331769,0.121787,0.119111\n'
        'center5,center5-0000,0,0.336235,0.080661,0.047096\n'
        'center5,center5-0001,0,0.336567,0.152058,0.107092\n'
        'center5,center5-0002,1,0.33295,0.118141,0.073387\n'
        'center5,center5-0003,0,0.334092,0.07741,0.048056\n'
        'center5,center5-0004,0,0.333292,0.224027,0.168613\n'
        'center5,center5-0005,0,0.336407,0.280826,0.279059\n'
        'center5,center5-0006,0,0.335537,0.096794,0.060942\n'
        'center5,center5-0007,0,0.332008,0.20604,0.345474\n'
        'center5,center5-0008,0,0.337884,0.221328,0.221726\n'
        'center5,center5-0009,1,0.334841,0.263751,0.139437\n'
    ),
}


@pytest.mark.parametrize("variant", ["plain", "every_option"])
def test_same_seed_gives_the_recorded_figures(variant):
    got, want = reference_figures(variant), EXPECTED[variant]
    assert got["held"] == want["held"]
    assert got["steps"] == want["steps"] and got["pos_weight"] == pytest.approx(want["pos_weight"], **TOL)
    assert got["train_loss"] == pytest.approx(want["train_loss"], **TOL)
    assert got["history"] == pytest.approx(want["history"], **TOL)
    assert got["val_auc"] == pytest.approx(want["val_auc"], **TOL)
    assert got["calibration"] == pytest.approx(want["calibration"], **TOL)
    assert got["test_logits"] == pytest.approx(want["test_logits"], **TOL)


@pytest.mark.slow
def test_train_cls_with_the_same_seed_gives_the_recorded_metrics(tiny_cohort, tmp_path):
    got, want = train_cls_figures(tiny_cohort, tmp_path), EXPECTED_TRAIN_CLS
    assert got["split"] == want["split"]
    rows, want_rows = (list(csv.reader(io.StringIO(text))) for text in (got["predictions"], want["predictions"]))
    assert [r[:3] for r in rows] == [r[:3] for r in want_rows]
    # The file holds 6 decimals: a difference of 1e-6 in a score may move the last digit by one.
    assert [float(v) for r in rows[1:] for v in r[3:]] == pytest.approx(
        [float(v) for r in want_rows[1:] for v in r[3:]], abs=2e-6)
    assert got["train_loss"] == pytest.approx(want["train_loss"], **TOL)
    assert got["calibration"] == pytest.approx(want["calibration"], **TOL)
    assert got["thresholds"] == pytest.approx(want["thresholds"], **TOL)
    assert got["auc"] == pytest.approx(want["auc"], **TOL)
    assert got["auc_ci_bootstrap"] == pytest.approx(want["auc_ci_bootstrap"], **TOL)
