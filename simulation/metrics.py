"""metrics.json of a simulated study: every arm at every held-out centre, and pooled.

Built only from what the federation returned (aggregates per centre and arm) plus, on synthetic
cohorts, the oracle AUC from the generator's truth.csv. Per-centre AUCs and their DeLong CIs are
exact (computed on site); the pooled external AUC is the inverse-variance (fixed-effect)
combination of the centre AUCs, and pooled arm comparisons combine the centres' paired DeLong
differences the same way: a pooled ROC over centres would need per-patient scores, which never
leave a site. Schema: metrics.schema.json beside this file (documented in the README).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from jsonschema import Draft202012Validator
from scipy import stats

from common.data.contract import read_center
from common.metrics.classification import Z95, delong_ci
from common.training.classification.oracle import read_oracle_risk

SCHEMA_PATH = Path(__file__).with_name("metrics.schema.json")
FORMAT = "hemex-study-metrics/1"
ARM_DESCRIPTIONS = {
    "federated": "federated rounds over the training centres, with on-site synthesis when enabled",
    "no-synthesis": "the federated arm without synthetic ROIs (same rounds, seeds and budget)",
    "centralized": "all training centres' cases pooled on one node (upper reference; no synthesis)",
    "volume-only": "logistic regression on the log hematoma volume alone, fitted over the training centres from "
                   "aggregates (the clinical baseline; no image, no synthesis)",
    "markers-only": "logistic regression on the 7 NCCT markers (volume, density, heterogeneity, hypodensity, shape, "
                    "islands), fitted over the training centres from aggregates (no image, no synthesis)",
}


def describe(arm: str) -> str:
    if arm.startswith("local-"):
        return f"{arm.removeprefix('local-')} alone, same total epochs, with its own synthetic ROIs when enabled"
    return ARM_DESCRIPTIONS.get(arm, arm)


def fixed_effect(estimates: list[float], ses: list[float]) -> tuple[float, float] | None:
    """Inverse-variance pooled estimate and its standard error (None without usable centres).

    A centre without an estimate (one class only) is left out. A centre whose estimate has zero
    variance (AUC exactly 0 or 1 on a handful of cases) would take all the weight, and leaving it
    out would silently pool the other centres alone, so the pooled value is then undefined."""
    pairs = [(e, s) for e, s in zip(estimates, ses) if e is not None and s is not None
             and math.isfinite(e) and math.isfinite(s)]
    if not pairs or any(s <= 0 for _, s in pairs):
        return None
    w = np.array([1 / s**2 for _, s in pairs])
    est = float(np.sum(w * np.array([e for e, _ in pairs])) / w.sum())
    return est, float(1 / math.sqrt(w.sum()))


def oracle_by_center(data_root: Path, centers: list[str]) -> dict[str, dict]:
    """Oracle AUC (true generator risk) per centre with its DeLong SE; empty without truth.csv."""
    risk = read_oracle_risk(Path(data_root))
    if not risk:
        return {}
    out = {}
    for center in centers:
        cases = [c for c in read_center(Path(data_root) / center) if c.he is not None]
        pairs = [(risk[f"{center}/{c.case_id}"], c.he) for c in cases if f"{center}/{c.case_id}" in risk]
        if not pairs:
            continue
        score, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        auc, low, high, se = delong_ci(y, score)
        if math.isfinite(auc):
            out[center] = {"auc": auc, "se": se}
    return out


def _num(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


# Segmentation figures of a centre's evaluate reply that metrics.json carries: the record's
# kebab-case key becomes the file's snake_case key (one name per quantity).
SEG_RECORD_KEYS = ("dice", "volume-mae-ml")
NATIVE_RECORD_KEYS = ("dice-native", "volume-mae-native-ml", "volume-median-abs-err-native-ml")


def file_key(record_key: str) -> str:
    return record_key.replace("-", "_")


def center_entry(cls: dict, seg: dict, oracle: dict | None) -> dict:
    entry = {
        "n": int(cls.get("num-examples", 0)), "n_he": int(cls.get("num-he", 0)),
        "auc": _num(cls.get("auc")),
        "auc_ci": [cls["auc-lo"], cls["auc-hi"]] if "auc-lo" in cls else None,
        "auc_se": _num(cls.get("auc-se")),
        "sensitivity": _num(cls.get("sensitivity")), "specificity": _num(cls.get("specificity")),
        "brier": _num(cls.get("brier")),
        **{file_key(k): _num(seg.get(k)) for k in SEG_RECORD_KEYS},
        "n_seg": int(seg.get("num-examples", 0)),
    }
    if "dice-native" in seg:  # the delivered mask, on each scan's own grid (held-out centres)
        entry.update({file_key(k): _num(seg.get(k)) for k in NATIVE_RECORD_KEYS})
        small = _num(seg.get("dice-native-small"))
        entry["dice_native_small"] = small if small is not None and small >= 0 else None  # -1: withheld or none
        entry["n_small"] = int(seg.get("n-small", 0))
    if oracle:
        entry["oracle_auc"] = oracle["auc"]
    if "vs-federated-diff" in cls:
        entry["vs_federated"] = {"diff": cls["vs-federated-diff"], "se": cls["vs-federated-se"],
                                 "p": cls["vs-federated-p"]}
    if "error" in cls:
        entry["error"] = str(cls["error"])[:300]
    return entry


def pooled_entry(centers: dict[str, dict], oracle: dict[str, dict]) -> dict:
    ok = {c: e for c, e in centers.items() if "error" not in e}
    n = sum(e["n"] for e in ok.values())
    n_he = sum(e["n_he"] for e in ok.values())
    pooled = {"n": n, "n_he": n_he, "method": "fixed-effect (inverse-variance) over centres"}
    fe = fixed_effect([e["auc"] for e in ok.values()], [e["auc_se"] for e in ok.values()])
    pooled["auc"], pooled["auc_ci"] = (fe[0], [max(0.0, fe[0] - Z95 * fe[1]), min(1.0, fe[0] + Z95 * fe[1])]) \
        if fe else (None, None)
    # Counts-weighted pooling of the rates: sensitivity over HE cases, specificity over the others.
    for key, weight in (("sensitivity", "n_he"), ("specificity", None), ("brier", "n")):
        pairs = [(e[key], e[weight] if weight else e["n"] - e["n_he"]) for e in ok.values() if e.get(key) is not None]
        total = sum(w for _, w in pairs)
        pooled[key] = sum(v * w for v, w in pairs) / total if total else None
    for key in ("dice", "volume_mae_ml", "dice_native", "volume_mae_native_ml", "dice_native_small"):
        if not any(key in e for e in ok.values()):
            continue
        weight = "n_small" if key == "dice_native_small" else "n_seg"
        pairs = [(e[key], e[weight]) for e in ok.values() if e.get(key) is not None]
        total = sum(w for _, w in pairs)
        pooled[key] = sum(v * w for v, w in pairs) / total if total else None
    if oracle and all(c in oracle for c in ok):
        fe = fixed_effect([oracle[c]["auc"] for c in ok], [oracle[c]["se"] for c in ok])
        pooled["oracle_auc"] = fe[0] if fe else None
    diffs = [(e["vs_federated"]["diff"], e["vs_federated"]["se"]) for e in ok.values() if "vs_federated" in e]
    fe = fixed_effect([d for d, _ in diffs], [s for _, s in diffs]) if diffs else None
    if fe:
        z = fe[0] / fe[1]
        pooled["vs_federated"] = {"diff": fe[0], "se": fe[1], "p": float(2 * stats.norm.sf(abs(z)))}
    elif diffs and all(abs(d) < 1e-12 for d, _ in diffs):
        pooled["vs_federated"] = {"diff": 0.0, "se": 0.0, "p": 1.0}
    return pooled


def compute_bound_s(handler_seconds: list[float], workers: int = 2) -> float:
    """Shortest wall time the sites' own work allows on `workers` parallel slots."""
    return max(max(handler_seconds), sum(handler_seconds) / workers) if handler_seconds else 0.0


