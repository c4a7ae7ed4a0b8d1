"""The study's baseline arms (volume-only, markers-only logistic regressions on the NCCT markers):
fitted over the sites from aggregates to the pooled fit, and scored beside the classifier arms at
the held-out centres, with every reply inside the whitelist."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from common.baselines import (MARKER_MODEL_FEATURES, VOLUME_FEATURES, FederatedFit, baseline_logits, fit_baseline,
                              newton_keys, pooled_standardization, site_moments, site_newton_terms)
from common.federation.settings import FederationSettings
from fake_grid import AppGrid

# Typical marker scales (log mL, HU, HU, ratio, fraction, ratio, count), so standardisation matters.
CENTRE = np.array([2.3, 58.0, 10.0, 0.18, 0.1, 0.7, 1.0])
SPREAD = np.array([1.1, 8.0, 5.0, 0.1, 0.1, 0.15, 0.8])
TRUE = np.array([1.0, -0.4, 0.6, 0.3, 0.5, -0.3, 0.2])


def planted_site(n: int, shift: float, intercept: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """A site's markers (its own case mix: `shift` SDs) and HE labels drawn from a logistic model."""
    z = rng.normal(shift, 1.0, (n, len(CENTRE)))
    y = (rng.random(n) < 1 / (1 + np.exp(-(intercept + z @ TRUE)))).astype(int)
    return CENTRE + SPREAD * z, y


def federated_fit(sites, names) -> FederatedFit:
    """The coordinator's loop of server/baselines.py over in-memory sites."""
    mean, scale = pooled_standardization([site_moments(x[:, :len(names)], names) for x, _ in sites], names)
    fit = FederatedFit(tuple(names), mean, scale)
    while not fit.converged and fit.rounds < 25:
        fit.update([site_newton_terms(x[:, :len(names)], y, fit.model()) for x, y in sites])
    return fit


@pytest.mark.parametrize("names", [VOLUME_FEATURES, MARKER_MODEL_FEATURES])
def test_federated_fit_from_sums_is_the_pooled_fit(names):
    rng = np.random.default_rng(0)
    sites = [planted_site(38, 0.0, -1.5, rng), planted_site(30, 0.5, -1.0, rng), planted_site(26, -0.4, -2.0, rng)]
    fit = federated_fit(sites, names)
    assert fit.converged and fit.rounds <= 10
    x = np.vstack([s[0][:, :len(names)] for s in sites])
    y = np.concatenate([s[1] for s in sites])
    pooled = fit_baseline(x, y, names)  # scikit-learn on the pooled cases: StandardScaler + L2 LR, C = 1
    scaler, model = pooled.pipeline.named_steps["standardscaler"], pooled.pipeline.named_steps["logisticregression"]
    np.testing.assert_allclose(fit.mean, scaler.mean_, rtol=1e-10)
    np.testing.assert_allclose(fit.scale, scaler.scale_, rtol=1e-10)
    np.testing.assert_allclose(fit.coef, np.r_[model.intercept_, model.coef_[0]], atol=2e-3)  # lbfgs' tolerance
    np.testing.assert_allclose(baseline_logits(fit.model(), x), pooled.pipeline.decision_function(x), atol=5e-3)
    # Fitting each site alone and averaging is not the same model: the sites' case mixes differ.
    alone = [fit_baseline(s[0][:, :len(names)], s[1], names).pipeline for s in sites]
    averaged = np.mean([np.r_[p[-1].intercept_, p[-1].coef_[0]] for p in alone], axis=0)
    assert np.abs(averaged - fit.coef).max() > 0.05


def test_site_terms_are_sums_of_fixed_size_and_a_missing_marker_counts_as_the_mean():
    rng = np.random.default_rng(1)
    x, y = planted_site(12, 0.0, -1.0, rng)
    names = MARKER_MODEL_FEATURES
    moments = site_moments(x, names)
    assert len(moments) == 3 * len(names)  # whatever the number of cases
    model = {"coef": np.linspace(-0.5, 0.5, 8), "mean": CENTRE, "scale": SPREAD}
    terms = site_newton_terms(x, y, model)
    assert list(terms) == newton_keys(len(names)) and len(terms) == 1 + 8 + 36
    # Sums: two halves of a site add up to the site.
    halves = [site_newton_terms(x[:6], y[:6], model), site_newton_terms(x[6:], y[6:], model)]
    assert all(math.isclose(terms[k], halves[0][k] + halves[1][k], rel_tol=1e-9, abs_tol=1e-12) for k in terms)
    # A NaN marker is left out of the moments and scored at the pooled mean (standardised 0).
    holed = x.copy()
    holed[0, 3] = np.nan
    assert site_moments(holed, names)["hu_cv-n"] == 11
    filled = x.copy()
    filled[0, 3] = CENTRE[3]
    assert baseline_logits(model, holed)[0] == pytest.approx(baseline_logits(model, filled)[0])


