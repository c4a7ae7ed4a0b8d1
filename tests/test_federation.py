"""Federation: settings, the reply whitelist, leave-center-out routing, client handlers on real
data, and whole simulated federations (slow: real Flower SuperLink + simulation engine)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from common.errors import ConfigError
from common.federation.records import PrivacyViolation, check_reply, norm_keys
from common.federation.settings import FederationSettings
from fake_grid import PushPullGrid
from server.grid import StageGrid

CENTERS = ("center1", "center2", "center3", "center4", "center5")


@pytest.fixture
def tiny(tiny_cohort) -> Path:
    return tiny_cohort


def settings_for(data: Path, out: Path, **overrides) -> FederationSettings:
    values = dict(data_root=str(data), centers=CENTERS, test_centers=("center4", "center5"), profile="smoke",
                  seg_rounds=2, cls_rounds=0, synthesis="none", out_dir=str(out), node_wait_s=60, round_timeout_s=900)
    values.update(overrides)
    return FederationSettings(**values)


# ------------------------------------------------------------------------------------------
# Settings and whitelist


def test_settings_round_trip_through_flower_run_config():
    settings = FederationSettings(centers=CENTERS, test_centers=("center5",), strategy="fedprox", proximal_mu=0.01)
    again = FederationSettings.from_run_config(settings.to_run_config())
    assert again == settings and again.train_centers == CENTERS[:4]


@pytest.mark.parametrize("config, message", [
    ({"strategy": "fedsgd"}, "strategy 'fedsgd' unknown"),
    ({"strategy": "fedprox"}, "needs proximal-mu > 0"),
    ({"centers": "a,b", "test-centers": "c"}, "test-centers c not among centers a, b"),
    ({"centers": "a", "test-centers": "a"}, "at least one centre must train"),
    ({"seg-round": 3}, "unknown run-config key(s) seg-round"),
    ({"seed": "abc"}, "run-config seed = 'abc'"),
    ({"cls-masks": "predicted"}, "cls-masks 'predicted' unknown"),
    ({"min-valid-replies": 0}, "min-valid-replies must be >= 1"),
    ({"max-weight-ratio": 0.5}, "max-weight-ratio >= 1"),
    ({"trim-fraction": 0.5}, "trim-fraction in"),
    ({"server-lr": 0}, "server-lr must be > 0"),
])
def test_bad_settings_are_one_line_errors(config, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FederationSettings.from_run_config(config)


def test_reply_whitelist_accepts_weights_and_scalars_only():
    weights = {"w": torch.ones(3)}
    ok = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 4, "dice": 0.9})})
    assert check_reply(ok, model=weights) is ok
    with pytest.raises(PrivacyViolation, match="may not carry weights"):
        check_reply(RecordDict({"image": ArrayRecord({"ct": torch.zeros(8, 64, 64)})}))
    with pytest.raises(PrivacyViolation, match="not the model's weights: 0 missing, 1 unexpected"):
        check_reply(RecordDict({"arrays": ArrayRecord({"w": torch.ones(3), "mask": torch.zeros(4, 4)})}),
                    model=weights)
    with pytest.raises(PrivacyViolation, match="not a scalar"):
        check_reply(RecordDict({"metrics": MetricRecord({"per-case-prob": [0.1, 0.9, 0.4]})}))
    with pytest.raises(PrivacyViolation, match="values"):
        check_reply(RecordDict({"metrics": MetricRecord({f"case-{i}": 0.5 for i in range(100)})}))


@pytest.mark.parametrize("name, expected", [("fedavg", "FedAvg"), ("fedprox", "FedProx"), ("fedadam", "FedAdam"),
                                            ("fedmedian", "RobustMedian"), ("fedtrimmedavg", "RobustTrimmedAvg"),
                                            ("krum", "RobustKrum"), ("multikrum", "RobustMultiKrum")])
def test_strategies_by_name_with_optional_server_side_dp(name, expected):
    from server.strategies import build_strategy

    settings = FederationSettings(strategy=name, proximal_mu=0.01 if name == "fedprox" else 0.0)
    strategy = build_strategy(settings, 3)
    assert type(strategy).__name__ == expected and strategy.min_train_nodes == 3
    private = build_strategy(FederationSettings(strategy=name, proximal_mu=settings.proximal_mu,
                                                dp_noise_multiplier=0.8, dp_clipping_norm=2.0), 3)
    assert type(private).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert private.noise_multiplier == 0.8 and private.clipping_norm == 2.0


def test_strategy_hyperparameters_reach_the_strategy_and_the_sites():
    from flwr.app import ArrayRecord, ConfigRecord
    from server.strategies import build_strategy

    adam = build_strategy(FederationSettings(strategy="fedadam", server_lr=0.05), 3)
    assert adam.eta == 0.05
    assert build_strategy(FederationSettings(strategy="fedtrimmedavg", trim_fraction=0.3), 5).beta == 0.3
    assert build_strategy(FederationSettings(strategy="krum", krum_attackers=2), 7).num_malicious_nodes == 2
    assert build_strategy(FederationSettings(strategy="krum"), 7).num_malicious_nodes == 2  # auto: (7 - 3) // 2
    # FedProx's mu travels in each training round's config, which is where the site reads it.
    from client.messages import proximal_mu

    prox = build_strategy(FederationSettings(strategy="fedprox", proximal_mu=0.03), 2)
    prox.min_available_nodes = prox.min_train_nodes = 1

    class OneNode:
        def get_node_ids(self):
            return [7]

    messages = prox.configure_train(1, ArrayRecord({"w": torch.ones(2)}), ConfigRecord({}), OneNode())
    assert [proximal_mu(m.content["config"]) for m in messages] == [0.03]
    assert proximal_mu(ConfigRecord({})) == 0.0


def test_fedbn_keeps_exactly_the_normalisation_layers_local():
    from common.federation.records import load_global
    from common.networks import create_model

    torch.manual_seed(0)
    site = create_model("umamba-bot", in_channels=3, out_channels=2)
    before = {k: v.clone() for k, v in site.state_dict().items()}
    global_state = {k: v + 1 if v.is_floating_point() else v for k, v in before.items()}
    keep = norm_keys(site)
    load_global(site, global_state, keep_local=keep)
    after = site.state_dict()
    # Every tensor of a module whose class is a normalisation layer (found by class name, not by the
    # code under test) stays the site's own; every other tensor takes the global value.
    local = {f"{name}.{key}" for name, module in site.named_modules() if "Norm" in type(module).__name__
             for key in module.state_dict(keep_vars=True) if "." not in key}
    assert local and keep == local
    for key, value in after.items():
        expected = before[key] if key in local else global_state[key]
        assert torch.equal(value, expected), key


class RecordingGrid(PushPullGrid):
    """A stand-in Grid that answers every message with an empty metric reply."""

    def __init__(self):
        self.sent = []

    def get_node_ids(self):
        return [1, 2, 3, 4, 5]

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        return [Message(RecordDict({}), reply_to=m) for m in messages]


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Every test here may build Flower messages (conftest's task_identity)."""


