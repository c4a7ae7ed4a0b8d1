"""Statistics for a binary risk model judged on external centres.

Conventions: ``y`` holds labels 1 (HE) / 0 (no HE); ``score`` is any score where higher means
more likely HE (a probability, a logit, a volume). Functions that need probabilities say so.

* AUC: scikit-learn's ``roc_auc_score``; 95 % CIs by DeLong's method (the structural-component
  variance of DeLong, DeLong & Clarke-Pearson 1988, computed with the midrank algorithm of Sun &
  Xu 2014) and by a stratified bootstrap (positives and negatives resampled separately, so every
  replicate keeps the observed prevalence and has an AUC; percentile interval).
* DeLong test: two models scored on the same cases; the variance of the AUC difference uses the
  covariance of their structural components (paired, correlated ROC curves).
* Operating point: the threshold maximising Youden's J = sensitivity + specificity - 1, chosen
  on training data and applied unchanged to external centres (``operating_point``). A case is
  called positive when ``score >= threshold``.
* Calibration: Brier score, a binned reliability curve, and the logistic recalibration
  intercept / slope (ideal 0 / 1).

Undefined values (PPV without any positive call, an AUC with one class) are ``nan`` and become
``null`` in JSON; they are never silently replaced by 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats
from scipy.special import logit
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from common.files import atomic_write

Z95 = float(stats.norm.ppf(0.975))


def _check(y, score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(float).ravel()
    score = np.asarray(score, dtype=float).ravel()
    if y.shape != score.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {score.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(score).all():
        raise ValueError("scores must be finite")
    return y.astype(int), score


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(y.sum()) < y.size


# ----------------------------------------------------------------------------- AUC and DeLong

def auc(y, score) -> float:
    """ROC AUC (scikit-learn); nan when only one class is present."""
    y, score = _check(y, score)
    return float(roc_auc_score(y, score)) if _both_classes(y) else float("nan")


def _midrank(x: np.ndarray) -> np.ndarray:
    """Ranks (1-based) with ties given their average rank, along the last axis."""
    return stats.rankdata(x, axis=-1)


def _structural_components(y: np.ndarray, scores: np.ndarray):
    """DeLong's placement values for k models at once (Sun & Xu's fast algorithm).

    scores: (k, n). Returns aucs (k,), v10 (k, m) for positives and v01 (k, n_neg) for negatives.
    """
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    v10 = (tz[:, :m] - tx) / n  # for each positive: share of negatives it outranks
    v01 = 1.0 - (tz[:, m:] - ty) / m  # for each negative: share of positives that outrank it
    return aucs, v10, v01


def delong_covariance(y, *scores) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and their DeLong covariance matrix for one or more models on the same cases."""
    y, first = _check(y, scores[0])
    matrix = np.stack([first] + [_check(y, s)[1] for s in scores[1:]])
    if not _both_classes(y):
        raise ValueError("DeLong needs both classes")
    aucs, v10, v01 = _structural_components(y, matrix)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores), len(scores)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores), len(scores)))
    return aucs, s10 / m + s01 / n


def delong_ci(y, score, level: float = 0.95) -> tuple[float, float, float, float]:
    """(auc, lower, upper, standard error) by DeLong; normal interval clipped to [0, 1]."""
    y, score = _check(y, score)
    if not _both_classes(y):
        return (float("nan"),) * 4
    aucs, cov = delong_covariance(y, score)
    se = math.sqrt(max(float(cov[0, 0]), 0.0))
    z = float(stats.norm.ppf(0.5 + level / 2))
    a = float(aucs[0])
    return a, max(0.0, a - z * se), min(1.0, a + z * se), se


