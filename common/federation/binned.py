"""Operating point and calibration from aggregate histograms, so no per-patient score leaves a site.

Each training site bins the patient-level logits of its validation cases per class on fixed
edges; the server sums the histograms of all training sites, fits Platt scaling by weighted
logistic regression on the bin centres, and picks the Youden threshold on the pooled binned ROC.
Both are then fixed and sent unchanged to the held-out centres.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

EDGES = np.linspace(-8.0, 8.0, 17)  # 16 bins of the classifier logit; the end bins catch the tails
N_BINS = len(EDGES) - 1


def histogram(logits: np.ndarray) -> np.ndarray:
    clipped = np.clip(np.asarray(logits, float), EDGES[0], EDGES[-1] - 1e-9)
    return np.histogram(clipped, bins=EDGES)[0]


def to_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """Per-class logit histograms as flat scalar metrics (hist-he-00 ... hist-nhe-15)."""
    logits, labels = np.asarray(logits, float), np.asarray(labels, int)
    out = {}
    for name, cls in (("he", 1), ("nhe", 0)):
        for i, count in enumerate(histogram(logits[labels == cls])):
            out[f"hist-{name}-{i:02d}"] = int(count)
    return out


def from_metrics(metrics: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Summed (HE, non-HE) histograms of several sites' metrics."""
    he, nhe = np.zeros(N_BINS), np.zeros(N_BINS)
    for m in metrics:
        he += [m.get(f"hist-he-{i:02d}", 0) for i in range(N_BINS)]
        nhe += [m.get(f"hist-nhe-{i:02d}", 0) for i in range(N_BINS)]
    return he, nhe


def fit_operating_point(he: np.ndarray, nhe: np.ndarray) -> dict:
    """Platt (a, b) on bin centres and the Youden threshold on calibrated probability."""
    centres = (EDGES[:-1] + EDGES[1:]) / 2
    if he.sum() == 0 or nhe.sum() == 0:
        return {"calib-a": 1.0, "calib-b": 0.0, "threshold": 0.5, "fitted": 0}
    x = np.concatenate([centres, centres]).reshape(-1, 1)
    y = np.concatenate([np.ones(N_BINS), np.zeros(N_BINS)])
    w = np.concatenate([he, nhe])
    keep = w > 0
    fit = LogisticRegression(C=10.0, max_iter=1000).fit(x[keep], y[keep], sample_weight=w[keep])
    a, b = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    # Youden on the binned ROC: thresholds at bin edges, "positive" = logit above the edge.
    best_j, best_edge = -1.0, EDGES[N_BINS // 2]
    for i in range(1, N_BINS):
        sens = he[i:].sum() / he.sum()
        spec = nhe[:i].sum() / nhe.sum()
        if sens + spec - 1 > best_j:
            best_j, best_edge = sens + spec - 1, EDGES[i]
    threshold = float(1 / (1 + np.exp(-(a * best_edge + b)))) if a > 0 else 0.5
    return {"calib-a": a, "calib-b": b, "threshold": threshold, "youden-j": float(best_j), "fitted": 1}