def test_stage_grid_never_sends_to_held_out_nodes():
    inner = RecordingGrid()
    grid = StageGrid(inner, {1: "center1", 2: "center2"}, "seg")
    assert sorted(grid.get_node_ids()) == [1, 2]
    content = RecordDict({"config": ConfigRecord({})})
    grid.send_and_receive([Message(content, dst_node_id=1, message_type="train")])
    assert [m.metadata.message_type for m in inner.sent] == ["train.seg"]
    with pytest.raises(RuntimeError, match="refusing to send train to node 4"):
        grid.send_and_receive([Message(content, dst_node_id=4, message_type="train")])
    # A stage's fixed records (the classifier stage's segmentation weights) ride on every message,
    # and the bytes sent per site count them.
    seg = ArrayRecord([np.ones(256, np.float32)])
    attached = StageGrid(inner, {1: "center1"}, "cls", attach={"seg-arrays": seg})
    attached.send_and_receive([Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate")])
    last = inner.sent[-1]
    assert last.metadata.message_type == "evaluate.cls" and "seg-arrays" in last.content.array_records
    assert attached.rounds["evaluate.cls"][0]["sent_bytes"]["center1"] == seg.count_bytes()


def test_no_synthesis_arm_reuses_the_federated_weights_only_when_no_site_kept_synthetic(tmp_path, monkeypatch):
    from server.classifier_arms import train_arms
    from server.run import FederatedRun

    settings = settings_for(tmp_path, tmp_path / "run", cls_rounds=2, synthesis="1:2",
                            centers=("center1", "center2", "center3"), test_centers=(),
                            arms=("federated", "no-synthesis"))
    run = FederatedRun(RecordingGrid(), settings, log=lambda _text: None)
    trained = []

    def train_stage(stage, initial, rounds, action="", attach=None, config=None):
        trained.append(stage)
        return ArrayRecord([np.full(4, float(len(trained)), np.float32)])

    monkeypatch.setattr(run, "train_stage", train_stage)
    dropped = {c: {"num-kept": 0, "num-needed": 9, "realism-passed": 0} for c in ("center1", "center2", "center3")}
    for synth, retrained in [(dropped, False),
                             ({**dropped, "center2": {"num-kept": 3, "num-needed": 9}}, True),  # one site kept some
                             ({**dropped, "center3": {"error": "out of memory"}}, True),  # unknown: retrain
                             ({"center1": dropped["center1"]}, True)]:  # a site never reported
        trained.clear()
        run.report["stages"] = {"synth": synth}
        total = run.steps_total
        arms = train_arms(run, {})
        assert trained == (["cls", "cls-no-synthesis"] if retrained else ["cls"])
        assert (arms["no-synthesis"] is arms["federated"]) != retrained
        assert run.steps_total == total - (0 if retrained else settings.cls_rounds)
        assert ("reused" in run.report["stages"].get("cls-no-synthesis", {})) != retrained
        run.steps_total = total


# ------------------------------------------------------------------------------------------
# Client handlers on real site data: every reply holds weights and aggregates only


def call_client(app, message_type: str, content: RecordDict, partition: int, settings: FederationSettings,
                state: RecordDict | None = None) -> Message:
    TaskIdentity.node_id = partition + 1
    context = Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition, "num-partitions": 5},
                      state=state if state is not None else RecordDict(), run_config=settings.to_run_config())
    message = Message(content, dst_node_id=partition + 1, message_type=message_type)
    return app(message, context)


