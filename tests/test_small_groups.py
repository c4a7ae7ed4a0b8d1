"""Small groups: a site withholds aggregates of fewer than min-aggregate-cases cases (counts and a
flag only) and scores at most max-cls-scorings classifier models per run; a site's node-config
can tighten both limits, never loosen them; the coordinator leaves withheld replies out."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import synthetic_head_ct, write_cases
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.site import privacy_limits
from common.data import io
from common.errors import ConfigError
from common.federation.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")
HE = [1, 0, 1, 0, 0, 1]


@pytest.fixture(scope="module")
def six_cases(tmp_path_factory):
    """One centre of six small head CTs with masks, three HE."""
    root = tmp_path_factory.mktemp("small") / "data"
    for i, he in enumerate(HE):
        image, mask = synthetic_head_ct(size=(40, 40, 8))
        io.write_image(image, root / f"S/images/s{i}.nii.gz")
        io.write_image(mask, root / f"S/masks/s{i}.nii.gz")
    write_cases(root / "S/cases.csv", [{"case_id": f"s{i}", "he": str(he)} for i, he in enumerate(HE)])
    return root


def settings_for(root, **overrides) -> FederationSettings:
    values = dict(data_root=str(root), profile="smoke", seg_rounds=1, cls_rounds=0, synthesis="none",
                  out_dir=str(root.parent / "out"))
    return FederationSettings(**{**values, **overrides})


def call(message_type: str, content: RecordDict, context: Context) -> Message:
    import client.app as client_app

    return client_app.app(Message(content, dst_node_id=context.node_id, message_type=message_type), context)


def site_context(root, settings, **node) -> Context:
    return Context(run_id=1, node_id=0, node_config={"center": "S", "data-path": str(root / "S"), **node},
                   state=RecordDict(), run_config=settings.to_run_config())


def cls_arms(root, settings, n: int) -> dict:
    from client.classifier import cls_model
    from client.site import Site

    model = cls_model(Site("S", root / "S", settings))
    return {f"arm.a{i}": ArrayRecord(model.state_dict()) for i in range(n)}


def scored(content: RecordDict, context: Context, split="all") -> Message:
    return call("evaluate.cls", RecordDict({**content, "config": ConfigRecord({"split": split})}), context)


def test_a_small_group_gets_counts_and_a_flag_only(six_cases):
    settings = settings_for(six_cases)
    arms = cls_arms(six_cases, settings, 2)
    # Six cases, k = 5: every arm's AUC and the logit histograms (six cases in 16 bins).
    full = scored(arms, site_context(six_cases, settings))
    assert dict(full.content["metrics"]) == {"num-examples": 6, "num-he": 3, "num-excluded": 0}
    federated = dict(full.content["arm.a0"])
    assert sum(v for k, v in federated.items() if k.startswith("hist-")) == 6 and 0 <= federated["auc"] <= 1
    # The site asks for k = 7 in its node-config: the same message gets counts only.
    withheld = scored(arms, site_context(six_cases, settings, **{"min-aggregate-cases": 7}))
    assert set(withheld.content.keys()) == {"metrics"}
    assert dict(withheld.content["metrics"]) == {"num-examples": 6, "num-he": 3, "num-excluded": 0, "withheld": 1}
    # A run config cannot lower a site's k: max(run 1, site 7).
    loose = settings_for(six_cases, min_aggregate_cases=1)
    assert privacy_limits({"min-aggregate-cases": 7}, loose) == (7, 32)
    assert dict(scored(arms, site_context(six_cases, loose, **{"min-aggregate-cases": 7})).content["metrics"])[
        "withheld"] == 1
    # One round's single model on the validation split (the smoke profile holds out one or two).
    single = scored({"arrays": arms["arm.a0"]}, site_context(six_cases, settings), split="validation")
    metrics = dict(single.content["metrics"])
    assert metrics["withheld"] == 1 and 0 < metrics["num-examples"] < 5 and not any(k.startswith("hist") for k in metrics)


def test_segmentation_summaries_are_withheld_below_k(six_cases):
    from client.segmentation import seg_model
    from client.site import Site

    settings = settings_for(six_cases)
    weights = ArrayRecord(seg_model(Site("S", six_cases / "S", settings)).state_dict())
    for split, node, n in (("validation", {}, 1), ("all", {"min-aggregate-cases": 7}, 6)):
        reply = call("evaluate.seg", RecordDict({"arrays": weights, "config": ConfigRecord({"split": split})}),
                     site_context(six_cases, settings, **node))
        # No mean, no five-number summary (with one case its min is that patient's Dice).
        assert dict(reply.content["metrics"]) == {"num-examples": n, "withheld": 1}


def test_a_site_scores_at_most_max_cls_scorings_models_per_run(six_cases):
    settings = settings_for(six_cases, max_cls_scorings=5)
    context = site_context(six_cases, settings)
    three = cls_arms(six_cases, settings, 3)
    assert not scored(three, context).has_error()
    assert not scored({"arm.a0": three["arm.a0"], "arm.a1": three["arm.a1"]}, context).has_error()  # 5 of 5
    refused = scored({"arm.a0": three["arm.a0"]}, context)
    assert refused.error.reason.startswith("PrivacyViolation: site error in evaluate.cls at messages.py:")
    # A new run starts a new count; a site's node-config lowers the run's bound (min(5, 2)).
    fresh = site_context(six_cases, settings, **{"max-cls-scorings": 2})
    assert scored(three, fresh).has_error() and "cls-scorings" not in fresh.state
    # A withheld reply scores nothing, so it spends nothing.
    small = site_context(six_cases, settings, **{"min-aggregate-cases": 10})
    assert dict(scored(three, small).content["metrics"])["withheld"] == 1 and "cls-scorings" not in small.state
    with pytest.raises(ConfigError, match="node-config max-cls-scorings = 'lots'"):
        privacy_limits({"max-cls-scorings": "lots"}, settings)


def test_the_run_must_fit_the_scoring_bound():
    centers = ("c1", "c2", "c3", "c4", "c5")
    study = dict(centers=centers, test_centers=("c4", "c5"), cls_rounds=3, arms=("federated", "no-synthesis",
                                                                                   "local", "centralized"))
    # 3 rounds x 2 round-trained arms + 6 arms at validation = 12 for the study's five arms kinds.
    assert FederationSettings(**study).cls_scorings_needed == 12
    assert FederationSettings(cls_rounds=3).cls_scorings_needed == 4
    with pytest.raises(ConfigError, match="score 12 classifier models, over max-cls-scorings 10"):
        FederationSettings(**study, max_cls_scorings=10)
    with pytest.raises(ConfigError, match="min-aggregate-cases"):
        FederationSettings.from_run_config({"min-aggregate-cases": 0})


def test_the_coordinator_leaves_withheld_replies_out_of_the_round_mean():
    from flwr.serverapp.strategy import FedAvg

    from server.guard import GuardedStrategy
    from server.classifier_arms import arm_view

    def evaluate_reply(node: int, metrics: dict) -> Message:
        sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate")
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)

    guard = GuardedStrategy(FedAvg(), {1: "a", 2: "b", 3: "c"}, {}, 1, 1, 2.0)
    mean = guard.aggregate_evaluate(1, [evaluate_reply(1, {"num-examples": 10, "dice": 0.8}),
                                        evaluate_reply(2, {"num-examples": 30, "dice": 0.4}),
                                        evaluate_reply(3, {"num-examples": 3, "withheld": 1})])
    assert dict(mean) == {"dice": pytest.approx(0.5)}  # (10 x 0.8 + 30 x 0.4) / 40, withheld site out
    assert guard.aggregate_evaluate(2, [evaluate_reply(3, {"num-examples": 3, "withheld": 1})]) is None
    view = arm_view({"num-examples": 3, "num-he": 1, "withheld": 1, "arms": {}}, "federated")
    assert view["num-examples"] == 3 and view["error"].startswith("withheld by the site: 3 case(s)")
    assert np.isfinite(mean["dice"])
