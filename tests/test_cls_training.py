"""HE classifier: the ViT factory, ROI datasets with exclusion reasons, training on a planted
signal, calibration, and `hemex train-cls` end to end on the tiny synthetic cohort."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.data.contract import read_cohort
from common.data.roi import CaseROIs
from common.errors import ConfigError, DataError
from common.metrics.classification import auc
from common.networks.vit import create_classifier, load_local_weights
from common.training.classification.calibration import fit_calibration
from common.training.classification.prediction import case_logits
from common.training.classification.rois import build_roi_dataset, stratified_split
from common.training.classification.settings import ClassifierSettings
from common.training.classification.training import Budget, slice_arrays, train_classifier

torch.set_num_threads(1)
SMALL = dict(model="vit-micro-roi", pixels=32, patch_size=8, k_slices=2, batch_size=32, lr=1e-3,
             drop_rate=0.0, drop_path_rate=0.0, val_fraction=0.25, n_boot=200)


def planted_case(i: int, he: int, rng: np.random.Generator, k: int = 2, p: int = 32) -> CaseROIs:
    """A round clot in the blood window; HE cases carry an enclosed hypodense 'black hole'
    (15-25 HU darker) whose position varies, all under noise and random clot density."""
    yy, xx = np.mgrid[:p, :p]
    images = np.zeros((k, 3, p, p), np.float32)
    masks = np.zeros((k, p, p), np.uint8)
    for s in range(k):
        r = rng.uniform(6, 10)
        blob = (yy - p / 2) ** 2 + (xx - p / 2) ** 2 <= r * r
        hu = np.where(blob, rng.uniform(50, 70), 28.0) + rng.normal(0, 4, (p, p))
        if he:
            cy, cx = p / 2 + rng.uniform(-r / 3, r / 3, 2)
            hole = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r / 2.5) ** 2) & blob
            hu = np.where(hole, hu - rng.uniform(15, 25), hu)
        for c, (level, width) in enumerate(((40, 80), (60, 40), (75, 215))):
            images[s, c] = np.clip((hu - level + width / 2) / width, 0, 1)
        masks[s] = blob
    return CaseROIs(f"case{i}", "P", images, masks, list(range(k)), (0.0, 0.0), 1.0, he)


def planted_cohort(n: int, prevalence: float, seed: int) -> list[CaseROIs]:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) < round(prevalence * n)).astype(int)
    return [planted_case(i, int(h), rng) for i, h in enumerate(rng.permutation(labels))]


# ----------------------------------------------------------------------------- model factory

def test_vit_factory_shapes_and_local_weights(tmp_path):
    model = create_classifier("vit-micro-roi", img_size=32, patch_size=8, in_chans=4)
    assert model(torch.rand(2, 4, 32, 32)).shape == (2, 1)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    # Another grid and channel count: position embeddings resampled, patch embedding adapted.
    other = create_classifier("vit-micro-roi", img_size=48, patch_size=8, in_chans=3, weights=tmp_path / "w.pt")
    assert other(torch.rand(1, 3, 48, 48)).shape == (1, 1)
    notes = load_local_weights(other, tmp_path / "w.pt")
    assert any("pos_embed" in n for n in notes) and any("channels" in n for n in notes)
    same = create_classifier("vit-micro-roi", img_size=32, patch_size=8, in_chans=4, weights=tmp_path / "w.pt")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        create_classifier("vit-micro-roi", img_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="unknown classifier"):
        create_classifier("no-such-vit")
    with pytest.raises(DataError, match="not found"):
        create_classifier("vit-micro-roi", weights=tmp_path / "missing.safetensors")


def test_settings_validate_profile_sections():
    assert ClassifierSettings.from_profile({"classifier": {"pixels": 32, "patch_size": 8}}).in_chans == 4
    with pytest.raises(ConfigError, match="unknown \\[classifier\\] key"):
        ClassifierSettings.from_profile({"name": "x", "classifier": {"pixel": 32}})
    with pytest.raises(ConfigError, match="calibration"):
        ClassifierSettings(calibration="isotonic")


# ----------------------------------------------------------------------------- datasets

def test_roi_dataset_reports_every_excluded_case(cohort):
    cases = [c for center in read_cohort(cohort).values() for c in center]
    settings = ClassifierSettings(pixels=16, patch_size=8, size_mm=20.0, k_slices=2)
    data = build_roi_dataset(cases, settings)
    used = {r.case_id for r in data.cases}
    reasons = {e.case_id: e.reason for e in data.excluded}
    assert used == {"a1", "a2", "b1"}
    assert set(reasons) == {"a3", "b2"} and len(used) + len(reasons) == len(cases)
    assert "no HE label" in reasons["a3"] and "no reference mask" in reasons["b2"]
    assert data.cases[0].images.shape == (2, 3, 16, 16)
    assert data.markers["A/a1"]["volume_ml"] > 0

    # A mask provider (a segmentation model stand-in) replaces the reference masks.
    empty = build_roi_dataset(cases, settings, mask_provider=lambda sample: np.zeros_like(sample.hu, np.uint8))
    assert not empty.cases and all("empty hematoma mask" in e.reason or "no HE label" in e.reason for e in empty.excluded)
    found = build_roi_dataset(cases, settings, mask_provider=lambda sample: (sample.hu > 50) & (sample.hu < 100))
    assert {r.case_id for r in found.cases} == {"a1", "a2", "b1", "b2"}  # b2 usable: no reference mask needed


def test_stratified_split_keeps_both_classes_per_centre():
    labels = [0] * 8 + [1] * 2 + [0] * 6 + [1] * 4
    groups = ["A"] * 10 + ["B"] * 10
    fit, held = stratified_split(labels, groups, 0.25, seed=0)
    assert sorted(fit + held) == list(range(20)) and not set(fit) & set(held)
    for g in ("A", "B"):
        assert {labels[i] for i in held if groups[i] == g} == {0, 1}


def test_extra_synthetic_he_rois_join_the_training_set():
    rng = np.random.default_rng(0)
    train = [planted_case(i, i % 4 == 0, rng) for i in range(8)]
    settings = ClassifierSettings(**SMALL)
    extra = rng.random((6, 4, 32, 32)).astype(np.float32)
    x, y = slice_arrays(train, settings, extra_he_rois=extra)
    assert x.shape == (16 + 6, 4, 32, 32) and y.sum() == 2 * 2 + 6
    x, y = slice_arrays(train, settings, extra_he_rois=extra[:, :3], extra_he_masks=extra[:, 3])
    assert x.shape[0] == 22
    with pytest.raises(DataError, match="extra_he_masks"):
        slice_arrays(train, settings, extra_he_rois=extra[:, :3])
    with pytest.raises(DataError, match="expected"):
        slice_arrays(train, settings, extra_he_rois=extra[:, :, :16])
    model = create_classifier("vit-micro-roi", **settings.model_kwargs())
    result = train_classifier(model, train, Budget(steps=2), seed=0, extra_he_rois=extra, settings=settings)
    assert result.metrics["num_extra"] == 6 and result.metrics["num_slices"] == 22
    assert result.metrics["pos_weight"] == pytest.approx(12 / 10)  # 12 non-HE slices / 10 HE slices


def test_fedprox_term_keeps_weights_near_the_global_model():
    rng = np.random.default_rng(1)
    train = [planted_case(i, i % 3 == 0, rng) for i in range(12)]
    settings = ClassifierSettings(**{**SMALL, "augment": False, "warmup_fraction": 0.0})
    start = create_classifier("vit-micro-roi", **settings.model_kwargs()).state_dict()

    def drift(mu):
        model = create_classifier("vit-micro-roi", **settings.model_kwargs())
        model.load_state_dict(start)
        state = train_classifier(model, train, Budget(steps=8), seed=0, proximal_mu=mu, settings=settings).state
        return sum(float(((state[k] - start[k]) ** 2).sum()) for k in start if start[k].dtype.is_floating_point)

    assert drift(50.0) < drift(0.0)


def test_auxiliary_marker_regression_adds_outputs_and_needs_targets():
    from common.metrics.markers import MARKER_NAMES

    rng = np.random.default_rng(2)
    train = [planted_case(i, i % 3 == 0, rng) for i in range(9)]
    settings = ClassifierSettings(**{**SMALL, "aux_weight": 1.0})
    assert settings.num_outputs == 1 + len(MARKER_NAMES)
    model = create_classifier("vit-micro-roi", **settings.model_kwargs())
    targets = {f"P/case{i}": {n: float(rng.normal()) for n in MARKER_NAMES} for i in range(9)}
    extra = rng.random((3, 4, 32, 32)).astype(np.float32)
    result = train_classifier(model, train, Budget(steps=3), seed=0, settings=settings, aux_targets=targets,
                              extra_he_rois=extra)
    assert np.isfinite(result.metrics["train_loss"])
    assert case_logits(model, train, settings).shape == (9,)
    assert result.metrics["aux"] == 1.0
    # Without targets (e.g. a federated client that built its ROIs without markers): HE loss only.
    assert train_classifier(model, train, Budget(steps=1), seed=0, settings=settings).metrics["aux"] == 0.0
    with pytest.raises(DataError, match="no marker features"):
        train_classifier(model, train, Budget(steps=1), seed=0, settings=settings, aux_targets={"P/case0": {}})
    # Targets for some cases only (ROIs cut by a model, reference markers where a mask exists):
    # the others' rows are unknown, so only known rows enter the regression.
    from common.training.classification.training import aux_arrays

    partial = {k: v for k, v in targets.items() if k in ("P/case0", "P/case1", "P/case2")}
    rows, known = aux_arrays(train, partial, sum(len(r.images) for r in train) + 2)
    assert known.tolist() == [1.0 if r.case_id in ("case0", "case1", "case2") else 0.0
                              for r in train for _ in r.images] + [0.0, 0.0]
    assert torch.allclose(rows[known == 1].mean(0), torch.zeros(len(MARKER_NAMES)), atol=1e-5)  # standardised on known
    assert train_classifier(model, train, Budget(steps=1), seed=0, settings=settings,
                            aux_targets=partial).metrics["aux"] == 1.0


def test_calibration_recovers_platt_parameters():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(int)
    cal = fit_calibration(z, y, "platt")
    assert cal.a == pytest.approx(0.5, abs=0.08) and cal.b == pytest.approx(-1.0, abs=0.12)
    temp = fit_calibration(z, y, "temperature", pos_weight=1.0)
    assert 0 < temp.a < 1 and np.all((temp(z) > 0) & (temp(z) < 1))
    assert fit_calibration(z, y, "none")(0.0) == 0.5


# ----------------------------------------------------------------------------- learning

def test_short_training_run_beats_chance_on_held_out_cases():
    """80 training cases (25 % HE), 60 held-out cases; 60 steps of a 0.4 M-parameter ViT with a
    convolutional stem. Margin: held-out AUC >= 0.80 (chance 0.5); this seed reaches ~0.9."""
    train, test = planted_cohort(80, 0.25, seed=0), planted_cohort(60, 0.25, seed=1)
    settings = ClassifierSettings(**SMALL)
    torch.manual_seed(0)
    model = create_classifier("vit-micro-roi", **settings.model_kwargs())
    result = train_classifier(model, train, Budget(epochs=12), seed=0, settings=settings)
    held_out = auc([r.he for r in test], case_logits(model, test, settings))
    assert held_out >= 0.80, f"held-out AUC {held_out:.3f}"
    assert result.metrics["num_examples"] == 80 and result.metrics["pos_weight"] == pytest.approx(3.0)


# ----------------------------------------------------------------------------- the CLI

TEST_PROFILE = """
name = "cls-test"
[preprocess]
spacing = [2.0, 2.0, 5.0]
windows = [[40.0, 80.0], [60.0, 40.0], [75.0, 215.0]]
[classifier]
model = "vit-micro-roi"
pixels = 32
patch_size = 8
size_mm = 80.0
k_slices = 2
batch_size = 16
epochs = 2
val_fraction = 0.3
n_boot = 200
aux_weight = 1.0
"""


@pytest.mark.slow
def test_train_cls_end_to_end_on_the_tiny_cohort(tiny_cohort, tmp_path):
    data = tiny_cohort  # the session's tiny cohort (seed 0), read only
    profile = tmp_path / "cls-test.toml"
    profile.write_text(TEST_PROFILE, encoding="utf-8")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "common.cli", "train-cls", "--data", str(data),
                           "--train-centers", "center1,center2,center3", "--test-centers", "center4,center5",
                           "--out", str(out), "--profile", str(profile), "--seed", "0", "--threads", "1"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "External evaluation" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["seed"] == 0 and config["versions"]["torch"] and config["classifier"]["pixels"] == 32
    assert set(metrics["external"]) == {"vit", "volume", "markers"}
    for name in ("vit", "volume", "markers"):
        assert set(metrics["external"][name]) == {"center4", "center5", "pooled"}
        pooled = metrics["external"][name]["pooled"]
        assert pooled["n"] == 20 and pooled["n_he"] == 4
        assert 0 <= pooled["auc"] <= 1 and len(pooled["auc_ci_delong"]) == 2 and len(pooled["auc_ci_bootstrap"]) == 2
        assert pooled["at_threshold"]["threshold"] == metrics["thresholds"][name]
    assert metrics["oracle"]["groups"]["pooled"]["auc"] > 0.5
    assert "vit_ratio" in metrics["oracle"]["groups"]["pooled"]
    assert metrics["split"]["held_out_cases"] > 0 and metrics["excluded"] == []
    for name in ("classifier.safetensors", "classifier.json", "predictions.csv", "roc_pooled.png",
                 "calibration_pooled.png", "roc_center4.png"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    from common.training.classification.storage import load_classifier

    model, settings, calibration, record = load_classifier(out)
    assert settings.pixels == 32 and record["threshold"] == metrics["thresholds"]["vit"]


def test_train_cls_rejects_overlapping_centres(tmp_path, cohort):
    from common.cli import main

    assert main(["train-cls", "--data", str(cohort), "--train-centers", "A", "--test-centers", "A,B",
                 "--out", str(tmp_path / "o")]) == 2