@pytest.mark.slow
def test_client_replies_hold_only_weights_and_aggregate_metrics(tiny, tmp_path, site_replies):
    import client.app as client_app
    from client.classifier import cls_model
    from client.segmentation import seg_model
    from client.site import Site

    checked = site_replies
    settings = settings_for(tiny, tmp_path)
    weights = ArrayRecord(seg_model(Site("center1", tiny / "center1", settings)).state_dict())
    info = call_client(client_app.app, "query.info", RecordDict({"config": ConfigRecord({})}), 0, settings)
    assert info.content["info"]["center"] == "center1"
    assert dict(info.content["metrics"]) == {"num-cases": 10, "num-he": 2, "num-nhe": 8, "num-masks": 10,
                                             "slice-mm-min": 5.0, "slice-mm-max": 5.0}  # acquisition metadata only
    train = call_client(client_app.app, "train.seg",
                        RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 1})}), 0, settings)
    returned = train.content["arrays"].to_torch_state_dict()
    assert set(returned) == set(weights.keys())
    assert any(not torch.equal(returned[k], v) for k, v in weights.to_torch_state_dict().items())  # it trained
    assert dict(train.content["metrics"])["num-examples"] == 9
    evaluation = call_client(client_app.app, "evaluate.seg",
                             RecordDict({"arrays": weights, "config": ConfigRecord({"split": "all"})}), 3, settings)
    metrics = dict(evaluation.content["metrics"])
    assert metrics["num-examples"] == 10 and 0.0 <= metrics["dice"] <= 1.0
    # Aggregates only, named and fixed in number whatever the case count (no per-case values).
    assert set(metrics) == {"num-examples", "dice", "iou", "hd95-mm", "volume-median-abs-err-ml", "volume-mae-ml", "dice-min",
                            "dice-q25", "dice-median", "dice-q75", "dice-max", "dice-native", "volume-mae-native-ml",
                            "volume-median-abs-err-native-ml", "dice-native-small", "n-small"}
    synth_settings = settings_for(tiny, tmp_path, synthesis="1:1")  # a ratio that needs synthetic ROIs
    synth = call_client(client_app.app, "query.synth", RecordDict({"config": ConfigRecord({})}), 0, synth_settings)
    synth_metrics = dict(synth.content["metrics"])
    assert synth_metrics["num-needed"] > 0
    assert synth_metrics["num-kept"] <= synth_metrics["num-needed"]
    assert set(synth.content.keys()) == {"metrics"}  # the synthetic ROIs themselves stay on site
    assert (tmp_path / "sites" / "center1" / "synthetic_he.npz").is_file()
    assert set(synth_metrics) <= {"num-kept", "num-needed", "num-candidates", "num-accepted", "audit-threshold",
                                  "generator-cached", "realism-mmd2", "realism-threshold", "realism-passed",
                                  "realism-precision", "realism-recall", "nn-distance-ratio"}  # set-level numbers
    # The generator stays in the site's cache (never in a reply), and a second request reuses it.
    assert synth_metrics["generator-cached"] == 0
    assert len(list((tmp_path / "site-cache" / "center1").glob("generator-*.safetensors"))) == 1
    again = call_client(client_app.app, "query.synth", RecordDict({"config": ConfigRecord({})}), 0, synth_settings)
    assert dict(again.content["metrics"])["generator-cached"] == 1
    assert len(checked) == 5
    for reply in (info, train, evaluation, synth, again):
        for record in reply.content.values():
            if isinstance(record, MetricRecord):
                # At most the held-out segmentation reply's 16 named aggregates (the set checked above).
                assert all(isinstance(v, (int, float)) for v in record.values()) and len(record) <= 16
                assert not any("center1-" in key for key in record)  # no case id in any key

    # Classifier ROIs cut by the federation's segmentation model (cls-masks = segmentation): the
    # message carries the model's weights; markers fed to the classifier are measured on its
    # masks, the auxiliary targets on the reference masks; a case it misses falls back to its
    # reference mask (here: an untrained model), so no training case is lost.
    site = Site("center1", tiny / "center1", settings)
    _, fit_reference, _ = site.roi_dataset()
    grown = site.roi_dataset(lambda sample: ndimage.binary_dilation(sample.mask, iterations=2).astype(np.uint8))[0]
    assert all(grown.markers[k]["volume_ml"] > 1.5 * grown.reference_markers[k]["volume_ml"] for k in grown.markers)
    assert len(site.roi_dataset(lambda sample: np.zeros_like(sample.mask))[1]) == len(fit_reference)
    cls_initial = ArrayRecord(cls_model(site).state_dict())
    seg_cut = call_client(client_app.app, "train.cls", RecordDict(
        {"arrays": cls_initial, "seg-arrays": weights,
         "config": ConfigRecord({"server-round": 1, "use-synthetic": False})}), 0, settings)
    assert set(seg_cut.content.keys()) == {"arrays", "metrics"}
    assert dict(seg_cut.content["metrics"])["num-examples"] == len(fit_reference)

    # Classifier under client-side DP-SGD: weights plus the site's epsilon, composed over rounds.
    dp_settings = settings_for(tiny, tmp_path / "dp", dp_sgd_noise_multiplier=1.0, dp_sgd_delta=1e-3)
    site = Site("center1", tiny / "center1", dp_settings)
    cls_weights = ArrayRecord(cls_model(site).state_dict())
    state = RecordDict()
    epsilons = []
    for server_round in (1, 2):
        trained = call_client(client_app.app, "train.cls", RecordDict(
            {"arrays": cls_weights, "config": ConfigRecord({"server-round": server_round})}), 0, dp_settings, state)
        metrics = dict(trained.content["metrics"])
        assert set(trained.content.keys()) == {"arrays", "metrics"} and metrics["num-synthetic"] == 0
        assert metrics["dp-delta"] == 1e-3 and 0 < metrics["dp-epsilon"] < float("inf")
        epsilons.append(metrics["dp-epsilon"])
    assert epsilons[1] > epsilons[0]  # the second round's epsilon covers both rounds
    # Several arms scored together on the same cases: aggregates per arm, paired test on site.
    other = trained.content["arrays"]
    scored = call_client(client_app.app, "evaluate.cls", RecordDict(
        {"arm.federated": cls_weights, "arm.local-center1": other,
         "config": ConfigRecord({"split": "all", "federated.threshold": 0.5})}), 0, dp_settings, state)
    assert set(scored.content.keys()) == {"metrics", "arm.federated", "arm.local-center1"}
    assert dict(scored.content["metrics"])["num-examples"] == 10
    local = dict(scored.content["arm.local-center1"])
    assert 0 <= local["auc-lo"] <= local["auc"] <= local["auc-hi"] <= 1 and 0 <= local["vs-federated-p"] <= 1
    assert "sensitivity" in dict(scored.content["arm.federated"]) and "sensitivity" not in local
    assert all(len(r) <= 64 for r in scored.content.metric_records.values())