def test_the_scoring_bound_counts_the_two_baseline_arms_once():
    study = dict(centers=("c1", "c2", "c3", "c4", "c5"), test_centers=("c4", "c5"), cls_rounds=3)
    without = FederationSettings(**study, arms=("federated", "no-synthesis", "local", "centralized"))
    assert FederationSettings(**study, arms=without.arms + ("baselines",)).cls_scorings_needed == \
        without.cls_scorings_needed + 2


# ------------------------------------------------------------------------------------------
# A study's classifier phase on the tiny cohort, through hemex's own ClientApp


@pytest.mark.slow
def test_a_study_scores_both_baseline_arms_beside_the_classifier_with_paired_differences(
        tiny_cohort, tmp_path, monkeypatch, task_identity, site_replies):
    """Tiny cohort, one federated classifier round and the two baseline arms: the baselines are
    fitted over the training sites' replies (moments, then Newton sums), scored at the held-out
    centres on the same segmentation masks as the classifier (a stand-in here: thresholded blood
    density, main lesion kept, since a smoke-trained model finds nothing), and reach metrics.json,
    the terminal table and the report with finite AUCs and paired DeLong differences."""
    import client.classifier as client_classifier
    from rich.console import Console

    from common.federation.records import to_record
    from common.training.checkpoint import build_model
    from common.inference.postprocess import keep_main_lesion
    from server.run import FederatedRun
    from simulation.metrics import study_metrics, validate
    from simulation.report import build_markdown
    from simulation.study import print_study_summary

    def blood_threshold(site, seg_weights):
        return lambda s: keep_main_lesion(((s.hu >= 50) & (s.hu <= 90)).astype(np.uint8), s.spacing, 20.0)

    monkeypatch.setattr(client_classifier, "segmentation_mask_provider", blood_threshold)
    replies = site_replies
    settings = FederationSettings(
        data_root=str(tiny_cohort), centers=("center1", "center2", "center3", "center4", "center5"),
        test_centers=("center4", "center5"), profile="smoke", seg_rounds=1, cls_rounds=1, synthesis="none",
        arms=("federated", "baselines"), min_aggregate_cases=1, out_dir=str(tmp_path / "run"))
    grid = AppGrid(settings)
    run = FederatedRun(grid, settings, log=lambda _text: None)
    run.discover()
    seg_arrays = to_record(build_model(run.seg_architecture()).state_dict())  # unused by the stand-in masks
    run.classifier(seg_arrays)

    stage = run.report["stages"]["baselines"]
    assert stage["sites"] == ["center1", "center2", "center3"] and not stage["rejected"]
    assert set(stage["arms"]) == {"volume-only", "markers-only"}
    assert all(a["converged"] and a["newton_rounds"] <= 12 for a in stage["arms"].values())
    # The baselines travel to the sites as train.baseline messages (training centres only) and
    # are scored in the classifier's own evaluate.cls messages.
    sent = [t for t in grid.types if t == "train.baseline"]
    assert len(sent) == 3 * (1 + max(a["newton_rounds"] for a in stage["arms"].values()))
    # Every baseline reply held aggregates only: no arrays, fixed key sets whatever the case count.
    fitted = [r for r in replies if any(k.startswith("baseline.") for k in r.keys())
              or "log_volume_ml-sum" in r.get("metrics", {})]
    assert len(fitted) == len(sent)
    for content in fitted:
        assert all(isinstance(record, MetricRecord) and len(record) <= 64 for record in content.values())
        for name, record in content.items():
            if name == "metrics":
                assert set(record) == {"num-examples", "num-he"} | {f"{n}-{k}" for n in MARKER_MODEL_FEATURES
                                                                    for k in ("n", "sum", "sumsq")}
            else:
                d = len(VOLUME_FEATURES if name == "baseline.volume-only" else MARKER_MODEL_FEATURES)
                assert set(record) == {"num-examples", *newton_keys(d)}
    scored = [r for r in replies if "arm.markers-only" in r.keys()]
    assert len(scored) == 5  # 3 training sites (validation) + 2 held-out centres
    assert not any(isinstance(record, ArrayRecord) for r in scored for record in r.values())

    report = {**run.report, "stages": {**run.report["stages"], "seg": {}}}
    metrics = study_metrics([report], tiny_cohort, 0, "tiny")
    validate(metrics)
    assert list(metrics["arms"]) == ["federated", "volume-only", "markers-only"]
    for arm in ("volume-only", "markers-only"):
        slot = metrics["arms"][arm]
        federated = metrics["arms"]["federated"]
        for center in ("center4", "center5"):
            entry = slot["centers"][center]
            # Same cases as the classifier arm: the same delivered masks.
            assert (entry["n"], entry["n_he"]) == (federated["centers"][center]["n"],
                                                   federated["centers"][center]["n_he"])
        both = [e for e in slot["centers"].values() if 0 < e["n_he"] < e["n"]]
        assert both, "the stand-in masks leave no held-out centre with both classes"
        for entry in both:
            assert 0.0 <= entry["auc_ci"][0] <= entry["auc"] <= entry["auc_ci"][1] <= 1.0
            assert all(math.isfinite(entry["vs_federated"][k]) for k in ("diff", "se", "p"))
        pooled = slot["pooled"]
        assert pooled["auc"] is not None and 0.0 <= pooled["auc_ci"][0] <= pooled["auc"] <= pooled["auc_ci"][1] <= 1
        assert all(math.isfinite(pooled["vs_federated"][k]) for k in ("diff", "se", "p"))
    figures = {"roc": "roc.png", "calibration": "cal.png", "dice": "dice.png", "learning": "lc.png", "synthetic": []}
    markdown = build_markdown(metrics, [report], figures, 60.0)
    for arm in ("volume-only", "markers-only"):
        pooled = metrics["arms"][arm]["pooled"]
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {arm} | {pooled['n']} "))
        assert f"{pooled['vs_federated']['diff']:+.3f}" in row
        assert sum(line.startswith(("| center4 | " + arm, "| center5 | " + arm)) for line in markdown.splitlines()) == 2
    console = Console(record=True, width=160)
    print_study_summary(metrics, console)
    table = console.export_text()
    assert "volume-only" in table and "markers-only" in table


