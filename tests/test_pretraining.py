"""Self-supervised pretraining of the classifier's encoder: masked image modelling learns (its
loss falls, a linear probe on its features finds a planted signal better than on a random
encoder's), and the federated stage runs through hemex's own ClientApp with weights and aggregate
losses in its replies, hands its encoder to the classifier arms, and is not retrained when a run
resumes with the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from common.config import load_profile
from common.errors import ConfigError
from common.federation.settings import FederationSettings
from common.training.classification.pretraining import (MaskedImageModel, PretrainingSettings, encoder_features,
                                                        patch_mask, pretrain, reconstruction_loss)
from common.training.classification.settings import ClassifierSettings, create_model
from fake_grid import AppGrid


def planted(n: int, seed: int, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy slices with one bright disc each; the label is whether the disc is large."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:pixels, :pixels]
    x = np.zeros((n, 4, pixels, pixels), np.float32)
    y = rng.integers(0, 2, n)
    for i in range(n):
        r = pixels * (rng.uniform(0.16, 0.22) if y[i] else rng.uniform(0.06, 0.12))
        cy, cx = rng.uniform(pixels / 4, 3 * pixels / 4, 2)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32)
        base = 0.3 + 0.1 * rng.standard_normal((pixels, pixels)).astype(np.float32)
        for c in range(3):
            x[i, c] = np.clip(base + 0.4 * disc * (c + 1) / 3, 0, 1)
    return x, y


def probe_auc(classifier, x_fit, y_fit, x_test, y_test) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit = encoder_features(classifier, [x_fit[i:i + 1] for i in range(len(x_fit))])
    test = encoder_features(classifier, [x_test[i:i + 1] for i in range(len(x_test))])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(fit, y_fit)
    return float(roc_auc_score(y_test, model.decision_function(test)))


def test_masked_image_modelling_learns_features_a_linear_probe_can_use():
    settings = ClassifierSettings.from_profile(load_profile("smoke"))
    torch.manual_seed(0)
    mim = MaskedImageModel(create_model(settings), in_chans=4)
    x_fit, y_fit = planted(200, 0, settings.pixels)
    x_test, y_test = planted(200, 100, settings.pixels)
    pretraining = PretrainingSettings(steps_per_round=150, batch_size=32)
    before_loss = reconstruction_loss(mim, x_test, pretraining)
    before_probe = probe_auc(mim.classifier, x_fit, y_fit, x_test, y_test)
    result = pretrain(mim, x_fit, pretraining, seed=0)
    after_loss = reconstruction_loss(mim, x_test, pretraining)
    after_probe = probe_auc(mim.classifier, x_fit, y_fit, x_test, y_test)
    # Measured: 0.50 -> 0.07 on held-out slices, probe 0.72 -> 0.99 (seed 0).
    assert after_loss < 0.3 * before_loss and result["loss"] < 0.5 * result["first-loss"]
    assert after_probe >= 0.95 and after_probe > before_probe + 0.03


def test_masks_blank_the_stated_share_and_bad_settings_are_one_line_errors():
    mask = patch_mask(5, 16, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 16) and mask.sum(1).tolist() == [8.0] * 5 and len({tuple(m) for m in mask.tolist()}) > 1
    with pytest.raises(ConfigError, match="mask_ratio"):
        PretrainingSettings(mask_ratio=1.0)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) steps"):
        PretrainingSettings.from_profile({"pretraining": {"steps": 3}})


@pytest.mark.slow
def test_the_federated_stage_pretrains_at_the_sites_and_the_classifier_starts_from_it(tiny_cohort, tmp_path,
                                                                                       monkeypatch, task_identity,
                                                                                       site_replies):
    from server.classifier_arms import train_arms
    from server.run import FederatedRun

    replies = site_replies
    settings = FederationSettings(
        data_root=str(tiny_cohort), centers=("center1", "center2", "center3", "center4", "center5"),
        test_centers=("center4", "center5"), profile="smoke", seg_rounds=1, ssl_rounds=2, cls_rounds=1,
        synthesis="none", min_aggregate_cases=1, out_dir=str(tmp_path / "run"))
    grid = AppGrid(settings)
    run = FederatedRun(grid, settings, log=lambda _text: None)
    run.discover()
    initial = run.pretrain_encoder()
    assert grid.types.count("train.ssl") == 6 and grid.types.count("evaluate.ssl") == 6  # 3 sites x 2 rounds
    rounds = run.report["stages"]["ssl"]["rounds"]
    losses = [np.mean([m["ssl-loss"] for m in r["evaluate"]["metrics"].values()]) for r in rounds]
    trained = [r["train"]["metrics"] for r in rounds]
    assert all(m["train-loss"] < m["first-loss"] for r in trained for m in r.values())
    assert losses[1] < losses[0]  # the validation cases' reconstruction improves over the rounds
    # Replies: the model's weights and aggregate numbers only.
    ssl_replies = [r for r in replies if "ssl-loss" in r.get("metrics", {}) or "first-loss" in r.get("metrics", {})]
    assert len(ssl_replies) == 12
    for content in ssl_replies:
        assert set(content.keys()) <= {"arrays", "metrics"}
        assert all(isinstance(v, (int, float)) for v in content["metrics"].values()) and len(content["metrics"]) <= 8
    # The classifier arms start from the pretrained encoder.
    windows = run.profile["preprocess"]["windows"]
    reference = create_model(run.cls, windows).state_dict()
    assert set(initial.keys()) == set(reference)
    run.cls_initial = initial
    started_from = {}

    def train_stage(stage, start, rounds, **kwargs):
        started_from[stage] = start
        return start

    monkeypatch.setattr(run, "train_stage", train_stage)
    train_arms(run, {})
    assert started_from["cls"] is initial
    # Resumed with the same inputs: the stage's checkpoints stand, nothing is sent again.
    again = FederatedRun(AppGrid(settings), settings, log=lambda _text: None)
    again.discover()
    resumed = again.pretrain_encoder()
    assert "train.ssl" not in again.grid.types
    for key in initial.keys():
        assert np.array_equal(resumed[key].numpy(), initial[key].numpy())