# ------------------------------------------------------------------------------------------
# Whole simulated federations (real SuperLink, simulation engine, Ray)


def processes_naming(*needles: str) -> dict[int, bytes]:
    """Running processes whose command line contains any of `needles`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(n.encode() in cmd for n in needles):
                found[int(proc.name)] = cmd
    return found


def flower_processes() -> list[int]:
    return list(processes_naming("flower-superlink", "flwr-simulation", "ClientAppActor"))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["starting", "running"])
def test_sigterm_stops_a_simulation_and_everything_it_started(tiny, tmp_path, when):
    """A job scheduler's SIGTERM while the SuperLink starts, or in the middle of a federation: hemex
    stops its SuperLink, `flwr run` and the simulation runtime, says so in one line and exits 143;
    nothing of the run is left."""
    import time

    out = tmp_path / "run"
    hemex = subprocess.Popen([sys.executable, "-m", "common.cli", "simulate", "--data", str(tiny), "--train-centers",
                              "center1,center2,center3", "--test-centers", "center4,center5", "--out", str(out),
                              *STUDY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                             errors="replace")
    try:
        port, deadline = None, time.monotonic() + 240
        while time.monotonic() < deadline and hemex.poll() is None:
            for cmd in processes_naming(str(out)).values():
                if b"flower-superlink" in cmd:
                    args = cmd.split(b"\0")
                    port = args[args.index(b"--port") + 1].decode()
            if port and (when == "starting" or any(b"flwr-simulation" in cmd for cmd in
                                                   processes_naming(f"127.0.0.1:{port}").values())):
                break  # the SuperLink process exists / the simulation runtime is up: the run is under way
            time.sleep(0.5 if when == "running" else 0.05)
        assert port and hemex.poll() is None, "the federation never started"
        hemex.terminate()
        _, stderr = hemex.communicate(timeout=120)
    finally:
        if hemex.poll() is None:
            hemex.kill()
    assert hemex.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "hemex simulate: terminated (SIGTERM)"
    left = processes_naming(str(out), f"127.0.0.1:{port}")
    assert not left, [cmd.replace(b"\0", b" ")[:200] for cmd in left.values()]


# The tiny cohort's sites validate on 1-3 cases: aggregates that small are withheld by default.
STUDY = ["--profile", "smoke", "--seg-rounds", "2", "--cls-rounds", "1", "--synthesis", "1:2", "--seed", "0",
         "--min-aggregate-cases", "1"]


@pytest.mark.slow
def test_a_site_with_one_class_or_too_few_he_cases_takes_part_without_failing(tiny, tmp_path):
    """A small hospital with no HE case: synthesis is skipped with its reason, a federated round
    returns the global weights with weight 0 and the same metric keys as a trained site (Flower
    aggregates only uniform replies), its one-class validation has AUC NaN with the same keys,
    and a local-only arm there fails (sanitized: class, source line, digest) instead of reporting an
    untrained model."""
    import csv

    import client.app as client_app
    from client.classifier import cls_model
    from client.site import Site

    data = Path(shutil.copytree(tiny, tmp_path / "data"))
    table = data / "center1" / "cases.csv"
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    with table.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(dict(r, he="0") for r in rows)
    settings = settings_for(data, tmp_path / "out", cls_rounds=1, synthesis="1:2", min_aggregate_cases=1)
    synth = call_client(client_app.app, "query.synth", RecordDict({"config": ConfigRecord({})}), 0, settings)
    assert dict(synth.content["metrics"]) == {"num-kept": 0, "num-needed": 0, "skipped-he-cases": 0}

    initial = ArrayRecord(cls_model(Site("center1", data / "center1", settings)).state_dict())
    round_one = RecordDict({"arrays": initial, "config": ConfigRecord({"server-round": 1, "use-synthetic": False})})
    skipped = call_client(client_app.app, "train.cls", round_one, 0, settings)
    trained = call_client(client_app.app, "train.cls", round_one, 1, settings)
    skipped_metrics, trained_metrics = dict(skipped.content["metrics"]), dict(trained.content["metrics"])
    assert set(skipped_metrics) == set(trained_metrics)
    assert skipped_metrics["num-examples"] == 0 and np.isnan(skipped_metrics["train-loss"])
    assert trained_metrics["num-examples"] > 0
    returned = skipped.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(returned[k], v) for k, v in initial.to_torch_state_dict().items())

    validation = RecordDict({"arrays": initial, "config": ConfigRecord({"split": "validation"})})
    one_class = dict(call_client(client_app.app, "evaluate.cls", validation, 0, settings).content["metrics"])
    two_class = dict(call_client(client_app.app, "evaluate.cls", validation, 1, settings).content["metrics"])
    assert set(one_class) == set(two_class) and np.isnan(one_class["auc"])

    local = RecordDict({"arrays": initial, "config": ConfigRecord({"epochs": 1, "arm": "local-center1"})})
    failed = call_client(client_app.app, "train.cls_alone", local, 0, settings)  # the site's log: "needs both classes"
    assert failed.error.reason.startswith("DataError: site error in train.cls_alone at training.py:")  # common/training/classification/training.py


@pytest.mark.slow
def test_held_out_site_scores_every_arm_on_the_segmentation_rois(tiny, tmp_path, monkeypatch):
    """The evaluation a held-out centre runs: ROIs and markers cut on the federated segmentation's
    masks (here a stand-in: thresholded blood density, main lesion kept, since a smoke-trained model
    finds nothing), every arm scored on the same cases, only aggregates and a paired test returned."""
    import client.app as client_app
    import client.classifier as client_classifier
    from client.site import Site
    from common.inference.postprocess import keep_main_lesion

    def blood_threshold(site, seg_weights):
        return lambda s: keep_main_lesion(((s.hu >= 50) & (s.hu <= 90)).astype(np.uint8), s.spacing, 20.0)

    monkeypatch.setattr(client_classifier, "segmentation_mask_provider", blood_threshold)
    settings = settings_for(tiny, tmp_path, cls_rounds=1)
    state = client_classifier.cls_model(Site("center4", tiny / "center4", settings)).state_dict()
    generator = torch.Generator().manual_seed(1)
    other = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in state.items()}
    scored = call_client(client_app.app, "evaluate.cls", RecordDict(
        {"arm.federated": ArrayRecord(state), "arm.local-center1": ArrayRecord(other), "seg-arrays": ArrayRecord(state),
         "config": ConfigRecord({"split": "all", "mask-source": "segmentation", "federated.threshold": 0.5,
                                 "local-center1.threshold": 0.5})}), 3, settings)
    assert set(scored.content.keys()) == {"metrics", "arm.federated", "arm.local-center1"}
    counts = dict(scored.content["metrics"])
    assert counts["num-examples"] + counts["num-excluded"] == 10 and counts["num-examples"] >= 5
    federated, local = dict(scored.content["arm.federated"]), dict(scored.content["arm.local-center1"])
    assert 0.0 <= federated["brier"] <= 1.0 and 0.0 <= local["specificity"] <= 1.0
    assert 0 < counts["num-he"] < counts["num-examples"]  # both classes: AUC and the paired test are defined
    assert 0.0 <= federated["auc"] <= 1.0 and 0.0 <= local["vs-federated-p"] <= 1.0
    assert sum(v for k, v in federated.items() if k.startswith("hist-")) == counts["num-examples"]


class BloodDensity(torch.nn.Module):
    """A stand-in segmentation model that finds blood: hematoma logit rises with the first HU window."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(12.0))

    def forward(self, x):
        z = self.scale * (x[:, :1] - 0.65)
        return torch.cat([-z, z], dim=1)


