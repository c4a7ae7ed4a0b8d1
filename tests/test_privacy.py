"""Client-side DP-SGD (Opacus) for the HE classifier: patient-level accounting, learning under
noise, the model left as a plain module, and the federated handler's reply."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cls_training import SMALL, planted_cohort

from common.data.roi import CaseROIs
from common.errors import ConfigError
from common.federation.settings import FederationSettings
from common.metrics.classification import auc
from common.training.classification.prediction import case_logits
from common.training.classification.settings import ClassifierSettings, create_model
from common.training.privacy import DPSettings, PatientSlices, epsilon, train_classifier_dp

torch.set_num_threads(1)
# Stochastic depth on, as in the profiles: DP-SGD must switch it off for per-sample gradients.
SETTINGS = ClassifierSettings(**{**SMALL, "batch_size": 16, "lr": 3e-3, "aux_weight": 0.0, "tta": False,
                                 "drop_path_rate": 0.05})


def dense_clots(n: int, seed: int, p: int = 32, k: int = 2) -> list[CaseROIs]:
    """40 % HE cases whose clot is clearly denser: a signal DP-SGD must still find under noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:p, :p]
    blob = (yy - p / 2) ** 2 + (xx - p / 2) ** 2 <= 64
    cases = []
    for i in range(n):
        he = int(i % 5 < 2)
        images = rng.normal(0.3, 0.05, (k, 3, p, p)).astype(np.float32)
        images[:, :, blob] += 0.4 if he else 0.1
        masks = np.repeat(blob[None], k, 0).astype(np.uint8)
        cases.append(CaseROIs(f"c{i}", "P", np.clip(images, 0, 1), masks, list(range(k)), (0.0, 0.0), 1.0, he))
    return cases


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5)
    assert epsilon(dp, 0.2, 0) == 0.0
    e50, e100 = epsilon(dp, 0.2, 50), epsilon(dp, 0.2, 100)
    assert 0 < e50 < e100 < math.inf
    assert epsilon(DPSettings(2.0, 1.0, 1e-5), 0.2, 100) < e100
    assert epsilon(DPSettings(1.0, 1.0, 1e-3), 0.2, 100) < e100  # a looser delta, a smaller epsilon


def test_each_example_is_one_patient():
    rois = planted_cohort(6, 0.5, seed=3)
    dataset = PatientSlices(rois, mask_channel=True, generator=torch.Generator().manual_seed(0))
    assert len(dataset) == 6
    x, markers, y = dataset[0]
    assert x.shape == (4, 32, 32) and markers.numel() == 0 and float(y) == rois[0].he  # one slice (3 windows + mask) of patient 0
    assert any(torch.equal(x, torch.from_numpy(s[:3])) or torch.equal(x[:3], torch.from_numpy(s))
               for s in rois[0].images)


def test_dp_sgd_learns_under_noise_and_leaves_a_plain_model():
    train, test = dense_clots(80, seed=0), dense_clots(40, seed=1)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)
    torch.manual_seed(0)
    model = create_model(SETTINGS)
    keys = set(model.state_dict())
    metrics = train_classifier_dp(model, train, 5, dp, settings=SETTINGS, seed=0)
    assert metrics["steps"] == 25 and metrics["sample_rate"] == pytest.approx(16 / 80)
    assert metrics["epsilon"] == pytest.approx(epsilon(dp, 0.2, 25)) and metrics["epsilon"] < 10
    assert set(model.state_dict()) == keys  # no Opacus wrapper prefix: the federation's keys
    assert not any(getattr(p, "grad_sample", None) is not None for p in model.parameters())
    labels = [c.he for c in test]
    assert auc(labels, case_logits(model, test, SETTINGS)) >= 0.9  # chance is 0.5
    # A later round composes with the earlier one: epsilon of all steps so far.
    more = train_classifier_dp(model, train, 1, dp, settings=SETTINGS, seed=1, prior_steps=metrics["total_steps"])
    assert more["total_steps"] == 30 and more["epsilon"] > metrics["epsilon"]
    # The noise is real: at a huge noise multiplier the same training learns nothing useful.
    torch.manual_seed(0)
    drowned = create_model(SETTINGS)
    train_classifier_dp(drowned, train, 5, DPSettings(200.0, 1.0, 1e-3), settings=SETTINGS, seed=0)
    assert auc(labels, case_logits(drowned, test, SETTINGS)) < 0.8


def test_dp_sgd_settings_are_checked():
    with pytest.raises(ValueError, match="noise_multiplier"):
        train_classifier_dp(create_model(SETTINGS), planted_cohort(8, 0.5, 0), 1, DPSettings(0.0), settings=SETTINGS)
    with pytest.raises(ConfigError, match="dp-sgd-delta"):
        FederationSettings(dp_sgd_noise_multiplier=1.0, dp_sgd_delta=2.0)
    with pytest.raises(ConfigError, match="proximal"):
        FederationSettings(dp_sgd_noise_multiplier=1.0, strategy="fedprox", proximal_mu=0.1)
