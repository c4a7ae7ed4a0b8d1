"""On-site synthesis: the site's generator trained, sampled toward the HE:NHE ratio and audited;
the synthetic ROIs stay in the site's work folder, the reply holds set-level numbers only."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict

from client.messages import reply
from client.site import site_from_context
from common.synthesis.run import MIN_HE_CASES, run_synth, usable_he_cases


def synthesize(message: Message, context: Context) -> Message:
    """Train the site's generator on its HE ROIs, generate toward the HE:NHE ratio, audit for
    memorization and realism; keep the accepted samples on site, report only counts and audit numbers."""
    site = site_from_context(context.node_config, context.run_config)
    n_he = usable_he_cases(site.data_path.parent, site.data_path.name)
    if n_he < MIN_HE_CASES:  # a small site: nothing to learn from, so it trains on its real ROIs only
        return reply(message, RecordDict({"metrics": MetricRecord({"num-kept": 0, "num-needed": 0,
                                                                   "skipped-he-cases": n_he})}))
    audit = run_synth(site.data_path.parent, site.data_path.name, site.work_dir, profile=site.settings.profile,
                      seed=site.round_seed("synth", 0), ratio=site.settings.synthesis, log=lambda _text: None,
                      cache_dir=site.cache_dir)
    memo = audit["memorization"]
    metrics = {"num-kept": int(memo["kept"]), "num-needed": int(memo["needed"]), "num-candidates": int(memo["synthetic"]),
               "num-accepted": int(memo["accepted"]), "audit-threshold": float(memo["threshold"]),
               "generator-cached": int(bool((audit.get("training") or {}).get("cached")))}
    realism = audit.get("realism")
    if realism is not None:  # set-level numbers only, never an image
        distance = audit["feature_distance"]
        metrics.update({"realism-mmd2": realism["mmd2_synthetic"], "realism-threshold": realism["mmd2_threshold"],
                        "realism-passed": -1 if realism["passed"] is None else int(realism["passed"]),
                        "realism-precision": distance["precision"], "realism-recall": distance["recall"]})
    if memo.get("nn_distance_ratio") is not None:
        metrics["nn-distance-ratio"] = float(memo["nn_distance_ratio"])
    return reply(message, RecordDict({"metrics": MetricRecord(metrics)}))