def bootstrap_auc_ci(y, score, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                     stratified: bool = True) -> tuple[float, float, float]:
    """(auc, lower, upper): percentile interval of a stratified bootstrap (positives and negatives
    resampled separately, keeping their counts). Vectorised: one rank computation per replicate."""
    y, score = _check(y, score)
    if not _both_classes(y):
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    pos, neg = score[y == 1], score[y == 0]
    if stratified:
        bp = pos[rng.integers(0, pos.size, size=(n_boot, pos.size))]
        bn = neg[rng.integers(0, neg.size, size=(n_boot, neg.size))]
        ranks = _midrank(np.concatenate([bp, bn], axis=1))
        m, n = pos.size, neg.size
        aucs = (ranks[:, :m].sum(axis=1) / m - (m + 1) / 2.0) / n
    else:  # plain case resampling; replicates with a single class are dropped
        idx = rng.integers(0, y.size, size=(n_boot, y.size))
        yb, ranks = y[idx], _midrank(score[idx])
        m = yb.sum(axis=1)
        n = y.size - m
        ok = (m > 0) & (n > 0)
        aucs = ((ranks * yb).sum(axis=1)[ok] - m[ok] * (m[ok] + 1) / 2.0) / (m[ok] * n[ok])
    alpha = (1 - level) / 2
    low, high = np.quantile(aucs, [alpha, 1 - alpha])
    return float(roc_auc_score(y, score)), float(low), float(high)


def delong_test(y, score_a, score_b) -> dict:
    """Two-sided DeLong test of AUC(a) = AUC(b) for two models scored on the same cases.

    Returns auc_a, auc_b, diff (a - b), its 95 % CI, z and p. Identical scores give diff 0 and p 1.
    """
    y, a = _check(y, score_a)
    _, b = _check(y, score_b)
    aucs, cov = delong_covariance(y, a, b)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # identical (or identically ranked) scores: no difference to test
        se = 0.0
        z = 0.0 if abs(diff) < 1e-12 else math.copysign(math.inf, diff)
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "diff": diff,
            "diff_ci": [diff - Z95 * se, diff + Z95 * se], "z": float(z), "p": float(p), "n": int(y.size)}


# ----------------------------------------------------------------------------- operating point

