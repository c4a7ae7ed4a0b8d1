"""The marker-fusion classifier: a ViT plus a linear path from the case's NCCT markers to the HE
logit. Fixed marker scaling, the model's wiring, learning a signal only the markers carry, the
DP-SGD path, and the clear error when a case has no markers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cls_training import SMALL, planted_cohort

from common.data.contract import read_cohort
from common.errors import DataError
from common.metrics.classification import auc
from common.metrics.markers import MARKER_CLIP, MARKER_NAMES, MARKER_REFERENCE, marker_vector
from common.networks.vit import MarkerFusion, create_classifier, marker_inputs
from common.training.classification.prediction import case_logits
from common.training.classification.rois import build_roi_dataset, slice_markers
from common.training.classification.settings import ClassifierSettings, create_model
from common.training.classification.training import Budget, train_classifier
from common.training.privacy import DPSettings, PatientSlices, train_classifier_dp

torch.set_num_threads(1)
M = len(MARKER_NAMES)
FUSED = ClassifierSettings(**{**SMALL, "marker_fusion": True, "marker_lr": 0.1})


def test_marker_vector_uses_the_fixed_reference_scale():
    reference = {name: centre for name, (centre, _) in MARKER_REFERENCE.items()}
    assert np.array_equal(marker_vector(reference), np.zeros(M, np.float32))
    one_sd_larger = dict(reference, log_volume_ml=math.log(12.0) + 1.2, hu_mean=58.0 - 8.0)
    v = marker_vector(one_sd_larger)
    assert v[MARKER_NAMES.index("log_volume_ml")] == pytest.approx(1.0)
    assert v[MARKER_NAMES.index("hu_mean")] == pytest.approx(-1.0)
    # Wild values are clipped; missing or non-finite ones count as the reference value.
    wild = marker_vector({"hu_cv": 50.0, "hu_sd": float("nan")})
    assert wild[MARKER_NAMES.index("hu_cv")] == MARKER_CLIP and wild[MARKER_NAMES.index("hu_sd")] == 0.0


def test_fusion_model_starts_as_its_vit_and_adds_a_linear_marker_term():
    torch.manual_seed(0)
    model = create_classifier("vit-micro-roi", img_size=32, patch_size=8, in_chans=4, num_classes=3,
                              marker_inputs=M, drop_rate=0.0, drop_path_rate=0.0).eval()
    assert isinstance(model, MarkerFusion) and marker_inputs(model) == M
    assert marker_inputs(create_classifier("vit-micro-roi", img_size=32, patch_size=8, in_chans=4)) == 0
    x, f = torch.rand(5, 4, 32, 32), torch.randn(5, M)
    with torch.no_grad():
        base = model.backbone(x)
        assert torch.equal(model(x, f), base)  # zero-initialised marker path
        model.markers.weight.copy_(torch.arange(1.0, M + 1)[None])
        fused = model(x, f)
    assert torch.allclose(fused[:, 0], base[:, 0] + f @ torch.arange(1.0, M + 1), atol=1e-5)
    assert torch.equal(fused[:, 1:], base[:, 1:])  # auxiliary outputs untouched
    model.train()
    model(x, f)[:, 0].sum().backward()
    assert model.markers.weight.grad is not None and model.markers.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    with pytest.raises(DataError, match="marker values"):
        model(x, torch.randn(5, M - 1))


def with_marker_signal(cases, seed: int, separation: float = 2.5):
    """Images carry no label signal here (a clot in every case); marker 0 does (HE cases shifted
    by `separation` reference SDs): only the marker path can find it."""
    rng = np.random.default_rng(seed)
    for case in cases:
        case.images = planted_cohort(1, 0.0, seed=int(rng.integers(1 << 30)))[0].images
        case.features = rng.normal(0, 1, M).astype(np.float32)
        case.features[0] += separation * case.he
    return cases


def test_fusion_learns_a_signal_only_the_markers_carry():
    """Marker 0 separates HE by 2.5 SD (best possible AUC ~0.96); images are uninformative.
    Margins: the fused model >= 0.85 on 60 held-out cases, the same ViT without markers <= 0.70."""
    train = with_marker_signal(planted_cohort(80, 0.25, seed=0), seed=0)
    test = with_marker_signal(planted_cohort(60, 0.25, seed=1), seed=1)
    labels = [c.he for c in test]
    torch.manual_seed(0)
    fused = create_model(FUSED)
    train_classifier(fused, train, Budget(epochs=8), seed=0, settings=FUSED)
    assert auc(labels, case_logits(fused, test, FUSED)) >= 0.85
    weights = fused.markers.weight.detach()[0].abs()
    print("marker weights", weights)
    assert weights[0] > 3 * weights[1:].mean()
    plain_settings = ClassifierSettings(**SMALL)
    torch.manual_seed(0)
    plain = create_model(plain_settings)
    train_classifier(plain, train, Budget(epochs=8), seed=0, settings=plain_settings)
    assert auc(labels, case_logits(plain, test, plain_settings)) <= 0.70


def test_fusion_needs_each_case_markers_and_synthetic_rois_train_the_image_path_only():
    train = with_marker_signal(planted_cohort(20, 0.5, seed=2), seed=2)
    rows = slice_markers(train, M, n_extra=6)
    assert rows.shape == (2 * 20 + 6, M) and not rows[-6:].any()  # synthetic ROIs: reference values
    assert np.array_equal(rows[:2], np.repeat(train[0].features[None], 2, axis=0))
    model = create_model(FUSED)
    extra = np.random.default_rng(0).uniform(0, 1, (6, 4, 32, 32)).astype(np.float32)
    result = train_classifier(model, train, Budget(steps=2), seed=0, settings=FUSED, extra_he_rois=extra)
    assert result.metrics["num_extra"] == 6
    train[3].features = None
    with pytest.raises(DataError, match=f"{train[3].case_id}: no marker features"):
        case_logits(model, train, FUSED)


def test_dp_sgd_trains_the_marker_path_per_patient():
    train = with_marker_signal(planted_cohort(40, 0.4, seed=4), seed=4)
    dataset = PatientSlices(train, mask_channel=True, generator=torch.Generator().manual_seed(0), n_markers=M)
    x, f, y = dataset[0]
    assert x.shape == (4, 32, 32) and torch.equal(f, torch.from_numpy(train[0].features)) and float(y) == train[0].he
    settings = ClassifierSettings(**{**SMALL, "marker_fusion": True, "batch_size": 16, "tta": False})
    model = create_model(settings)
    keys = set(model.state_dict())
    metrics = train_classifier_dp(model, train, 2, DPSettings(1.0, 1.0, 1e-3), settings=settings, seed=0)
    assert metrics["steps"] == 6 and math.isfinite(metrics["epsilon"])  # 2 epochs x ceil(40 / 16) Poisson batches
    assert set(model.state_dict()) == keys and float(model.markers.weight.abs().sum()) > 0


def test_roi_dataset_attaches_scaled_markers_for_a_fusion_classifier(cohort):
    cases = [c for center in read_cohort(cohort).values() for c in center]
    settings = ClassifierSettings(pixels=16, patch_size=8, size_mm=20.0, k_slices=2, marker_fusion=True)
    data = build_roi_dataset(cases, settings, with_markers=False)
    assert data.cases and all(r.features is not None for r in data.cases)
    first = data.cases[0]
    assert np.array_equal(first.features, marker_vector(data.markers[f"{first.center}/{first.case_id}"]))