class SumSites:
    """Stand-in training sites answering train.baseline with the real site functions on planted
    markers; `withhold` sites send counts only, `corrupt` sites a NaN gradient in Newton rounds."""

    def __init__(self, data: dict[str, tuple], withhold=(), corrupt=()):
        self.data, self.withhold, self.corrupt = data, set(withhold), set(corrupt)
        self.nodes = {i: c for i, c in enumerate(data, start=1)}

    def reply(self, message):
        from flwr.app import Message

        from common.federation.records import check_reply

        center = self.nodes[message.metadata.dst_node_id]
        x, y = self.data[center]
        if center in self.withhold:
            return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(y), "withheld": 1})}),
                           reply_to=message)
        if message.content["config"]["step"] == "moments":
            content = RecordDict({"metrics": MetricRecord({"num-examples": len(y), "num-he": int(y.sum()),
                                                           **site_moments(x, MARKER_MODEL_FEATURES)})})
        else:
            content = RecordDict()
            for name, record in message.content.array_records.items():
                model = {k: v.numpy() for k, v in record.items()}
                d = len(model["mean"])
                terms = site_newton_terms(x[:, :d], y, model)
                if center in self.corrupt:
                    terms["g-0"] = float("nan")
                content[name] = MetricRecord({"num-examples": len(y), **terms})
        return Message(check_reply(content), reply_to=message)


def coordinator(sites: SumSites, min_valid: int = 2):
    """The parts of a FederatedRun that fit_baselines uses, over the stand-in sites."""
    from types import SimpleNamespace

    lines, steps = [], []
    run = SimpleNamespace(settings=SimpleNamespace(train_centers=tuple(sites.data), min_valid_replies=min_valid),
                          centers={c: i for i, c in sites.nodes.items()},
                          declared_cases={c: len(y) for c, (_, y) in sites.data.items()},
                          report={"stages": {}, "timing": {}}, log=lines.append, progress=steps.append,
                          exchange=lambda messages: {k: sites.reply(m) for k, m in messages.items()})
    return run, lines, steps


def test_the_coordinator_fits_from_the_sites_sums_and_drops_the_baselines_on_a_bad_sum(task_identity):
    from server.baselines import fit_baselines, record_model

    rng = np.random.default_rng(2)
    data = {"h1": planted_site(30, 0.0, -1.5, rng), "h2": planted_site(24, 0.4, -1.0, rng),
            "h3": planted_site(20, -0.3, -2.0, rng)}
    run, _, steps = coordinator(SumSites(data))
    arms = fit_baselines(run, {})
    assert set(arms) == {"volume-only", "markers-only"} and len(steps) == 1
    x = np.vstack([v[0] for v in data.values()])
    y = np.concatenate([v[1] for v in data.values()])
    pooled = fit_baseline(x, y, MARKER_MODEL_FEATURES).pipeline.decision_function(x)
    np.testing.assert_allclose(baseline_logits(record_model(arms["markers-only"]), x), pooled, atol=5e-3)
    assert run.report["stages"]["baselines"]["cases"] == {"h1": 30, "h2": 24, "h3": 20}

    # A site withholding its sums (too few cases) is left out, named; the others fit.
    run, lines, _ = coordinator(SumSites(data, withhold={"h2"}))
    assert set(fit_baselines(run, {})) == {"volume-only", "markers-only"}
    stage = run.report["stages"]["baselines"]
    assert stage["sites"] == ["h1", "h3"] and stage["rejected"]["h2"].startswith("withheld: 24 fit case(s)")
    # ... unless too few sites remain.
    run, _, steps = coordinator(SumSites(data, withhold={"h2"}), min_valid=3)
    assert fit_baselines(run, {}) == {} and "min-valid-replies is 3" in run.report["stages"]["baselines"]["failed"]
    assert len(steps) == 1 and steps[0].startswith("baselines: not fitted")
    # A malformed Newton sum drops both arms with the reason; the study goes on without them.
    run, _, steps = coordinator(SumSites(data, corrupt={"h3"}))
    assert fit_baselines(run, {}) == {}
    assert run.report["stages"]["baselines"]["failed"] == (
        "volume-only: Newton round 1: h3: non-finite or non-scalar values")
    assert len(steps) == 1
