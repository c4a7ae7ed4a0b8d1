"""`hemex train-cls`: the central run. Split the training centres into a fitting and a held-out
calibration part (stratified per centre), train, calibrate, choose the Youden threshold on the
held-out training cases, fit the volume-only and marker baselines on the training centres, then
evaluate everything once on the external centres. Nothing is tuned on external centres. truth.csv
(synthetic cohorts) is read only at the very end, for the oracle AUC."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common.data.preprocess import DEFAULT_WINDOWS
from common.errors import ConfigError, DataError
from common.files import seed_everything, versions, write_csv, write_json
from common.training.classification.calibration import fit_calibration
from common.training.classification.oracle import PHENOTYPE_COLUMNS, phenotype_matrix, read_oracle_risk, read_truth
from common.training.classification.prediction import case_logits
from common.training.classification.rois import MaskProvider, ROIDataset, build_roi_dataset, key, stratified_split
from common.training.classification.settings import ClassifierSettings, create_model
from common.training.classification.storage import save_classifier
from common.training.classification.training import Budget, train_classifier

METRICS_FORMAT = "hemex-cls-metrics/1"


def _log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


def run_train_cls(data_root: Path, train_centers: list[str], test_centers: list[str], out: Path, *,
                  profile: str = "cpu", seed: int = 0,
                  mask_provider: MaskProvider | None = None, overrides: dict | None = None, threads: int | None = None,
                  quiet: bool = False) -> dict:
    """Train the ViT centrally on `train_centers`, evaluate on `test_centers`; returns metrics.json's content.

    The ROIs are centred on the reference masks, unless `mask_provider` (Python callers: a trained
    segmentation model, as the federation's held-out scoring does) gives the masks.
    """
    from common.baselines import MARKER_MODEL_FEATURES, VOLUME_FEATURES, fit_baseline
    from common.config import load_profile
    from common.data.contract import read_cohort
    from common.metrics import classification as st

    wall = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    overlap = sorted(set(train_centers) & set(test_centers))
    if overlap:
        raise ConfigError(f"centre(s) {', '.join(overlap)} are both training and test centres")
    if not train_centers or not test_centers:
        raise ConfigError("--train-centers and --test-centers each need at least one centre")
    loaded_profile = load_profile(profile)
    settings = ClassifierSettings.from_profile(loaded_profile, **(overrides or {}))
    windows = tuple(tuple(w) for w in loaded_profile.get("preprocess", {}).get("windows", DEFAULT_WINDOWS))
    if len(windows) != 3:
        raise ConfigError(f"profile {profile!r}: preprocess.windows must hold three (level, width) windows for the ViT")
    out = Path(out)
    cohort = read_cohort(Path(data_root), list(train_centers) + list(test_centers))

    # --- ROIs and marker features --------------------------------------------------------
    datasets: dict[str, ROIDataset] = {}
    for center, cases in cohort.items():
        t0 = time.perf_counter()
        datasets[center] = build_roi_dataset(cases, settings, mask_provider=mask_provider, windows=windows)
        d = datasets[center]
        _log(f"{center}: {len(d.cases)} of {len(cases)} cases usable ({int(d.labels().sum())} HE), "
             f"{len(d.excluded)} excluded, {time.perf_counter() - t0:.0f} s", quiet)
        for ex in d.excluded:
            _log(f"  excluded {ex}", quiet)
    excluded = [e.as_dict() for c in cohort for e in datasets[c].excluded]

    train_all = [r for c in train_centers for r in datasets[c].cases]
    y_train_all = np.array([r.he for r in train_all], int)
    if len(set(y_train_all.tolist())) < 2:
        raise DataError(data_root, f"training centres {', '.join(train_centers)} need usable HE and non-HE cases")
    fit_idx, held_idx = stratified_split(y_train_all, [r.center for r in train_all], settings.val_fraction, seed)
    fit_rois, held_rois = [train_all[i] for i in fit_idx], [train_all[i] for i in held_idx]
    y_held = np.array([r.he for r in held_rois], int)
    if settings.val_fraction > 0 and len(set(y_held.tolist())) < 2:
        raise DataError(data_root, "the held-out part of the training centres lacks HE or non-HE cases; "
                        "raise classifier.val_fraction or add cases")

    # --- ViT -------------------------------------------------------------------------------
    seed_everything(seed)
    model = create_model(settings, windows)
    from common.networks.vit import parameter_count

    budget = Budget(epochs=settings.epochs, steps=settings.steps, seconds=settings.max_seconds)
    _log(f"Training {settings.model} ({parameter_count(model) / 1e6:.2f} M parameters) on {len(fit_rois)} cases "
         f"({int(sum(r.he for r in fit_rois))} HE) x {settings.k_slices} slices; {len(held_rois)} held out "
         f"for calibration and threshold", quiet)

    def report(record):
        if record["epoch"] % 5 == 0 or record["epoch"] == 1:
            _log(f"  epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  {record['seconds']:.0f} s", quiet)

    markers_all = {k: v for c in train_centers for k, v in datasets[c].markers.items()}
    result = train_classifier(model, fit_rois, budget, seed, settings=settings, windows=windows,
                              aux_targets=markers_all, progress=report)
    calib_rois = held_rois if held_rois else fit_rois
    z_cal = case_logits(model, calib_rois, settings)
    y_cal = np.array([r.he for r in calib_rois], int)
    calibration = fit_calibration(z_cal, y_cal, settings.calibration, result.metrics["pos_weight"])
    p_cal = calibration(z_cal)
    threshold_vit = st.youden_threshold(y_cal, p_cal)
    _log(f"Calibration ({calibration.method}) and Youden threshold {threshold_vit:.3f} from {len(calib_rois)} "
         f"{'held-out ' if held_rois else 'in-sample '}training-centre cases", quiet)

    # --- baselines (fitted on every training-centre case) -------------------------------------
    def features(rois, names):
        return np.array([[datasets[r.center].markers[key(r)][n] for n in names] for r in rois], float)

    baselines = {"volume": fit_baseline(features(train_all, VOLUME_FEATURES), y_train_all, VOLUME_FEATURES),
                 "markers": fit_baseline(features(train_all, MARKER_MODEL_FEATURES), y_train_all, MARKER_MODEL_FEATURES)}
    thresholds = {"vit": threshold_vit}
    train_scores = {}
    for name, base in baselines.items():
        train_scores[name] = base.predict_proba(features(train_all, base.names))
        thresholds[name] = st.youden_threshold(y_train_all, train_scores[name])

    # --- external evaluation: every decision above is frozen now ---------------------------------
    test_rois = {c: datasets[c].cases for c in test_centers}
    preds: dict[str, dict[str, np.ndarray]] = {"vit": {}, "volume": {}, "markers": {}}
    labels = {}
    for c in test_centers:
        rois = test_rois[c]
        labels[c] = np.array([r.he for r in rois], int)
        preds["vit"][c] = calibration(case_logits(model, rois, settings)) if rois else np.zeros(0)
        for name, base in baselines.items():
            preds[name][c] = base.predict_proba(features(rois, base.names)) if rois else np.zeros(0)
    groups = list(test_centers) + (["pooled"] if len(test_centers) > 1 else [])
    labels["pooled"] = np.concatenate([labels[c] for c in test_centers])
    for name in preds:
        preds[name]["pooled"] = np.concatenate([preds[name][c] for c in test_centers])

    def evaluate(y, p, threshold):
        if len(y) == 0:
            return {"n": 0, "note": "no usable cases"}
        if len(set(y.tolist())) < 2:
            return {"n": int(len(y)), "n_he": int(y.sum()), "note": "one class only: AUC undefined",
                    "at_threshold": st.operating_point(y, p, threshold), "brier": st.brier(y, p)}
        return st.summarize(y, p, threshold, n_boot=settings.n_boot, seed=seed)

    external = {name: {g: evaluate(labels[g], preds[name][g], thresholds[name]) for g in groups} for name in preds}
    comparisons = {}
    for g in groups:
        y = labels[g]
        if len(y) and len(set(y.tolist())) == 2:
            comparisons[g] = {"vit_vs_volume": st.delong_test(y, preds["vit"][g], preds["volume"][g]),
                              "vit_vs_markers": st.delong_test(y, preds["vit"][g], preds["markers"][g])}
    internal = {"vit_held_out": evaluate(y_cal, p_cal, threshold_vit) if held_rois else None,
                "volume_train": evaluate(y_train_all, train_scores["volume"], thresholds["volume"]),
                "markers_train": evaluate(y_train_all, train_scores["markers"], thresholds["markers"])}

    # --- oracle (synthetic cohorts): truth.csv is read only now --------------------------------
    oracle = None
    risk = read_oracle_risk(Path(data_root))
    truth = read_truth(Path(data_root))
    phenotype_lr = None
    if risk is not None:
        oracle = {"note": "true risk of truth.csv vs label on the same evaluable cases; a perfect model "
                          "cannot exceed it in expectation. phenotype_lr: a logistic regression on the true "
                          "phenotype (truth.csv: log volume, irregularity, heterogeneity, blend, black hole, "
                          "islands, IVH, log onset time) fitted on the training centres' evaluable cases, i.e. "
                          "what a model measuring every marker perfectly could learn from this training set",
                  "groups": {}}
        try:
            phenotype_lr = fit_baseline(phenotype_matrix([truth[key(r)] for r in train_all]), y_train_all,
                                        PHENOTYPE_COLUMNS)
        except (KeyError, ValueError):
            phenotype_lr = None
        for g in groups:
            rois = test_rois[g] if g != "pooled" else [r for c in test_centers for r in test_rois[c]]
            r_scores = np.array([risk.get(key(r), np.nan) for r in rois])
            y = labels[g]
            if len(y) and np.isfinite(r_scores).all() and len(set(y.tolist())) == 2:
                a, lo, hi, _ = st.delong_ci(y, r_scores)
                entry = {"auc": a, "auc_ci_delong": [lo, hi]}
                if phenotype_lr is not None:
                    entry["phenotype_lr_auc"] = st.auc(y, phenotype_lr.predict_proba(
                        phenotype_matrix([truth[key(r)] for r in rois])))
                for name in preds:
                    if "auc" in external[name][g]:
                        entry[f"{name}_ratio"] = external[name][g]["auc"] / a
                oracle["groups"][g] = entry

    # --- files -------------------------------------------------------------------------------
    from common.networks.vit import classifier_config

    record = {"settings": settings.as_dict(), "architecture": classifier_config(settings.model, **settings.model_kwargs()),
              "calibration": asdict(calibration), "threshold": threshold_vit, "windows": [list(w) for w in windows],
              "train_centers": list(train_centers), "seed": seed}
    weights = save_classifier(out, result.state, record)
    plots = {}
    for g in groups:
        if len(labels[g]) and len(set(labels[g].tolist())) == 2:
            curves = {n: (labels[g], preds[n][g]) for n in ("vit", "markers", "volume")}
            if oracle and g in oracle["groups"]:
                rois = test_rois[g] if g != "pooled" else [r for c in test_centers for r in test_rois[c]]
                curves["oracle (true risk)"] = (labels[g], np.array([risk[key(r)] for r in rois]))
            plots[f"roc_{g}"] = st.plot_roc(curves, out / f"roc_{g}.png", title=f"ROC, {g} (external)").name
            plots[f"calibration_{g}"] = st.plot_calibration(
                {n: (labels[g], preds[n][g]) for n in ("vit", "markers", "volume")},
                out / f"calibration_{g}.png", title=f"Calibration, {g} (external)").name
    rows = []
    for c in test_centers:
        for i, r in enumerate(test_rois[c]):
            rows.append([c, r.case_id, r.he] + [round(float(preds[n][c][i]), 6) for n in ("vit", "volume", "markers")])
    write_csv(out / "predictions.csv", ["center", "case_id", "he", "vit", "volume", "markers"], rows)

    metrics = {
        "format": METRICS_FORMAT,
        "data_root": str(data_root),
        "train_centers": list(train_centers),
        "test_centers": list(test_centers),
        "seed": seed,
        "mask_source": "provider" if mask_provider is not None else "reference",
        "patient_score": f"{settings.aggregation} over {settings.k_slices} slices (flip TTA: {settings.tta}), "
                         f"then {calibration.method} calibration",
        "classifier": "ViT fused with the NCCT markers (MarkerFusion)" if settings.marker_fusion else "ViT",
        "counts": {c: {"cases": len(cohort[c]), "usable": len(datasets[c].cases), "he": int(datasets[c].labels().sum()),
                       "excluded": len(datasets[c].excluded)} for c in cohort},
        "excluded": excluded,
        "split": {"fit_cases": len(fit_rois), "held_out_cases": len(held_rois), "held_out_he": int(y_held.sum())},
        "training": result.metrics,
        "history": result.history,
        "calibration": asdict(calibration),
        "thresholds": thresholds,
        "baselines": {n: b.describe() for n, b in baselines.items()},
        "internal": internal,
        "external": external,
        "comparisons": comparisons,
        "oracle": oracle,
        "files": {"weights": weights.name, "record": "classifier.json", "predictions": "predictions.csv", **plots},
        "seconds": time.perf_counter() - wall,
    }
    config = {"command": sys.argv, "data_root": str(data_root), "train_centers": list(train_centers),
              "test_centers": list(test_centers), "profile": loaded_profile.get("name", profile), "seed": seed,
              "mask_source": metrics["mask_source"], "threads": torch.get_num_threads(),
              "classifier": settings.as_dict(), "architecture": record["architecture"],
              "windows": [list(w) for w in windows], "budget": asdict(budget), "versions": versions()}
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    if not quiet:
        print_summary(metrics)
    return metrics


def _fmt_auc(entry: dict | None) -> str:
    if not entry or entry.get("auc") is None or (isinstance(entry.get("auc"), float) and not math.isfinite(entry["auc"])):
        return "n/a"
    lo, hi = entry["auc_ci_delong"]
    if "auc_ci_bootstrap" not in entry:
        return f"{entry['auc']:.3f} ({lo:.3f}-{hi:.3f})"
    blo, bhi = entry["auc_ci_bootstrap"]
    return f"{entry['auc']:.3f} ({lo:.3f}-{hi:.3f}; boot {blo:.3f}-{bhi:.3f})"


def print_summary(metrics: dict) -> None:
    """The external results as a plain table (stdout)."""
    ext = metrics["external"]
    groups = list(ext["vit"])
    print("\nExternal evaluation (AUC, DeLong 95% CI; bootstrap 95% CI); vit = "
          + metrics.get("classifier", "ViT"))
    print(f"{'':10s} " + " ".join(f"{g:>44s}" for g in groups))
    for name in ("vit", "markers", "volume"):
        print(f"{name:10s} " + " ".join(f"{_fmt_auc(ext[name][g]):>44s}" for g in groups))
    if metrics.get("oracle"):
        og = metrics["oracle"]["groups"]
        print(f"{'oracle':10s} " + " ".join(f"{_fmt_auc(og.get(g)):>44s}" for g in groups))
        print(f"{'phen. LR':10s} " + " ".join(f"{og[g]['phenotype_lr_auc']:>44.3f}" if 'phenotype_lr_auc' in og.get(g, {})
                                               else f"{'n/a':>44s}" for g in groups))
        print(f"{'vit/oracle':10s} " + " ".join(f"{og[g]['vit_ratio']:>44.3f}" if g in og and 'vit_ratio' in og[g]
                                                else f"{'n/a':>44s}" for g in groups))
    for g in groups:
        t = ext["vit"][g].get("at_threshold")
        if t:
            print(f"vit @ {t['threshold']:.3f} ({g}): sens {t['sensitivity']:.2f} spec {t['specificity']:.2f} "
                  f"PPV {t['ppv']:.2f} NPV {t['npv']:.2f}"
                  + (f"  Brier {ext['vit'][g]['brier']:.3f}" if 'brier' in ext['vit'][g] else ""))
    for g, comp in metrics.get("comparisons", {}).items():
        c = comp["vit_vs_volume"]
        print(f"DeLong vit vs volume ({g}): diff {c['diff']:+.3f} p={c['p']:.3f}")
    if metrics["excluded"]:
        print(f"{len(metrics['excluded'])} case(s) excluded (reasons in metrics.json)")
