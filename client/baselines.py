"""The baseline arms' fitting at the site (server/baselines.py): moments of the fit cases' markers,
then the summed log-loss, gradient and Hessian at the coordinator's coefficients."""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.classifier import training_mask_provider
from client.messages import reply, small_group
from client.site import site_from_context
from common.baselines import BASELINE_ARMS, MARKER_MODEL_FEATURES, feature_matrix, site_moments, site_newton_terms
from common.federation.records import WITHHELD
from common.training.classification.rois import key as case_key


def train_baseline(message: Message, context: Context) -> Message:
    """The site's part in fitting the baseline arms (server/baselines.py), on the markers of the
    fit cases the classifier arms train on (reference masks, or the federated segmentation's
    when its weights ride along). Step "moments": per-feature count, sum and sum of squares.
    Step "newton": for each model sent ("baseline.<arm>": coefficients, pooled mean and scale),
    the summed log-loss, gradient and Hessian at those coefficients. Sums only, never a case's
    values; fewer fit cases than min-aggregate-cases: counts and withheld = 1."""
    site = site_from_context(context.node_config, context.run_config)
    dataset, fit, _ = site.roi_dataset(training_mask_provider(site, message))
    labels = np.array([r.he for r in fit], dtype=int)
    keys = [case_key(r) for r in fit]
    if small_group(context, site, len(fit)) or not fit:
        return reply(message, RecordDict({"metrics": MetricRecord({"num-examples": len(fit), WITHHELD: 1})}))
    if str(message.content["config"].get("step", "newton")) == "moments":
        metrics = {"num-examples": len(fit), "num-he": int(labels.sum()),
                   **site_moments(feature_matrix(dataset.markers, keys, MARKER_MODEL_FEATURES), MARKER_MODEL_FEATURES)}
        return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))
    content = RecordDict()
    for name, record in message.content.array_records.items():
        arm = name.removeprefix("baseline.")
        if name.startswith("baseline.") and arm in BASELINE_ARMS:
            model = {k: v.numpy() for k, v in record.items()}
            x = feature_matrix(dataset.markers, keys, BASELINE_ARMS[arm])
            content[name] = MetricRecord({"num-examples": len(fit), **site_newton_terms(x, labels, model)})
    return reply(message, content)