@pytest.mark.slow
def test_a_held_out_centre_cuts_its_rois_on_the_masks_its_segmentation_scoring_delivered(tiny, tmp_path,
                                                                                       monkeypatch):
    """evaluate.seg at a held-out centre keeps each delivered mask on the site's disk (keyed by the
    weights, settings and case files); the classifier's mask provider then reads them back without
    building the segmentation model, and they equal the masks it predicts from nothing."""
    import client.app as client_app
    import client.segmentation as client_segmentation
    from client.classifier import segmentation_mask_provider
    from client.site import Site
    from common.data.preprocess import load_case

    monkeypatch.setattr(client_segmentation, "seg_model", lambda site: BloodDensity())
    settings = settings_for(tiny, tmp_path / "run", min_aggregate_cases=1)
    weights = ArrayRecord(BloodDensity().state_dict())
    scored = call_client(client_app.app, "evaluate.seg", RecordDict(
        {"arrays": weights, "config": ConfigRecord({"split": "all"})}), 3, settings)
    assert 0.0 < dict(scored.content["metrics"])["dice-native"] <= 1.0
    site = Site("center4", tiny / "center4", settings)
    stored = sorted(site.delivered_masks(BloodDensity().state_dict()).dir.glob("*.npz"))
    assert len(stored) == 10

    def not_built(site):
        raise AssertionError("the segmentation model was built although the masks were stored")

    monkeypatch.setattr(client_segmentation, "seg_model", not_built)
    cached = segmentation_mask_provider(site, weights)
    samples = [load_case(case, spacing=site.cls.spacing, with_mask=False) for case in site.cases]
    masks = [cached(sample) for sample in samples]
    assert sum(int(m.any()) for m in masks) >= 5

    monkeypatch.setattr(client_segmentation, "seg_model", lambda site: BloodDensity())
    fresh_site = Site("center4", tiny / "center4", settings, cache_dir=tmp_path / "empty-cache")
    predicted = segmentation_mask_provider(fresh_site, weights)
    for sample, mask in zip(samples, masks):
        np.testing.assert_array_equal(predicted(sample), mask, err_msg=sample.case_id)
    # Other weights: another store, nothing reused.
    other = BloodDensity()
    other.scale.data.fill_(6.0)
    assert site.delivered_masks(other.state_dict()).dir != site.delivered_masks(BloodDensity().state_dict()).dir
    assert not site.delivered_masks(other.state_dict()).dir.exists()


def test_error_summary_finds_the_site_error_inside_the_runtime_traceback():
    from server.grid import error_summary

    reason = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
              "(pid=1)\n  File \"client/app.py\", line 212, in train_cls\n    raise DataError(\n"
              "common.errors.DataError: training set: needs both classes, got 0 HE and 16 non-HE slices\n\n"
              "The above exception was the direct cause of the following exception:\n"
              "flwr.clientapp.client_app.ClientAppException: \nException ClientAppException occurred.")
    assert error_summary(reason) == "DataError: training set: needs both classes, got 0 HE and 16 non-HE slices"
    assert error_summary("no reply before the round timeout") == "no reply before the round timeout"