def youden_threshold(y, score) -> float:
    """Threshold maximising sensitivity + specificity - 1 (positive call: score >= threshold).

    Among thresholds with the same J, the highest one (fewest positive calls) is taken, as
    scikit-learn's ROC curve lists them from high to low. An infinite first threshold of
    scikit-learn's curve (nobody positive) is never chosen when another threshold ties.
    """
    y, score = _check(y, score)
    if not _both_classes(y):
        raise ValueError("a Youden threshold needs both classes")
    fpr, tpr, thresholds = roc_curve(y, score, drop_intermediate=False)
    j = tpr - fpr
    finite = np.isfinite(thresholds)
    j = np.where(finite, j, -np.inf)
    best = np.flatnonzero(j >= j.max() - 1e-12)  # ties up to rounding: 2/3 - 0 vs 1 - 1/3
    return float(thresholds[int(best[0])])


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def wilson_ci(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (nan, nan) when total is 0."""
    if total == 0:
        return float("nan"), float("nan")
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def operating_point(y, score, threshold: float) -> dict:
    """Confusion counts, sensitivity, specificity, PPV, NPV (with Wilson 95 % CIs) at a fixed threshold."""
    y, score = _check(y, score)
    call = score >= threshold
    tp, fp = int(((y == 1) & call).sum()), int(((y == 0) & call).sum())
    fn, tn = int(((y == 1) & ~call).sum()), int(((y == 0) & ~call).sum())
    out = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, num, den in (("sensitivity", tp, tp + fn), ("specificity", tn, tn + fp),
                           ("ppv", tp, tp + fp), ("npv", tn, tn + fn)):
        out[name] = _ratio(num, den)
        out[f"{name}_ci"] = list(wilson_ci(num, den))
    return out


# ----------------------------------------------------------------------------- calibration

def brier(y, prob) -> float:
    """Mean squared error of probabilities (scikit-learn's brier_score_loss)."""
    y, prob = _check(y, prob)
    if prob.min() < 0 or prob.max() > 1:
        raise ValueError("Brier score needs probabilities in [0, 1]")
    return float(brier_score_loss(y, prob))


def calibration_curve(y, prob, n_bins: int = 5, strategy: str = "quantile") -> dict:
    """Reliability curve: per bin the mean predicted probability, the observed HE fraction and
    the count. Quantile bins keep every bin populated in small external centres."""
    y, prob = _check(y, prob)
    if strategy == "quantile":
        edges = np.unique(np.quantile(prob, np.linspace(0, 1, n_bins + 1)))
    elif strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    index = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, max(len(edges) - 2, 0))
    predicted, observed, count = [], [], []
    for b in range(max(len(edges) - 1, 1)):
        sel = index == b
        if sel.any():
            predicted.append(float(prob[sel].mean()))
            observed.append(float(y[sel].mean()))
            count.append(int(sel.sum()))
    return {"predicted": predicted, "observed": observed, "count": count, "strategy": strategy}


def calibration_slope(y, prob, eps: float = 1e-6) -> tuple[float, float]:
    """Logistic recalibration (intercept, slope) of y on logit(prob); ideal (0, 1).
    Slope < 1 means over-confident predictions, > 1 under-confident."""
    y, prob = _check(y, prob)
    if not _both_classes(y):
        return float("nan"), float("nan")
    from sklearn.linear_model import LogisticRegression

    x = logit(np.clip(prob, eps, 1 - eps)).reshape(-1, 1)
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(x, y)
    return float(fit.intercept_[0]), float(fit.coef_[0, 0])


# ----------------------------------------------------------------------------- one summary

def summarize(y, prob, threshold: float, n_boot: int = 2000, seed: int = 0, n_bins: int = 5) -> dict:
    """Everything reported for one model on one set of cases: AUC with DeLong and bootstrap
    95 % CIs, the operating point at a threshold fixed beforehand, Brier score and calibration."""
    y, prob = _check(y, prob)
    out = {"n": int(y.size), "n_he": int(y.sum()), "prevalence": float(y.mean()) if y.size else float("nan")}
    a, lo, hi, se = delong_ci(y, prob)
    _, blo, bhi = bootstrap_auc_ci(y, prob, n_boot=n_boot, seed=seed)
    out.update({"auc": a, "auc_ci_delong": [lo, hi], "auc_se_delong": se, "auc_ci_bootstrap": [blo, bhi]})
    out["at_threshold"] = operating_point(y, prob, threshold)
    if prob.min() >= 0 and prob.max() <= 1:
        out["brier"] = brier(y, prob)
        out["calibration"] = calibration_curve(y, prob, n_bins=n_bins)
        out["calibration_intercept"], out["calibration_slope"] = calibration_slope(y, prob)
    return out


# ----------------------------------------------------------------------------- plots

def _save_figure(fig, path: Path) -> Path:
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"), ".png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def plot_roc(curves: dict, path: Path, title: str = "ROC") -> Path:
    """ROC curves of several models, ``curves`` = {label: (y, score)}; AUC in the legend. Atomic PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for label, (y, score) in curves.items():
        y, score = _check(y, score)
        if not _both_classes(y):
            continue
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, lw=1.8, label=f"{label} (AUC {roc_auc_score(y, score):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, path)


def plot_calibration(curves: dict, path: Path, title: str = "Calibration", n_bins: int = 5) -> Path:
    """Reliability diagrams, ``curves`` = {label: (y, probability)}; Brier in the legend. Atomic PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="ideal")
    for label, (y, prob) in curves.items():
        y, prob = _check(y, prob)
        curve = calibration_curve(y, prob, n_bins=n_bins)
        ax.plot(curve["predicted"], curve["observed"], marker="o", lw=1.5,
                label=f"{label} (Brier {brier(y, prob):.3f})")
    ax.set(xlabel="predicted HE probability", ylabel="observed HE fraction", title=title, xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return _save_figure(fig, path)


__all__ = ["auc", "bootstrap_auc_ci", "brier", "calibration_curve", "calibration_slope", "delong_ci",
           "delong_covariance", "delong_test", "operating_point", "plot_calibration", "plot_roc",
           "summarize", "wilson_ci", "youden_threshold"]
