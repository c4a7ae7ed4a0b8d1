"""What self-supervised pretraining gives the classifier's encoder (issue 19): linear probes and
fine-tuning, pretrained vs random encoder, on the external centres.

    python bench/ssl_bench.py --data runs/dev-flow/seed-1/cohort-paper-seed1 [--rounds 3] [--finetune]

The pretraining is the federation's stage run in-process: every training centre runs
`steps_per_round` masked-image steps per round on its own ROI slices (all its masked cases,
labelled or not) from the global weights, and the weights are averaged by slice count (FedAvg).
Probes read the frozen encoder's case features (class token and mean patch token, averaged over
the case's 3 classifier ROI slices, reference masks): a logistic regression for HE (fitted on the
training centres, scored on the external ones) and a ridge regression per NCCT marker (R^2 on the
external centres). With --finetune the classifier is also trained (the profile's settings, image
only and fused with the markers) from each encoder, and the external AUC reported beside the
volume-only and markers-only logistic regressions on the same reference masks, with paired DeLong
differences (image-only vs volume-only, fused vs markers-only). Where the cohort records its
phenotypes (truth.csv of a synthetic cohort), the ceiling is printed too: the external AUC of the
risk model's image-observable terms (every term but onset-to-CT time), which no image model can
beat. --rounds 0 skips pretraining (the random encoder only).
Nothing is tuned here: the profile's settings are measured as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.baselines import MARKER_MODEL_FEATURES, VOLUME_FEATURES, feature_matrix, fit_baseline  # noqa: E402
from common.config import load_profile  # noqa: E402
from common.data.contract import read_cohort  # noqa: E402
from common.files import seed_everything  # noqa: E402
from common.metrics.classification import auc, delong_test  # noqa: E402
from common.phantoms.risk import image_risk_score, phenotype_from_truth  # noqa: E402
from common.training.classification.prediction import case_logits  # noqa: E402
from common.training.classification.oracle import read_truth  # noqa: E402
from common.training.classification.pretraining import (MaskedImageModel, PretrainingSettings, encoder_features,  # noqa: E402
                                                        pretrain)
from common.training.classification.rois import build_roi_dataset, key, roi_array  # noqa: E402
from common.training.classification.settings import ClassifierSettings, create_model  # noqa: E402
from common.training.classification.training import Budget, augment_batch, train_classifier  # noqa: E402


def federated_pretraining(mim: MaskedImageModel, slices: dict[str, np.ndarray], settings: PretrainingSettings,
                          cls: ClassifierSettings, windows, rounds: int) -> list[float]:
    """FedAvg over the centres' slices, as the federation's ssl stage trains; per-round mean loss."""
    widths = [float(w) for _, w in windows]
    steps = settings.steps_per_round
    global_state = {k: v.clone() for k, v in mim.state_dict().items()}
    losses = []
    for r in range(1, rounds + 1):
        states, weights, round_losses = [], [], []
        for i, (center, x) in enumerate(sorted(slices.items())):
            mim.load_state_dict(global_state)
            result = pretrain(mim, x, settings, seed=1000 * r + i, schedule_offset=(r - 1) * steps,
                              schedule_total=rounds * steps,
                              augment=(lambda xb, g: augment_batch(xb, cls, g, widths)) if cls.augment else None)
            states.append({k: v.detach().clone() for k, v in mim.state_dict().items()})
            weights.append(len(x))
            round_losses.append(result["loss"])
        total = float(sum(weights))
        global_state = {k: sum(w * s[k].double() for w, s in zip(weights, states)).div(total).to(v.dtype)
                        for k, v in global_state.items()}
        losses.append(float(np.mean(round_losses)))
        print(f"  round {r}: mean site loss {losses[-1]:.4f}", flush=True)
    mim.load_state_dict(global_state)
    return losses


def probes(classifier, fit, external, cls) -> dict:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    f_fit = encoder_features(classifier, [roi_array(r, cls.mask_channel) for r in fit.cases])
    f_ext = encoder_features(classifier, [roi_array(r, cls.mask_channel) for r in external.cases])
    he = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000)).fit(f_fit, fit.labels())
    out = {"probe_he_auc": auc(external.labels(), he.decision_function(f_ext))}
    for name in MARKER_MODEL_FEATURES:
        y_fit = np.array([fit.markers[key(r)][name] for r in fit.cases], float)
        y_ext = np.array([external.markers[key(r)][name] for r in external.cases], float)
        ok_fit, ok_ext = np.isfinite(y_fit), np.isfinite(y_ext)
        ridge = make_pipeline(StandardScaler(), Ridge(alpha=10.0)).fit(f_fit[ok_fit], y_fit[ok_fit])
        out[f"r2_{name}"] = float(r2_score(y_ext[ok_ext], ridge.predict(f_ext[ok_ext])))
    return out


def finetuned_scores(initial_state, fit, external, cls, windows) -> dict:
    """External case logits of the image-only and the fused classifier trained from this encoder."""
    out = {}
    for fused in (False, True):
        settings = replace(cls, marker_fusion=fused)
        seed_everything(0)
        model = create_model(settings, windows)
        if initial_state is not None:
            backbone = getattr(model, "backbone", model)
            backbone.load_state_dict(initial_state, strict=False)
        train_classifier(model, fit.cases, Budget(epochs=settings.epochs), seed=0, settings=settings, windows=windows,
                         aux_targets=fit.markers)
        out["fused" if fused else "image"] = case_logits(model, external.cases, settings)
    return out


def ceiling_auc(data: Path, external) -> float | None:
    """AUC of the image-observable risk terms on the external cases, from the cohort's truth.csv."""
    rows = read_truth(data)
    if rows is None:
        return None
    return auc(external.labels(), [image_risk_score(phenotype_from_truth(rows[key(r)])) for r in external.cases])