@pytest.fixture(scope="module")
def study(tiny_cohort, tmp_path_factory):
    """The main job, `hemex simulate`, end to end on the tiny cohort (smoke budgets): every arm
    through one real simulated federation. Its federation report serves the tests below."""
    out = tmp_path_factory.mktemp("study") / "run"
    done = subprocess.run([sys.executable, "-m", "common.cli", "simulate", "--data", str(tiny_cohort),
                           "--train-centers", "center1,center2,center3", "--test-centers", "center4,center5",
                           "--out", str(out), *STUDY], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "federation" / "federation.json").read_text(encoding="utf-8"))
    return out, report, done.stdout


@pytest.fixture(scope="module")
def federation(study):
    out, report, _ = study
    return out / "federation", report


@pytest.mark.slow
def test_simulated_federation_is_leave_center_out_and_cleans_up(federation):
    out, report = federation
    rounds = report["stages"]["seg"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert set(entry["train"]["sent_bytes"]) == {"center1", "center2", "center3"}  # held-out never train
        assert set(entry["evaluate"]["sent_bytes"]) == {"center1", "center2", "center3"}
        assert entry["train"]["errors"] == {}
        model_bytes = report["model_bytes"]["seg"]
        assert all(b == model_bytes for b in entry["train"]["sent_bytes"].values())
    final = report["stages"]["seg"]["final"]
    assert set(final) == set(CENTERS)
    assert final["center4"]["num-examples"] == 10 and final["center5"]["num-examples"] == 10
    assert (out / "model" / "segmentation" / "model.safetensors").is_file()
    assert set(report["stages"]["synth"]) == {"center1", "center2", "center3"}
    assert all("error" not in m and m["num-kept"] <= m["num-needed"] for m in report["stages"]["synth"].values())
    cls = report["stages"]["cls"]
    assert [set(r["train"]["sent_bytes"]) for r in cls["rounds"]] == [{"center1", "center2", "center3"}]
    assert cls["operating_point"]["n"] > 0 and 0.0 < cls["operating_point"]["threshold"] < 1.0
    for center in ("center4", "center5"):  # held out: scored with ROIs from the federated segmentation
        # Smoke budgets leave the segmentation untrained: its blobs rarely pass the blood-density
        # filter, so few or no cases get ROIs (every case is accounted for; scoring itself is
        # tested with a stand-in segmentation in test_held_out_site_scores_every_arm_...).
        assert cls["final"][center]["num-examples"] + cls["final"][center]["num-excluded"] == 10
        if cls["final"][center]["num-examples"]:
            assert 0.0 <= cls["final"][center]["brier"] <= 1.0
    assert (out / "model" / "classifier" / "classifier.safetensors").is_file()
    # The other arms: the no-synthesis rounds also train only the training centres; local-only
    # and centralized models train alone on their own node (the pooled node = the three centres).
    assert [set(r["train"]["sent_bytes"]) for r in report["stages"]["cls-no-synthesis"]["rounds"]] == \
        [{"center1", "center2", "center3"}]
    alone = report["stages"]["cls-alone"]
    assert set(alone) == {"local-center1", "local-center2", "local-center3", "centralized"}
    assert alone["centralized"]["num-examples"] == sum(alone[f"local-center{i}"]["num-examples"] for i in (1, 2, 3))
    assert alone["centralized"]["num-synthetic"] == 0 and alone["local-center1"]["num-synthetic"] > 0
    from common.inference.bundle import load_bundle

    bundle = load_bundle(out / "model")  # the bundle `hemex predict` loads: every checksum verifies
    assert bundle.preprocessing["slice_thickness_mm"] == [5.0, 5.5]  # the training centres' slices (tiny cohort)
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["run_config"]["seed"] == 0
    assert flower_processes() == []


@pytest.mark.slow
def test_resume_after_a_stop_reaches_the_same_weights_and_metrics(federation, tmp_path):
    from simulation.run import run_local_federation

    out, report = federation
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    # The run "stopped" after segmentation round 1: keep only round 1's checkpoint.
    shutil.copy(out / "checkpoints" / "seg-round001.safetensors", resumed / "checkpoints")
    state = json.loads((out / "checkpoints" / "seg.json").read_text(encoding="utf-8"))
    state.update(round=1, weights="seg-round001.safetensors", history=state["history"][:1])
    (resumed / "checkpoints" / "seg.json").write_text(json.dumps(state), encoding="utf-8")
    settings = FederationSettings.from_run_config({**report["settings"], "out-dir": str(resumed)})
    again = run_local_federation(settings)
    assert again["stages"]["seg"]["resumed_after"] == 1
    for name in ("seg-round002", "cls-round001", "cls-local-center2-round001", "cls-centralized-round001"):
        expected = load_file(str(out / "checkpoints" / f"{name}.safetensors"))
        actual = load_file(str(resumed / "checkpoints" / f"{name}.safetensors"))
        assert set(expected) == set(actual)
        for key in expected:
            np.testing.assert_allclose(actual[key].numpy(), expected[key].numpy(), atol=1e-5, err_msg=f"{name} {key}")
    # Same seed, same metrics: every arm's external scores are reproduced.
    for arm, record in report["stages"]["cls"]["arms"].items():
        for center, metrics in record["external"].items():
            redo = again["stages"]["cls"]["arms"][arm]["external"][center]
            for key in ("auc", "brier", "num-examples"):
                if key in metrics:
                    assert redo[key] == pytest.approx(metrics[key], abs=1e-6), (arm, center, key)


@pytest.mark.slow
def test_simulate_writes_schema_valid_metrics_and_a_report(study, tiny):
    from simulation.metrics import validate

    out, report, stdout = study
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    validate(metrics)
    assert set(metrics["arms"]) == {"federated", "no-synthesis", "local-center1", "local-center2", "local-center3",
                                    "centralized", "volume-only", "markers-only"}
    # The baseline arms were fitted through the real federation, at the training sites only.
    baselines = report["stages"]["baselines"]
    assert baselines["sites"] == ["center1", "center2", "center3"] and not baselines["rejected"]
    assert all(fit["converged"] for fit in baselines["arms"].values())
    truth = {}
    for line in (tiny / "truth.csv").read_text(encoding="utf-8").splitlines()[1:]:
        center = line.split(",")[0]
        truth[center] = truth.get(center, 0) + 1
    for arm, slot in metrics["arms"].items():
        assert set(slot["centers"]) == {"center4", "center5"}
        for center, entry in slot["centers"].items():
            assert entry["n"] + report["stages"]["cls"]["final"][center]["num-excluded"] == truth[center] == 10
            assert entry["n_he"] <= 2 and 0.0 <= entry["oracle_auc"] <= 1.0
            # Paired comparisons exist for every other arm wherever an AUC is defined at the centre.
            assert ("vs_federated" in entry) == (arm != "federated" and entry["auc"] is not None)
        assert slot["pooled"]["n"] == sum(e["n"] for e in slot["centers"].values())
    fed = metrics["arms"]["federated"]["centers"]["center4"]
    final = report["stages"]["cls"]["final"]["center4"]  # what the site returned for the federated arm
    assert fed["n"] == final["num-examples"]
    if "auc" in final:  # the site scored the arm: the study reports exactly that AUC
        assert fed["auc"] is not None and fed["auc"] == pytest.approx(final["auc"])
    else:  # one class or withheld at the site: the study must not invent an AUC
        assert fed["auc"] is None
    assert fed["brier"] == final.get("brier")
    assert fed["dice"] == pytest.approx(report["stages"]["seg"]["final"]["center4"]["dice"])
    # Held-out centres also score the delivered mask on each scan's own grid (refined boundary).
    assert fed["dice_native"] == pytest.approx(report["stages"]["seg"]["final"]["center4"]["dice-native"])
    assert 0.0 <= fed["dice_native"] <= 1.0 and fed["volume_mae_native_ml"] >= 0.0
    assert "dice-native" not in report["stages"]["seg"]["final"]["center1"]  # training centres: validation only
    for name in ("report.md", "report.html", "roc_external.png", "calibration_external.png", "dice.png",
                 "learning_curves.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## Pooled external result" in markdown and "local-center2" in markdown and "quality.png" in markdown
    assert "| markers-only |" in markdown and "| volume-only |" in markdown
    assert "<table>" in (out / "report.html").read_text(encoding="utf-8")
    assert "external AUC per arm" in stdout and "markers-only" in stdout  # the terminal summary


def test_pooled_external_auc_is_the_inverse_variance_combination():
    from simulation.metrics import fixed_effect, pooled_entry

    est, se = fixed_effect([0.7, 0.8], [0.1, 0.05])
    assert est == pytest.approx((0.7 / 0.01 + 0.8 / 0.0025) / (1 / 0.01 + 1 / 0.0025))
    assert se == pytest.approx((1 / 0.01 + 1 / 0.0025) ** -0.5)
    assert fixed_effect([0.7, None], [0.1, None]) == pytest.approx((0.7, 0.1))  # a one-class centre is left out
    assert fixed_effect([0.7, 0.0], [0.1, 0.0]) is None  # AUC 0 with zero variance: not silently dropped
    centers = {
        "a": {"n": 10, "n_he": 2, "auc": 0.7, "auc_se": 0.1, "sensitivity": 0.5, "specificity": 0.75, "brier": 0.2,
              "dice": 0.6, "volume_mae_ml": 3.0, "n_seg": 10, "vs_federated": {"diff": 0.1, "se": 0.1, "p": 0.3}},
        "b": {"n": 30, "n_he": 6, "auc": 0.8, "auc_se": 0.05, "sensitivity": 1.0, "specificity": 0.5, "brier": 0.1,
              "dice": 0.8, "volume_mae_ml": 1.0, "n_seg": 30, "vs_federated": {"diff": -0.1, "se": 0.1, "p": 0.3}},
    }
    pooled = pooled_entry(centers, {})
    assert pooled["auc"] == pytest.approx(est)
    assert pooled["sensitivity"] == pytest.approx((0.5 * 2 + 1.0 * 6) / 8)
    assert pooled["specificity"] == pytest.approx((0.75 * 8 + 0.5 * 24) / 32)
    assert pooled["dice"] == pytest.approx((0.6 * 10 + 0.8 * 30) / 40)
    assert pooled["vs_federated"]["diff"] == pytest.approx(0.0) and pooled["vs_federated"]["p"] == pytest.approx(1.0)


def test_metrics_schema_rejects_an_impossible_auc():
    from simulation.metrics import validate

    entry = {"n": 1, "n_he": 0, "auc": 1.5, "auc_ci": None, "dice": None, "volume_mae_ml": None,
             "sensitivity": None, "specificity": None, "brier": None}
    metrics = {"format": "hemex-study-metrics/1", "seed": 0, "cohort": None, "folds": [{"train": ["a"], "test": ["b"]}],
               "test_centers": ["b"], "arms": {"federated": {"description": "", "shares": [], "centers": {"b": entry},
                                                             "pooled": {**entry, "auc": 0.5}}}}
    with pytest.raises(ValueError, match="arms/federated/centers/b/auc"):
        validate(metrics)
    entry["auc"] = 0.5
    validate(metrics)


def test_traffic_separates_flower_overhead_from_site_work():
    from simulation.metrics import compute_bound_s, traffic

    assert compute_bound_s([10.0, 10.0, 10.0], workers=2) == 15.0  # three sites in two slots
    assert compute_bound_s([30.0, 1.0, 1.0], workers=2) == 30.0
    round_entry = {"round": 1, "train": {"sent_bytes": {"a": 2**20, "b": 2**20}, "wall_s": 20.0,
                                         "metrics": {"a": {"handler-seconds": 16.0}, "b": {"handler-seconds": 4.0}}}}
    report = {"model_bytes": {"seg": 2**20}, "stages": {"seg": {"rounds": [round_entry]}, "synth": {"a": {}}}}
    assert traffic(report) == {"seg": {"rounds": 1, "model_mib": 1.0, "sent_mib_per_site_per_round": 1.0,
                                       "round_wall_s": 20.0, "overhead_share": pytest.approx(0.2)}}


@pytest.mark.slow
def test_leave_one_out_metrics_and_report_handle_arms_missing_in_a_fold(study, tiny, tmp_path):
    """Leave-one-out folds have different local-<c> arms (none for the held-out c): the study's
    metrics, report and summary must list each arm only where it was scored."""
    import copy

    from rich.console import Console

    from simulation.metrics import study_metrics, validate
    from simulation.report import write_report
    from simulation.study import print_study_summary

    _, report, _ = study
    first, second = copy.deepcopy(report), copy.deepcopy(report)
    first["settings"]["test-centers"], second["settings"]["test-centers"] = "center4", "center5"
    del second["stages"]["cls"]["arms"]["local-center1"]
    metrics = study_metrics([first, second], tiny, 0, "tiny")
    validate(metrics)
    assert list(metrics["arms"])[:2] == ["federated", "no-synthesis"]
    assert list(metrics["arms"])[-3:] == ["centralized", "volume-only", "markers-only"]
    assert set(metrics["arms"]["local-center1"]["centers"]) == {"center4"}
    assert set(metrics["arms"]["federated"]["centers"]) == {"center4", "center5"}
    markdown, _ = write_report(metrics, [first, second], tmp_path, 1.0)
    rows = [line for line in markdown.read_text(encoding="utf-8").splitlines() if "| local-center1 |" in line]
    assert any(line.startswith("| center4 |") for line in rows)
    assert not any(line.startswith("| center5 |") for line in rows)
    console = Console(record=True, width=160)
    print_study_summary(metrics, console)
    assert "local-center1" in console.export_text()


def test_leave_one_out_holds_out_each_centre_once(tmp_path):
    from simulation.study import folds_of

    settings = FederationSettings(data_root=str(tmp_path), centers=("a", "b", "c"), test_centers=(),
                                  out_dir=str(tmp_path / "federation"))
    folds = folds_of(settings, leave_one_out=True)
    assert [name for name, _ in folds] == ["holdout-a", "holdout-b", "holdout-c"]
    for (name, fold), held in zip(folds, "abc"):
        assert fold.test_centers == (held,) and held not in fold.train_centers and len(fold.train_centers) == 2
        assert fold.out_dir == str(tmp_path / name / "federation")  # beside the single-fold federation/
    assert folds_of(settings, leave_one_out=False) == [("", settings)]


@pytest.mark.parametrize("command", ["simulate", "federate"])
def test_a_missing_data_root_or_misspelled_centre_fails_before_any_flower_process(tmp_path, capsys, command):
    import time

    from common.cli import main

    data = tmp_path / "data"
    for center in ("H1", "H2", "H3", "H4"):
        (data / center).mkdir(parents=True)
    out = tmp_path / "out"
    cases = [(["--data", str(tmp_path / "nonexistent"), "--train-centers", "H1,H2", "--test-centers", "H3"],
              f"{tmp_path / 'nonexistent'}: data root is not a folder"),
             (["--data", str(data), "--train-centers", "H1,H2,HX", "--test-centers", "H4"],
              f"--train-centers: unknown centre(s) HX in {data}; available: H1, H2, H3, H4"),
             (["--data", str(data), "--train-centers", "H1,H2", "--test-centers", "H5"],
              f"--test-centers: unknown centre(s) H5 in {data}; available: H1, H2, H3, H4")]
    if command == "simulate":  # leave-one-out needs no --test-centers
        cases.append((["--data", str(data), "--train-centers", "HX,H1,H2", "--leave-one-out"],
                      f"--train-centers: unknown centre(s) HX in {data}; available: H1, H2, H3, H4"))
    for args, message in cases:
        started = time.monotonic()
        assert main([command, *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"hemex {command}: error: {message}\n"
        assert time.monotonic() - started < 5
        assert not out.exists()  # no run folder, no Flower home: nothing was started


def test_every_training_site_of_a_round_runs_at_once_on_a_small_machine():
    from simulation.run import ray_cpus

    assert ray_cpus(2, 3) == 3  # 3 sites on 2 cores: all at once, not 2 + 1 with a core idle every round
    assert ray_cpus(2, 2) == 2 and ray_cpus(8, 3) == 8  # enough cores: unchanged
    assert ray_cpus(2, 9) == 4  # never more than twice the real count
