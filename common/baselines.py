"""Clinical baselines fitted on the training centres: what the deep model has to beat.

* ``volume``: logistic regression on log baseline hematoma volume alone (the strongest single
  clinical predictor; the log makes the fit a proper dose-response, the AUC is the volume's).
* ``markers``: logistic regression on the segmentation-derived NCCT markers of
  ``common.metrics.markers`` (log volume, HU mean / SD / coefficient of variation, hypodense
  fraction, solidity, connected components).

Features are standardised with the training centres' means and SDs (a scikit-learn pipeline),
and the regression carries a mild L2 penalty (C = 1 on standardised features): with ~25 HE
events and 7 markers an unpenalised fit overfits. Nothing is fitted on external centres.

Federated fitting (the `volume-only` and `markers-only` arms of `hemex simulate`): the same
model, fitted without any feature leaving a site. Each site returns aggregates only:

1. per feature, the count, sum and sum of squares of its finite values (`site_moments`); the
   coordinator pools them into means and population SDs (`pooled_standardization`), exactly
   what a StandardScaler on the pooled cases computes;
2. at the coordinator's current coefficients, the site's summed log-loss, gradient and Hessian
   (`site_newton_terms`: d + 1 + (d + 1)(d + 2) / 2 numbers, 46 for the 7 markers); the
   coordinator adds the L2 penalty and takes a Newton step (`FederatedFit.update`).

Newton converges in a handful of rounds to the optimum of the pooled penalised likelihood, i.e.
the coefficients `fit_baseline` would find on the pooled training cases (up to its lbfgs
tolerance). A non-finite feature value (e.g. the CV of a zero-mean mask) counts as the pooled
mean. The model travels as arrays: intercept and coefficients per standardised feature
(`coef`), the pooled `mean` and `scale`; `baseline_logits` scores cases with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.metrics.markers import MARKER_NAMES

VOLUME_FEATURES = ("log_volume_ml",)
MARKER_MODEL_FEATURES = MARKER_NAMES
# The study's baseline arms: arm name -> features (the arms run-config value "baselines").
BASELINE_ARMS = {"volume-only": VOLUME_FEATURES, "markers-only": MARKER_MODEL_FEATURES}
NEWTON_TOLERANCE = 1e-7  # largest coefficient change (per standardised feature) at convergence
MAX_NEWTON_ROUNDS = 25


@dataclass
class Baseline:
    names: tuple[str, ...]
    pipeline: object

    def predict_proba(self, x) -> np.ndarray:
        x = np.asarray(x, float).reshape(-1, len(self.names))
        if len(x) == 0:
            return np.zeros(0)
        return self.pipeline.predict_proba(np.nan_to_num(x))[:, 1]

    def describe(self) -> dict:
        """Coefficients per standardised feature, the intercept, and the training means / SDs."""
        scaler, model = self.pipeline.named_steps["standardscaler"], self.pipeline.named_steps["logisticregression"]
        return {"features": list(self.names),
                "coef_per_sd": dict(zip(self.names, model.coef_[0].round(4).tolist())),
                "intercept": float(model.intercept_[0]),
                "mean": dict(zip(self.names, scaler.mean_.round(4).tolist())),
                "sd": dict(zip(self.names, scaler.scale_.round(4).tolist()))}


def fit_baseline(x, y, names, C: float = 1.0) -> Baseline:
    """Standardise, then L2 logistic regression; x is (n, len(names)) on training-centre cases."""
    x = np.nan_to_num(np.asarray(x, float).reshape(-1, len(names)))
    y = np.asarray(y, int)
    if len(set(y.tolist())) < 2:
        raise ValueError("a baseline needs HE and non-HE training cases")
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    pipeline.fit(x, y)
    return Baseline(tuple(names), pipeline)


# ------------------------------------------------------------------------------------------
# Federated fitting: sites compute aggregates, the coordinator standardises and steps.


def feature_matrix(markers: dict[str, dict], keys, names) -> np.ndarray:
    """(n, len(names)) marker values of the cases `keys` ("center/case_id"); NaN where missing."""
    return np.array([[float(markers.get(k, {}).get(n, math.nan)) for n in names] for k in keys],
                    float).reshape(-1, len(names))


def site_moments(x, names) -> dict[str, float]:
    """Per feature: count, sum and sum of squares of the finite values (aggregates only)."""
    x = np.asarray(x, float).reshape(-1, len(names))
    out = {}
    for j, name in enumerate(names):
        values = x[np.isfinite(x[:, j]), j]
        out.update({f"{name}-n": float(len(values)), f"{name}-sum": float(values.sum()),
                    f"{name}-sumsq": float((values ** 2).sum())})
    return out


def pooled_standardization(moments: list[dict], names) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) over every site's finite values: the population SD, as StandardScaler;
    a constant feature gets scale 1."""
    mean, scale = np.zeros(len(names)), np.ones(len(names))
    for j, name in enumerate(names):
        n = sum(m[f"{name}-n"] for m in moments)
        if n == 0:
            continue
        mean[j] = sum(m[f"{name}-sum"] for m in moments) / n
        var = max(sum(m[f"{name}-sumsq"] for m in moments) / n - mean[j] ** 2, 0.0)
        scale[j] = math.sqrt(var) if var > 1e-12 * max(1.0, mean[j] ** 2) else 1.0
    return mean, scale