def compare(results: dict, arm: str, scores: dict, baselines: dict, y) -> None:
    """AUCs of the arm's classifiers and their paired DeLong differences to the logistic regressions."""
    for name, baseline in (("image", "volume_only"), ("fused", "markers_only")):
        test = delong_test(y, scores[name], baselines[baseline])
        results[arm][f"{name}_auc"] = test["auc_a"]
        results[arm][f"{name}_vs_{baseline}"] = {"diff": test["diff"], "ci": test["diff_ci"], "p": test["p"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--train-centers", default="center1,center2,center3")
    parser.add_argument("--test-centers", default="center4,center5")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    cls, pre = ClassifierSettings.from_profile(profile), PretrainingSettings.from_profile(profile)
    windows = profile["preprocess"]["windows"]
    train, test = args.train_centers.split(","), args.test_centers.split(",")
    cohort = read_cohort(args.data, train + test)
    started = time.perf_counter()
    fit = build_roi_dataset([c for k in train for c in cohort[k]], cls, windows=windows, with_markers=True)
    external = build_roi_dataset([c for k in test for c in cohort[k]], cls, windows=windows, with_markers=True)
    slices = {}
    for k in train if args.rounds > 0 else []:
        dataset = build_roi_dataset(cohort[k], replace(cls, k_slices=pre.slices_per_case), windows=windows,
                                    require_label=False, with_markers=False)
        slices[k] = np.concatenate([roi_array(r, cls.mask_channel) for r in dataset.cases])
    unlabelled = sum(c.he is None for k in train for c in cohort[k])
    print(f"ROIs in {time.perf_counter() - started:.0f} s: {len(fit.cases)} training / {len(external.cases)} external "
          f"cases; pretraining slices {', '.join(f'{k} {len(x)}' for k, x in slices.items())} "
          f"({unlabelled} unlabelled training cases)", flush=True)

    seed_everything(0)
    mim = MaskedImageModel(create_model(replace(cls, marker_fusion=False), windows), len(windows) + cls.mask_channel)
    results = {"data": str(args.data), "rounds": args.rounds, "pretraining": pre.as_dict(),
               "random": probes(mim.classifier, fit, external, cls)}
    started = time.perf_counter()
    if args.rounds > 0:
        results["round_losses"] = federated_pretraining(mim, slices, pre, cls, windows, args.rounds)
        results["pretraining_seconds"] = time.perf_counter() - started
        results["pretrained"] = probes(mim.classifier, fit, external, cls)
    arms = ["random", "pretrained"] if args.rounds > 0 else ["random"]
    if args.finetune:
        y = external.labels()
        baselines = {}
        for name, features in (("volume_only", VOLUME_FEATURES), ("markers_only", MARKER_MODEL_FEATURES)):
            x_fit = feature_matrix(fit.markers, [key(r) for r in fit.cases], features)
            x_ext = feature_matrix(external.markers, [key(r) for r in external.cases], features)
            baselines[name] = fit_baseline(x_fit, fit.labels(), features).predict_proba(x_ext)
            results[f"{name}_auc"] = auc(y, baselines[name])
        compare(results, "random", finetuned_scores(None, fit, external, cls, windows), baselines, y)
        if args.rounds > 0:
            pretrained_state = {k: v for k, v in mim.classifier.state_dict().items() if not k.startswith("head")}
            compare(results, "pretrained", finetuned_scores(pretrained_state, fit, external, cls, windows), baselines, y)
    results["ceiling_auc"] = ceiling_auc(args.data, external)
    if args.rounds > 0:
        print(f"\npretraining: {args.rounds} rounds x {pre.steps_per_round} steps at {len(slices)} sites in "
              f"{results['pretraining_seconds']:.0f} s; mean site loss per round "
              + ", ".join(f"{v:.4f}" for v in results["round_losses"]))
    names = [k for k, v in results["random"].items() if isinstance(v, float)]
    print(f"{'encoder':<11}" + "".join(f"{n.removeprefix('r2_'):>20}" for n in names))
    for arm in arms:
        print(f"{arm:<11}" + "".join(f"{results[arm][n]:>20.3f}" for n in names))
    if args.finetune:
        print(f"volume-only AUC {results['volume_only_auc']:.3f}, markers-only AUC {results['markers_only_auc']:.3f} "
              "(same reference masks)")
        for arm in arms:
            for name, baseline in (("image", "volume_only"), ("fused", "markers_only")):
                d = results[arm][f"{name}_vs_{baseline}"]
                print(f"{arm} {name} - {baseline.replace('_', '-')}: {d['diff']:+.3f} "
                      f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}], p = {d['p']:.2f}")
    if results["ceiling_auc"] is not None:
        print(f"ceiling (image-observable risk terms, truth.csv): AUC {results['ceiling_auc']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