def traffic(report: dict, workers: int | None = None) -> dict:
    """Per trained stage: model size, bytes per site per round, round wall time, and the share
    of it not explained by the sites' handler time (Flower messaging, scheduling, Ray).
    `workers`: how many site handlers ran at once (default: the report's `concurrent_sites`, 2)."""
    workers = workers or int(report.get("concurrent_sites", 2))
    out = {}
    for stage, record in report["stages"].items():
        rounds = [r for r in record.get("rounds", []) if "train" in r] if isinstance(record, dict) else []
        if not rounds:
            continue
        sent = [b for r in rounds for b in r["train"]["sent_bytes"].values()]
        walls = [r["train"].get("wall_s") for r in rounds if r["train"].get("wall_s")]
        bounds = [compute_bound_s([m.get("handler-seconds", 0.0) for m in r["train"]["metrics"].values()], workers)
                  for r in rounds if r["train"].get("wall_s")]
        entry = {"rounds": len(rounds), "model_mib": report.get("model_bytes", {}).get(stage.split("-")[0], 0) / 2**20,
                 "sent_mib_per_site_per_round": float(np.mean(sent)) / 2**20 if sent else 0.0}
        if walls:
            entry["round_wall_s"] = float(np.mean(walls))
            entry["overhead_share"] = float(np.mean([max(0.0, w - b) / w for w, b in zip(walls, bounds)]))
        out[stage] = entry
    return out


