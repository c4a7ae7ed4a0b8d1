"""Clinical baselines fitted on the training centres: what the deep model has to beat.

* ``volume``: logistic regression on log baseline hematoma volume alone (the strongest single
  clinical predictor; the log makes the fit a proper dose-response, the AUC is the volume's).
* ``markers``: logistic regression on the segmentation-derived NCCT markers of
  ``common.metrics.markers`` (log volume, HU mean / SD / coefficient of variation, hypodense
  fraction, solidity, connected components).

Features are standardised with the training centres' means and SDs (a scikit-learn pipeline),
and the regression carries a mild L2 penalty (C = 1 on standardised features): with ~25 HE
events and 7 markers an unpenalised fit overfits. Nothing is fitted on external centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.metrics.markers import MARKER_NAMES

VOLUME_FEATURES = ("log_volume_ml",)
MARKER_MODEL_FEATURES = MARKER_NAMES


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
