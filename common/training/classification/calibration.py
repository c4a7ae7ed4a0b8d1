"""Calibration of the patient-level logit: Platt scaling, a temperature, or none."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.errors import ConfigError
from common.training.classification.settings import CALIBRATIONS

@dataclass
class Calibration:
    """p = sigmoid(a * z + b) on the patient-level logit z. Platt fits a and b; temperature fits
    a = 1/T with b = -log(pos_weight)/T (the known prior shift of the weighted loss); none = (1, 0)."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    n: int = 0

    def __call__(self, z) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(z, float) + self.b)))


def fit_calibration(z, y, method: str = "platt", pos_weight: float = 1.0) -> Calibration:
    """Fit on held-out training-centre cases only (never on external centres)."""
    z, y = np.asarray(z, float), np.asarray(y, int)
    if method == "none" or len(set(y.tolist())) < 2:
        return Calibration("none" if method == "none" else f"{method}-skipped (one class)", 1.0, 0.0, len(y))
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Mild L2 (C=10 on an unscaled 1-D logit) keeps the slope finite on separable sets.
        fit = LogisticRegression(C=10.0, max_iter=1000).fit(z.reshape(-1, 1), y)
        return Calibration("platt", float(fit.coef_[0, 0]), float(fit.intercept_[0]), len(y))
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        shift = math.log(pos_weight) if pos_weight > 0 else 0.0

        def nll(log_t):
            t = math.exp(log_t)
            p = np.clip(1 / (1 + np.exp(-(z - shift) / t)), 1e-7, 1 - 1e-7)
            return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

        t = math.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x)
        return Calibration("temperature", 1 / t, -shift / t, len(y))
    raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {method!r}")