def study_metrics(folds: list[dict], data_root: Path, seed: int, cohort: str | None) -> dict:
    """metrics.json content from one federation report per fold (one fold unless leave-one-out)."""
    arms: dict[str, dict] = {}
    test_centers, train_by_fold, oracle = [], [], {}
    for report in folds:
        settings = report["settings"]
        test = [c for c in str(settings["test-centers"]).split(",") if c]
        train = [c for c, info in report["centers"].items() if info["role"] == "train"]
        train_by_fold.append({"train": train, "test": test})
        test_centers += test
        oracle.update(oracle_by_center(data_root, test))
        seg = report["stages"].get("seg", {}).get("final", {})
        for arm, record in report["stages"].get("cls", {}).get("arms", {}).items():
            slot = arms.setdefault(arm, {"description": describe(arm), "shares": ["segmentation (federated)"],
                                         "centers": {}, "operating_points": {}})
            for center in test:
                slot["centers"][center] = center_entry(record["external"].get(center, {"error": "not scored"}),
                                                       seg.get(center, {}), oracle.get(center))
            slot["operating_points"][",".join(test)] = {k: record["operating_point"][k]
                                                        for k in ("threshold", "calib-a", "calib-b", "n")}
    for slot in arms.values():
        slot["pooled"] = pooled_entry(slot["centers"], oracle)
    # Arms in reading order whatever fold introduced them: federated, ablation, local-only, centralized,
    # then the marker baselines.
    rank = {"federated": 0, "no-synthesis": 1, "centralized": 3, "volume-only": 4, "markers-only": 5}
    arms = dict(sorted(arms.items(), key=lambda item: (rank.get(item[0], 2), item[0])))
    metrics = {"format": FORMAT, "seed": seed, "cohort": cohort, "data_root": str(data_root),
               "folds": train_by_fold, "test_centers": test_centers, "arms": arms,
               "traffic": [traffic(report) for report in folds]}
    validate(metrics)
    return metrics


def validate(metrics: dict) -> None:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    errors = sorted(Draft202012Validator(schema).iter_errors(metrics), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        raise ValueError(f"metrics.json does not match {SCHEMA_PATH.name}: {'/'.join(map(str, first.path))}: "
                         f"{first.message}")
