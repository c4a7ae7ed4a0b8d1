"""The classifier arms of a run: each arm trained (federated rounds, the no-synthesis ablation,
local-only and centralized runs, the baseline logistic regressions), then every arm's operating
point fixed on the training centres' validation histograms and all arms scored together at the
held-out centres on the same delivered masks (paired DeLong there, on site)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common.federation import binned
from common.federation.records import WITHHELD, to_record
from common.federation.settings import POOLED
from common.training.classification.settings import create_model as create_classifier_model
from server.baselines import fit_baselines
from server.guard import train_reply_problem

if TYPE_CHECKING:
    from server.run import FederatedRun


def score_arms(run: "FederatedRun", arms: dict[str, ArrayRecord], seg_arrays: ArrayRecord,
               attach: dict) -> tuple[ArrayRecord, dict]:
    """Operating point of every arm from the training sites' validation histograms, then every
    arm scored at the held-out centres in one message, on the same delivered masks."""
    train_nodes = {c: run.centers[c] for c in run.settings.train_centers}
    validation = run.send("evaluate.cls", train_nodes, RecordDict(
        {**{f"arm.{a}": w for a, w in arms.items()}, **attach,
         "config": ConfigRecord({"split": "validation", "mask-source": run.settings.cls_masks})}), per_arm=True)
    points = {}
    for arm in arms:
        # A local-only model is calibrated where it was trained, as a site alone would do.
        sources = [arm.removeprefix("local-")] if arm.startswith("local-") else list(train_nodes)
        he, nhe = binned.from_metrics([validation[c]["arms"][arm] for c in sources
                                       if arm in validation[c].get("arms", {})])
        points[arm] = {**binned.fit_operating_point(he, nhe), "n": int(he.sum() + nhe.sum())}
    point = points["federated"]
    run.progress(f"cls: operating points fixed on training-centre validation cases (federated: "
                 f"n={point['n']}, threshold {point['threshold']:.3f})")
    config = {f"{arm}.{k}": p[k] for arm, p in points.items() for k in ("calib-a", "calib-b", "threshold")}
    test_nodes = run.test_nodes
    final = run.send("evaluate.cls", test_nodes, RecordDict(
        {**{f"arm.{a}": w for a, w in arms.items()}, "seg-arrays": seg_arrays,
         "config": ConfigRecord({**config, "split": "all", "mask-source": "segmentation"})}),
        per_arm=True) if test_nodes else {}
    final.update(run.not_evaluated())
    run.progress(f"cls: {len(arms)} arm(s) scored at the held-out centres")
    stage = run.report["stages"].setdefault("cls", {})
    # The federated arm as before; every arm (histograms included) under "arms".
    stage["operating_point"] = point
    stage["final"] = _without_histograms({c: arm_view(m, "federated") for c, m in {**validation, **final}.items()})
    stage["arms"] = {arm: {"operating_point": points[arm],
                           "external": {c: arm_view(m, arm) for c, m in final.items()}}
                     for arm in arms}
    return arms["federated"], point


def train_arms(run: "FederatedRun", attach: dict) -> dict[str, ArrayRecord]:
    """Weights of every classifier arm, from the same initial weights, epoch budget and ROI
    source (`attach`: the segmentation weights, or nothing for reference masks)."""
    windows = run.profile["preprocess"]["windows"]
    initial = (run.cls_initial if run.cls_initial is not None
               else to_record(create_classifier_model(run.cls, windows).state_dict()))
    s = run.settings
    with_synthesis = s.synthesis != "none"
    arms = {"federated": run.train_stage("cls", initial, s.cls_rounds, attach=attach,
                                         config={"arm": "federated", "use-synthetic": with_synthesis})}
    if "no-synthesis" in s.arms and with_synthesis:
        if no_site_kept_synthetic(run):
            # Same rounds, seeds and ROIs as the federated arm, and no synthetic ROI anywhere:
            # retraining would reproduce the federated weights exactly.
            arms["no-synthesis"] = arms["federated"]
            run.report["stages"]["cls-no-synthesis"] = {"reused": "federated",
                                                        "why": "no training site kept synthetic ROIs"}
            run.steps_total -= s.cls_rounds
            run.log("cls-no-synthesis: no site kept synthetic ROIs, so this arm is the federated arm "
                    "(not retrained)")
        else:  # Same rounds and seeds: only the synthetic ROIs differ.
            arms["no-synthesis"] = run.train_stage("cls-no-synthesis", initial, s.cls_rounds, action="cls",
                                                   attach=attach,
                                                   config={"arm": "no-synthesis", "use-synthetic": False})
    alone = {}
    if "local" in s.arms:
        alone.update({f"local-{c}": (c, with_synthesis) for c in s.train_centers})
    if "centralized" in s.arms:
        alone["centralized"] = (POOLED, False)  # synthetic ROIs stay at their sites
    if alone:
        arms.update(train_alone(run, initial, alone, attach))
    if "baselines" in s.arms:  # volume-only and markers-only logistic regressions, same sites and markers
        arms.update(fit_baselines(run, attach))
    return arms


def no_site_kept_synthetic(run: "FederatedRun") -> bool:
    """True when the synthesis stage ran at every training site without error and each kept
    no synthetic ROI (the realism gate dropped them, or none were needed)."""
    synth = run.report["stages"].get("synth")
    return bool(synth) and set(synth) >= set(run.settings.train_centers) and all(
        "error" not in m and int(m.get("num-kept", 0)) == 0 for m in synth.values())


def train_alone(run: "FederatedRun", initial: ArrayRecord, arms: dict[str, tuple[str, bool]],
                attach: dict) -> dict[str, ArrayRecord]:
    """Local-only and centralized arms: one message per arm asking its node to train alone
    for the federated arm's total epochs (rounds x epochs). All arms run at once."""
    epochs = run.settings.cls_rounds * run.settings.cls_epochs
    done, todo = {}, {}
    for arm, (center, synthetic) in arms.items():
        latest = run.checkpoints.latest(f"cls-{arm}") if run.settings.resume else None
        if latest is not None:
            done[arm] = latest[1]
        else:
            todo[arm] = (center, synthetic)
    if todo:
        messages = {arm: Message(RecordDict({"arrays": initial, **attach, "config": ConfigRecord(
            {"epochs": epochs, "arm": arm, "use-synthetic": synthetic})}),
            dst_node_id=run.centers[center], message_type="train.cls_alone") for arm, (center, synthetic) in todo.items()}
        replies = run.exchange(messages)
        for arm, reply in replies.items():
            problem = reply if isinstance(reply, str) else train_reply_problem(
                reply.content, initial, run.declared_cases.get(todo[arm][0]))
            if problem:
                run.log(f"cls: arm {arm} failed at {todo[arm][0]}: {problem[:200]}")
                continue
            done[arm] = reply.content["arrays"]
            run.checkpoints.save(f"cls-{arm}", 1, done[arm], {"metrics": dict(reply.content["metrics"])})
            run.report["stages"].setdefault("cls-alone", {})[arm] = dict(reply.content["metrics"])
    run.progress("cls: " + ", ".join(f"{a} {'trained' if a in done else 'FAILED'}" for a in arms)
                 + f" ({epochs} epochs each)")
    return done


def arm_view(metrics: dict, arm: str) -> dict:
    """One arm's metrics at a centre, with the centre's counts (or its error)."""
    if "error" in metrics:
        return {"error": metrics["error"]}
    counts = {k: v for k, v in metrics.items() if k != "arms"}
    if metrics.get(WITHHELD):
        return {**counts, "error": f"withheld by the site: {int(metrics.get('num-examples', 0))} case(s), fewer "
                                   "than min-aggregate-cases"}
    return {**counts, **metrics.get("arms", {}).get(arm, {"error": "arm not scored"})}


def _without_histograms(results: dict[str, dict]) -> dict[str, dict]:
    return {c: {k: v for k, v in m.items() if not k.startswith("hist-")} for c, m in results.items()}
