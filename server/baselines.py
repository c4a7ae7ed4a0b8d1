"""The study's clinical baseline arms, fitted through the federation: a volume-only and a
markers-only logistic regression (`common.baselines`) on the training centres' NCCT markers.

Features never leave a site. One `train.baseline` message (step "moments") asks each training
site for per-feature counts, sums and sums of squares over its fit cases; the coordinator pools
them into the standardisation. Then, round by round (step "newton"), each site receives the
current coefficients and returns its summed log-loss, gradient and Hessian; the coordinator adds
the penalty and steps. Both models travel in the same messages until each has converged (a
handful of rounds: the pooled penalised fit, as `hemex train-cls` fits it on pooled cases).

The markers are the ones the classifier arms train on (cls-masks: reference masks, or the
federated segmentation's masks, whose weights then ride along), on the same fit / validation
split. The fitted models then join the classifier arms: operating point from the training sites'
validation histograms, scoring at the held-out centres on the delivered masks, paired DeLong
against the federated arm, all through the classifier's `evaluate.cls` messages.

Every site of the moments step must answer every Newton round (the objective is their sum): a
site that fails, withholds or sends a malformed reply drops the baseline arms with the reason,
and the study goes on without them. Robust strategies and the server-side DP wrapper do not
apply to these sums (see README).
"""

from __future__ import annotations

import math
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from common.baselines import (BASELINE_ARMS, MARKER_MODEL_FEATURES, MAX_NEWTON_ROUNDS, FederatedFit, newton_keys,
                              pooled_standardization)
from common.federation.records import WITHHELD

ACTION = "train.baseline"


def model_record(model: dict[str, np.ndarray]) -> ArrayRecord:
    """A baseline model as the arrays that travel (float64: coefficients, mean, scale)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in model.items()})


def record_model(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), float) for k, v in record.items()}


def metrics_problem(metrics, expected: set[str], declared: int | None, n: int | None = None) -> str | None:
    """Why a baseline reply's metrics cannot be summed, or None. Names no case data."""
    if metrics is None:
        return "no metrics record"
    if metrics.get(WITHHELD):
        return f"withheld: {int(metrics.get('num-examples', 0))} fit case(s), fewer than min-aggregate-cases"
    keys = set(metrics)
    if keys != expected:
        return f"{len(expected - keys)} missing and {len(keys - expected)} unexpected metric(s)"
    if any(isinstance(v, list) or not math.isfinite(float(v)) for v in metrics.values()):
        return "non-finite or non-scalar values"
    count = metrics["num-examples"]
    if not float(count).is_integer() or count < 1 or (declared is not None and count > declared):
        return f"num-examples {count!r} is not within 1..{declared} (the site's declared cases)"
    if n is not None and int(count) != n:
        return f"num-examples {int(count)} differs from the {n} case(s) of its moments"
    return None


def fit_baselines(run, attach: dict) -> dict[str, ArrayRecord]:
    """Fit every baseline arm over the training sites of `run` (a FederatedRun); returns
    {arm: model record} of the arms that converged, and records the fit in the run's report."""
    s = run.settings
    started = time.time()
    nodes = {c: run.centers[c] for c in s.train_centers}
    stage = run.report["stages"].setdefault("baselines", {"rejected": {}})

    def ask(sites: dict[str, int], config: dict, records: dict) -> dict[str, Message | str]:
        return run.exchange({c: Message(RecordDict({**records, **attach, "config": ConfigRecord(config)}),
                                        dst_node_id=n, message_type=ACTION) for c, n in sites.items()})

    def failed(reason: str) -> dict:
        stage["failed"] = reason
        run.report["timing"]["baselines_seconds"] = time.time() - started
        run.progress(f"baselines: not fitted ({reason[:160]})")
        return {}

    names = MARKER_MODEL_FEATURES  # every baseline's features are among the markers
    expected = {"num-examples", "num-he"} | {f"{n}-{k}" for n in names for k in ("n", "sum", "sumsq")}
    moments, counts = {}, {}
    for center, reply in ask(nodes, {"step": "moments"}, {}).items():
        metrics = None if isinstance(reply, str) else reply.content.metric_records.get("metrics")
        problem = reply if isinstance(reply, str) else metrics_problem(metrics, expected,
                                                                       run.declared_cases.get(center))
        if problem:
            stage["rejected"][center] = problem
            run.log(f"baselines: {center} left out: {problem[:200]}")
            continue
        moments[center] = dict(metrics)
        counts[center] = int(metrics["num-examples"])
    need = min(s.min_valid_replies, len(nodes))
    if len(moments) < need:
        return failed(f"{len(moments)} of {len(nodes)} training site(s) gave usable marker moments, "
                      f"min-valid-replies is {need}")
    n_he = sum(int(m["num-he"]) for m in moments.values())
    n = sum(counts.values())
    if not 0 < n_he < n:
        return failed(f"the sites' {n} fit case(s) hold {n_he} HE: a baseline needs both classes")
    stage.update({"sites": sorted(moments), "cases": counts, "he": n_he})
    sites = {c: nodes[c] for c in sorted(moments)}  # the Newton rounds ask exactly these sites
    fits = {}
    for arm, features in BASELINE_ARMS.items():
        mean, scale = pooled_standardization(list(moments.values()), features)
        fits[arm] = FederatedFit(tuple(features), mean, scale)
    while True:
        todo = [a for a, f in fits.items() if not f.converged and f.rounds < MAX_NEWTON_ROUNDS]
        if not todo:
            break
        replies = ask(sites, {"step": "newton"}, {f"baseline.{a}": model_record(fits[a].model()) for a in todo})
        terms: dict[str, list[dict]] = {a: [] for a in todo}
        for center, reply in sorted(replies.items()):
            for arm in todo:
                metrics = None if isinstance(reply, str) else reply.content.metric_records.get(f"baseline.{arm}")
                keys = {"num-examples"} | set(newton_keys(len(fits[arm].names)))
                problem = reply if isinstance(reply, str) else metrics_problem(
                    metrics, keys, run.declared_cases.get(center), counts[center])
                if problem:
                    return failed(f"{arm}: Newton round {fits[arm].rounds + 1}: {center}: {problem}")
                terms[arm].append(dict(metrics))
        for arm in todo:
            fits[arm].update(terms[arm])
    stage["arms"] = {arm: fit.describe() for arm, fit in fits.items()}
    done = {arm: model_record(fit.model()) for arm, fit in fits.items() if fit.converged}
    run.report["timing"]["baselines_seconds"] = time.time() - started  # part of cls_seconds
    run.progress("baselines: " + ", ".join(
        f"{arm} {'fitted' if fit.converged else 'did NOT converge'} in {fit.rounds} Newton round(s)"
        for arm, fit in fits.items()) + f" on {n} fit cases ({n_he} HE) at {len(sites)} site(s)")
    return done