def standardize(x, mean, scale) -> np.ndarray:
    """(x - mean) / scale with the intercept column first; a non-finite value counts as the mean."""
    z = (np.asarray(x, float).reshape(-1, len(mean)) - mean) / scale
    z[~np.isfinite(z)] = 0.0
    return np.concatenate([np.ones((len(z), 1)), z], axis=1)


def baseline_logits(model: dict, x) -> np.ndarray:
    """Logits of cases x (raw marker values) under a model {"coef", "mean", "scale"}."""
    coef, mean, scale = (np.asarray(model[k], float) for k in ("coef", "mean", "scale"))
    return standardize(x, mean, scale) @ coef


def newton_keys(d: int) -> list[str]:
    """Metric keys of one site's Newton terms for d features (intercept = index 0)."""
    k = d + 1
    return (["loss"] + [f"g-{i}" for i in range(k)]
            + [f"h-{i}-{j}" for i in range(k) for j in range(i, k)])


def site_newton_terms(x, y, model: dict) -> dict[str, float]:
    """The site's summed log-loss, gradient and Hessian (upper triangle) of the unpenalised
    log-likelihood at the model's coefficients: sums over its cases, nothing per case."""
    a = standardize(x, np.asarray(model["mean"], float), np.asarray(model["scale"], float))
    y = np.asarray(y, float)
    z = a @ np.asarray(model["coef"], float)
    p = 1.0 / (1.0 + np.exp(-z))
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    g = a.T @ (p - y)
    h = a.T @ (a * (p * (1 - p))[:, None])
    k = a.shape[1]
    out = {"loss": loss, **{f"g-{i}": float(g[i]) for i in range(k)}}
    out.update({f"h-{i}-{j}": float(h[i, j]) for i in range(k) for j in range(i, k)})
    return out


@dataclass
class FederatedFit:
    """The coordinator's side of one federated baseline: pooled standardisation, then Newton
    steps on the sum of the sites' terms plus the L2 penalty of `fit_baseline` (the objective
    C * sum of log-losses + |coefficients|^2 / 2, intercept unpenalised)."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    C: float = 1.0
    coef: np.ndarray = field(default=None)
    rounds: int = 0
    last_step: float = math.inf
    objective: float = math.nan

    def __post_init__(self):
        if self.coef is None:
            self.coef = np.zeros(len(self.names) + 1)

    @property
    def converged(self) -> bool:
        return self.last_step < NEWTON_TOLERANCE

    def model(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef.copy(), "mean": np.asarray(self.mean, float).copy(),
                "scale": np.asarray(self.scale, float).copy()}

    def update(self, terms: list[dict]) -> float:
        """One Newton step from the sites' terms at the current coefficients; returns its size."""
        k = len(self.coef)
        g, h, loss = np.zeros(k), np.zeros((k, k)), 0.0
        for t in terms:
            loss += t["loss"]
            g += [t[f"g-{i}"] for i in range(k)]
            for i in range(k):
                for j in range(i, k):
                    h[i, j] += t[f"h-{i}-{j}"]
        h = np.triu(h) + np.triu(h, 1).T
        penalty = np.ones(k)
        penalty[0] = 0.0  # the intercept is not penalised (scikit-learn's lbfgs)
        self.objective = float(self.C * loss + 0.5 * np.sum(penalty * self.coef ** 2))
        gradient = self.C * g + penalty * self.coef
        hessian = self.C * h + np.diag(penalty)
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]  # singular only without data
        self.coef = self.coef - step
        self.rounds += 1
        self.last_step = float(np.max(np.abs(step)))
        return self.last_step

    def describe(self) -> dict:
        """As Baseline.describe: coefficients per standardised feature, intercept, means, SDs."""
        return {"features": list(self.names),
                "coef_per_sd": dict(zip(self.names, np.round(self.coef[1:], 4).tolist())),
                "intercept": float(self.coef[0]), "mean": dict(zip(self.names, np.round(self.mean, 4).tolist())),
                "sd": dict(zip(self.names, np.round(self.scale, 4).tolist())),
                "newton_rounds": self.rounds, "converged": self.converged, "objective": self.objective}
