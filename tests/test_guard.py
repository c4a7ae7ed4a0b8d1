"""Server-side reply validation, the round quorum and robust aggregation, driven through Flower's
own `Strategy.start` over a stand-in Grid whose sites answer with real Flower messages."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from common.federation.records import PrivacyViolation, check_reply, weights_problem
from fake_grid import PushPullGrid
from server.guard import GuardedStrategy, RunFailed, cap_weights, train_reply_problem

GLOBAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.array(5, np.int64)}


pytestmark = pytest.mark.usefixtures("task_identity")


def record(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def honest(delta: float, n: int = 10):
    """A site that adds `delta` to every float weight and reports `n` examples."""
    def train(received: dict) -> tuple[dict, dict]:
        out = {k: (v + delta).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in received.items()}
        return out, {"num-examples": n, "train-loss": 1.0}
    return train


class Sites(PushPullGrid):
    """A stand-in Grid: node i is centre `c{i}`; each site's function answers its train
    messages (None: an error reply); evaluate messages get a plain metric reply."""

    def __init__(self, behaviours: dict[int, object], eval_examples: int = 5):
        self.behaviours = behaviours
        self.eval_examples = eval_examples

    def get_node_ids(self):
        return list(self.behaviours)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if message.metadata.message_type.startswith("evaluate"):
                replies.append(Message(RecordDict({"metrics": MetricRecord(
                    {"num-examples": self.eval_examples, "dice": 0.5})}), reply_to=message))
                continue
            behaviour = self.behaviours[node]
            if behaviour is None:
                replies.append(Message(Error(code=1, reason="DataError: scans unreadable"), reply_to=message))
                continue
            received = {k: v.numpy() for k, v in message.content["arrays"].items()}
            arrays, metrics = behaviour(received)
            content = RecordDict({"arrays": arrays if isinstance(arrays, ArrayRecord) else record(arrays),
                                  "metrics": MetricRecord(metrics)})
            replies.append(Message(content, reply_to=message))
        return replies


def guarded(inner, n_sites: int, declared: int = 20, **kwargs) -> GuardedStrategy:
    options = dict(min_valid=2, max_failed_rounds=1, max_weight_ratio=2.0, stage="seg", log=lambda _t: None)
    options.update(kwargs)
    return GuardedStrategy(inner, {i: f"c{i}" for i in range(1, n_sites + 1)},
                           {f"c{i}": declared for i in range(1, n_sites + 1)}, **options)


def fedavg(n: int) -> FedAvg:
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                  min_available_nodes=n)


def run(strategy, sites: Sites, rounds: int = 1) -> dict[str, np.ndarray]:
    result = strategy.start(grid=sites, initial_arrays=record(GLOBAL), num_rounds=rounds, timeout=10,
                            train_config=ConfigRecord({}), evaluate_config=ConfigRecord({}))
    arrays = result.arrays if result.arrays else record(GLOBAL)  # empty: no round aggregated
    return {k: v.numpy() for k, v in arrays.items()}


# ------------------------------------------------------------------------------------------
# One reply


@pytest.mark.parametrize("change, reason", [
    (lambda a, m: a.update(w=np.zeros((32, 256, 256), np.float32)), "array 'w' is float32 [32, 256, 256], "
                                                                     "the model's is float32 [4, 3]"),
    (lambda a, m: a.update(w=np.zeros((4, 3), np.float64)), "array 'w' is float64 [4, 3]"),
    (lambda a, m: a.pop("b"), "1 missing, 0 unexpected key(s) (e.g. missing 'b')"),
    (lambda a, m: a.update({"case-017-scan": np.zeros(3, np.float32)}), "0 missing, 1 unexpected key(s)"),
    (lambda a, m: a["w"].__setitem__((1, 1), np.nan), "1 array(s) hold NaN or infinite values (e.g. 'w')"),
    (lambda a, m: a["b"].__setitem__(0, np.inf), "hold NaN or infinite values (e.g. 'b')"),
    (lambda a, m: m.update({"num-examples": 0}), "num-examples 0: trained on no case this round"),
    (lambda a, m: m.update({"num-examples": 1_000_000_000}), "num-examples 1000000000 exceeds the 20 case(s)"),
    (lambda a, m: m.update({"num-examples": 2.5}), "num-examples 2.5 is not an integer"),
    (lambda a, m: m.pop("num-examples"), "no num-examples"),
    (lambda a, m: m.update({"dice": [0.1, 0.9]}), "metrics hold lists"),
])
def test_a_bad_training_reply_gets_a_one_line_reason_without_its_content(change, reason):
    arrays = {k: v.copy() for k, v in GLOBAL.items()}
    metrics = {"num-examples": 10, "train-loss": 0.5}
    change(arrays, metrics)
    problem = train_reply_problem(RecordDict({"arrays": record(arrays), "metrics": MetricRecord(metrics)}),
                                  record(GLOBAL), declared_cases=20)
    assert problem is not None and reason in problem and "\n" not in problem
    assert "case-017" not in problem  # a site's own key names are never echoed
    good = RecordDict({"arrays": record(GLOBAL), "metrics": MetricRecord({"num-examples": 10})})
    assert train_reply_problem(good, record(GLOBAL), declared_cases=20) is None
    assert "declared no case count" in train_reply_problem(good, record(GLOBAL), declared_cases=None)


def test_reply_whitelist_checks_shapes_dtypes_and_value_types():
    model = {"w": torch.ones(3, 3), "b": torch.ones(3)}
    ok = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3, 3), "b": torch.zeros(3)}),
                     "metrics": MetricRecord({"num-examples": 4, "dice": 0.9}),
                     "info": ConfigRecord({"center": "hospital-A_2"})})
    assert check_reply(ok, model) is ok
    with pytest.raises(PrivacyViolation, match=r"'w' is float32 \[32, 256, 256\], the model's is float32 \[3, 3\]"):
        check_reply(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(32, 256, 256), "b": torch.zeros(3)})}),
                    model)
    with pytest.raises(PrivacyViolation, match="'b' is int64"):
        wrong = {"w": torch.zeros(3, 3), "b": torch.zeros(3, dtype=torch.long)}
        check_reply(RecordDict({"arrays": ArrayRecord(wrong)}), model)
    for config in ({"patient": "PAT-0017"}, {"center": "Doe^John 19700101"}, {"center": "x" * 65}):
        with pytest.raises(PrivacyViolation, match="may be a string"):
            check_reply(RecordDict({"info": ConfigRecord(config)}))
    with pytest.raises(PrivacyViolation, match="not a scalar"):
        check_reply(RecordDict({"info": ConfigRecord({"scan": b"\x00" * 64})}))
    # The check against received weights is type and shape only; finiteness is the server's call.
    nan = {"w": torch.full((3, 3), float("nan")), "b": torch.zeros(3)}
    assert weights_problem(ArrayRecord(nan), model, finite=False) is None
    assert "NaN" in weights_problem(ArrayRecord(nan), model)


# ------------------------------------------------------------------------------------------
# Rounds


def test_a_nan_site_is_dropped_by_centre_and_the_round_aggregates_the_rest():
    def poisoned(received):
        arrays, metrics = honest(1.0)(received)
        arrays["w"][0, 0] = np.nan
        return arrays, metrics

    sites = Sites({1: honest(1.0, n=10), 2: honest(3.0, n=30), 3: poisoned})
    strategy = guarded(fedavg(3), 3, declared=40)
    out = run(strategy, sites)
    np.testing.assert_allclose(out["w"], 2.5)  # (1 x 10 + 3 x 30) / 40: the two valid sites
    assert out["steps"].dtype == np.int64 and out["steps"] == 5  # int buffers keep their dtype
    assert strategy.rounds[1]["rejected"] == {"c3": "1 array(s) hold NaN or infinite values (e.g. 'w')"}
    assert strategy.rounds[1]["valid"] == ["c1", "c2"]
    # Without validation the NaN reaches the global model.
    assert np.isnan(run(fedavg(3), sites)["w"]).any()


def test_a_wrong_shape_first_reply_is_dropped_instead_of_crashing_the_server():
    def wrong(received):
        return {**received, "w": np.ones((8, 3), np.float32)}, {"num-examples": 10, "train-loss": 1.0}

    sites = Sites({1: wrong, 2: honest(1.0), 3: honest(2.0)})
    with pytest.raises(ValueError):  # Flower alone: the shapes do not broadcast
        run(fedavg(3), sites)
    strategy = guarded(fedavg(3), 3)
    np.testing.assert_allclose(run(strategy, sites)["w"], 1.5)
    assert "array 'w' is float32 [8, 3], the model's is float32 [4, 3]" == strategy.rounds[1]["rejected"]["c1"]


def test_inflated_num_examples_is_bounded_by_the_declared_cases_then_capped_at_twice_the_median():
    sites = Sites({1: honest(1.0, n=10), 2: honest(1.0, n=10), 3: honest(101.0, n=1_000_000)})
    # The site declared 20 cases at start-up: 1e6 examples is refused.
    strategy = guarded(fedavg(3), 3, declared=20)
    np.testing.assert_allclose(run(strategy, sites)["w"], 1.0)
    assert "exceeds the 20 case(s)" in strategy.rounds[1]["rejected"]["c3"]
    # It lied at start-up too: its weight is capped at 2 x the median (10), so it gets 20/40.
    strategy = guarded(fedavg(3), 3, declared=10**9)
    np.testing.assert_allclose(run(strategy, sites)["w"], 51.0)  # (1 x 10 + 1 x 10 + 101 x 20) / 40
    assert strategy.rounds[1]["clipped"] == {"c3": [1e6, 20.0]}
    np.testing.assert_allclose(run(fedavg(3), sites)["w"], 101.0, atol=0.01)  # unclipped: the liar's model
    assert cap_weights([10, 30, 60], 2.0) == [10.0, 30.0, 60.0] and cap_weights([5, 5, 900], 3.0) == [5, 5, 15]


def test_all_sites_with_zero_examples_fail_the_round_without_zero_division():
    sites = Sites({1: honest(1.0, n=0), 2: honest(1.0, n=0), 3: honest(1.0, n=0)})
    with pytest.raises(ZeroDivisionError):  # Flower alone
        run(fedavg(3), sites)
    strategy = guarded(fedavg(3), 3)
    out = run(strategy, sites)  # one failed round is tolerated (max-failed-rounds 1): weights kept
    np.testing.assert_array_equal(out["w"], GLOBAL["w"])
    assert strategy.rounds[1]["failed"].startswith("0 valid training replies of 3, min-valid-replies is 2: "
                                                   "c1 rejected (num-examples 0: trained on no case this round)")
    # One honest zero-example site (a one-class site) is left out; the others aggregate.
    mixed = guarded(fedavg(3), 3)
    np.testing.assert_allclose(run(mixed, Sites({1: honest(1.0), 2: honest(3.0), 3: honest(9.0, n=0)}))["w"], 2.0)
    # Evaluation replies with no examples are left out of the mean instead of dividing by zero.
    assert guarded(fedavg(3), 3).aggregate_evaluate(1, []) is None
    assert run(guarded(fedavg(2), 2), Sites({1: honest(1.0), 2: honest(1.0)}, eval_examples=0))["w"][0, 0] == 1.0


def test_too_many_failed_rounds_stop_the_run_with_a_one_line_reason():
    sites = Sites({1: None, 2: honest(1.0, n=0), 3: honest(1.0)})  # an error, an empty site, one valid
    strategy = guarded(fedavg(3), 3, max_failed_rounds=1)
    with pytest.raises(RunFailed) as err:
        run(strategy, sites, rounds=3)
    message = str(err.value)
    assert message == ("seg round 2: 1 valid training reply of 3, min-valid-replies is 2: c2 rejected "
                       "(num-examples 0: trained on no case this round); c1 failed; 2 failed round(s) "
                       "> max-failed-rounds 1")
    assert strategy.failed_rounds == 2 and strategy.aggregated_rounds == 0
    # The quorum never asks for more sites than train.
    assert guarded(fedavg(1), 1, min_valid=2).min_valid == 1


# ------------------------------------------------------------------------------------------
# The coordinator's run (server/run.py) over stand-in sites: quorum, bundle, missing centres


class SiteGrid(PushPullGrid):
    """A stand-in Grid for FederatedRun: node i is centre `names[i-1]` with 10 cases; `train`
    answers its train.seg messages (None: an error reply)."""

    def __init__(self, names: list[str], train):
        self.nodes = {i: name for i, name in enumerate(names, start=1)}
        self.train = train

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            center, kind = self.nodes[message.metadata.dst_node_id], message.metadata.message_type
            if kind == "query.info":
                content = RecordDict({"info": ConfigRecord({"center": center}),
                                      "metrics": MetricRecord({"num-cases": 10})})
            elif kind.startswith("evaluate"):
                content = RecordDict({"metrics": MetricRecord({"num-examples": 3, "dice": 0.5})})
            elif self.train(center) is None:
                replies.append(Message(Error(code=1, reason="DataError: scans unreadable"), reply_to=message))
                continue
            else:
                arrays = {k: v.numpy() + self.train(center) for k, v in message.content["arrays"].items()}
                content = RecordDict({"arrays": record(arrays),
                                      "metrics": MetricRecord({"num-examples": 8, "train-loss": 1.0})})
            replies.append(Message(content, reply_to=message))
        return replies


def federated_run(tmp_path, grid, **overrides):
    from common.federation.settings import FederationSettings
    from server.run import FederatedRun

    values = dict(centers=("h1", "h2", "h3", "h4"), test_centers=("h4",), profile="smoke", seg_rounds=2,
                  cls_rounds=0, synthesis="none", out_dir=str(tmp_path / "run"), node_wait_s=1.0)
    values.update(overrides)
    return FederatedRun(grid, FederationSettings(**values), log=lambda _t: None)


def test_a_run_whose_training_sites_all_fail_stops_and_writes_no_bundle(tmp_path):
    import json

    grid = SiteGrid(["h1", "h2", "h3", "h4"], train=lambda center: None)
    with pytest.raises(RunFailed) as err:
        federated_run(tmp_path, grid).execute()
    assert str(err.value) == ("seg round 2: 0 valid training replies of 3, min-valid-replies is 2: h1 failed; "
                              "h2 failed; h3 failed; 2 failed round(s) > max-failed-rounds 1")
    report = json.loads((tmp_path / "run" / "federation.json").read_text(encoding="utf-8"))
    assert report["failed"] == str(err.value)
    rounds = report["stages"]["seg"]["rounds"]
    assert [(r["round"], r["train"]["failed"][:29]) for r in rounds] == [(1, "0 valid training replies of 3"),
                                                                        (2, "0 valid training replies of 3")]
    assert set(rounds[0]["train"]["errors"]) == {"h1", "h2", "h3"}
    assert not (tmp_path / "run" / "model").exists()
    # One round, failed and tolerated: the stage would end on its initial weights, so the run stops.
    with pytest.raises(RunFailed, match="seg: none of its 1 round.s. aggregated a valid reply.*no model bundle"):
        federated_run(tmp_path, grid, seg_rounds=1, resume=False).execute()
    assert not (tmp_path / "run" / "model").exists()


def test_a_silent_held_out_centre_is_not_evaluated_and_the_run_goes_on(tmp_path):
    grid = SiteGrid(["h1", "h2", "h3"], train=lambda center: 0.01)  # h4 (held out) never connects
    report = federated_run(tmp_path, grid, seg_rounds=1).execute()
    assert report["centers"]["h4"] == {"not_evaluated": "not evaluated: no node answered for this centre at "
                                                        "start-up", "role": "test"}
    final = report["stages"]["seg"]["final"]
    assert final["h4"] == {"error": "not evaluated: no node answered for this centre at start-up"}
    assert final["h1"]["dice"] == 0.5
    assert (tmp_path / "run" / "model" / "segmentation").is_dir()
    # A silent training centre still stops the run before any round.
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="no node answered for centre.s. h3"):
        federated_run(tmp_path, SiteGrid(["h1", "h2", "h4"], train=lambda center: 0.01), seg_rounds=1).execute()


class RefusingGrid(SiteGrid):
    """Nodes named in `refusing` answer every message as a SuperNode that trusts only signed app
    bundles answers an unsigned one (Flower 1.42's reply, before any hemex code runs)."""

    def __init__(self, names, train, refusing):
        super().__init__(names, train)
        self.refusing = refusing

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        refused = [m for m in messages if self.nodes[m.metadata.dst_node_id] in self.refusing]
        replies = super().send_and_receive([m for m in messages if m not in refused], timeout)
        return replies + [Message(Error(code=ErrorCode.INVALID_FAB, reason="The FAB could not be verified."),
                                  reply_to=m) for m in refused]


def test_a_node_that_refuses_the_app_is_named_by_node_id_and_a_refusing_training_centre_stops_the_run(tmp_path):
    from common.errors import ConfigError

    # A node outside the run's centres refuses: recorded, and the run goes on without it.
    grid = RefusingGrid(["h1", "h2", "h3", "h4", "pinned"], lambda c: 0.01, {"pinned"})
    report = federated_run(tmp_path, grid, seg_rounds=1).execute()
    assert report["refused_nodes"] == {"5": "The FAB could not be verified."}
    assert set(report["stages"]["seg"]["rounds"][0]["train"]["sent_bytes"]) == {"h1", "h2", "h3"}
    # A training centre's node refuses: the run stops before any round, naming the node and why.
    with pytest.raises(ConfigError, match=r"no node answered for centre\(s\) h3 .*4 node\(s\) connected; "
                                          r"node 3: The FAB could not be verified\.\)$"):
        federated_run(tmp_path, RefusingGrid(["h1", "h2", "h3", "h4"], lambda c: 0.01, {"h3"}),
                      seg_rounds=1, resume=False).execute()


class Reconnecting(RefusingGrid):
    """h3's node connects only `delay` s after the grid is made (a site reconnecting after a
    restart), while a node outside the run that refuses the app is connected from the start."""

    def __init__(self, delay):
        super().__init__(["h1", "h2", "h3", "h4", "pinned"], lambda c: 0.01, {"pinned"})
        self.visible_from = time.monotonic() + delay

    def get_node_ids(self):
        return [n for n in self.nodes if self.nodes[n] != "h3" or time.monotonic() >= self.visible_from]


def test_discovery_waits_for_every_expected_centre_not_for_a_node_count(tmp_path):
    """Four nodes connected (three expected centres and a refusing outsider) are as many as the
    centres expected, but h3 is not among them: it must still be waited for, within node-wait-s."""
    report = federated_run(tmp_path, Reconnecting(1.5), seg_rounds=1, node_wait_s=5.0).execute()
    assert set(report["stages"]["seg"]["rounds"][0]["train"]["sent_bytes"]) == {"h1", "h2", "h3"}
    assert report["refused_nodes"] == {"5": "The FAB could not be verified."}


class LateStarter(SiteGrid):
    """h3 answers its first message (query.info) only `delay` s after it was sent (None: never),
    like a site still busy with an earlier run's stale work."""

    def __init__(self, names, train, delay):
        super().__init__(names, train)
        self.delay, self.sent = delay, {}

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.update({m.object_id: time.monotonic() for m in messages})
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        held, ready = [], []
        for reply in super().pull_messages(message_ids):
            waited = time.monotonic() - self.sent[reply.metadata.reply_to_message_id]
            late = "info" in reply.content and self.nodes[reply.metadata.src_node_id] == "h3" and (
                self.delay is None or waited < self.delay)
            (held if late else ready).append(reply)
        self._outbox = [*getattr(self, "_outbox", []), *held]
        return ready


def test_a_training_site_slow_to_answer_its_first_message_gets_node_wait_s_not_the_straggler_deadline(tmp_path):
    """Discovery: the others answer at once, h3 after 0.8 s, well past the straggler deadline
    (1 x 0 s + 0.1 s) but within node-wait-s (2 s): it takes part. A training site silent for
    node-wait-s still stops the run, after node-wait-s, not round-timeout-s."""
    settings = dict(seg_rounds=1, node_wait_s=2.0, straggler_factor=1.0, straggler_grace_s=0.1, round_timeout_s=60.0)
    report = federated_run(tmp_path, LateStarter(["h1", "h2", "h3", "h4"], lambda c: 0.01, 0.8), **settings).execute()
    assert report["centers"]["h3"]["role"] == "train" and "not_evaluated" not in report["centers"]["h3"]
    assert set(report["stages"]["seg"]["rounds"][0]["train"]["sent_bytes"]) == {"h1", "h2", "h3"}
    from common.errors import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError, match="no node answered for centre.s. h3"):
        federated_run(tmp_path, LateStarter(["h1", "h2", "h3", "h4"], lambda c: 0.01, None),
                      **{**settings, "resume": False}).execute()
    assert 1.9 <= time.monotonic() - started < 10.0


def test_the_run_reports_progress_as_events_that_a_follower_reads_as_they_come(tmp_path):
    from common.federation.progress import EVENTS_NAME, ProgressReader

    reader = ProgressReader(tmp_path / "run" / EVENTS_NAME)
    assert reader.read() == []  # nothing yet: no file
    run = federated_run(tmp_path, SiteGrid(["h1", "h2", "h3", "h4"], train=lambda center: 0.01), seg_rounds=2)
    run.execute()
    events = reader.read()
    assert [(e["step"], e["total"], e["stage"]) for e in events] == [(1, 3, "seg"), (2, 3, "seg"), (3, 3, "seg")]
    assert events[0]["text"].startswith("seg: round 1/2 done") and reader.read() == []
    with open(reader.path, "a", encoding="utf-8") as handle:  # a line being written is not read half
        handle.write('{"step": 4, "total"')
    assert reader.read() == []
    with open(reader.path, "a", encoding="utf-8") as handle:
        handle.write(': 4, "stage": "x", "text": "x: done", "time": 0}\n')
    assert [e["step"] for e in reader.read()] == [4]
    # A new run in the same folder starts the file again, and the follower from its start.
    federated_run(tmp_path, SiteGrid(["h1", "h2", "h3", "h4"], train=lambda center: 0.01), seg_rounds=1,
                  resume=False).execute()
    assert [(e["step"], e["total"]) for e in reader.read()] == [(1, 2), (2, 2)]


class LyingEvaluator(SiteGrid):
    """h4 (held out) claims a billion evaluated cases and an infinite Dice."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if self.nodes[reply.metadata.src_node_id] == "h4" and reply.metadata.message_type.startswith("evaluate"):
                reply.content["metrics"] = MetricRecord({"num-examples": 10**9, "dice": float("inf")})
        return replies


def test_a_lying_evaluation_reply_is_refused_and_the_run_goes_on(tmp_path):
    report = federated_run(tmp_path, LyingEvaluator(["h1", "h2", "h3", "h4"], train=lambda center: 0.01),
                           seg_rounds=1).execute()
    final = report["stages"]["seg"]["final"]
    assert final["h4"]["error"].startswith("reply refused: ") and "dice" not in final["h4"]
    assert final["h1"]["dice"] == 0.5 and (tmp_path / "run" / "model" / "segmentation").is_dir()


# ------------------------------------------------------------------------------------------
# Robust aggregation at 3-5 sites with planted outliers


def reply_from(node: int, arrays: dict, n: int = 10) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    return Message(RecordDict({"arrays": record(arrays), "metrics": MetricRecord({"num-examples": n})}),
                   reply_to=request)


def honest_updates(n: int, seed: int = 0) -> list[dict]:
    """Sites that agree on an update of +1 with per-site noise (sd 0.05), around a zero global model."""
    rng = np.random.default_rng(seed)
    return [{"w": (1.0 + 0.05 * rng.standard_normal((4, 3))).astype(np.float32),
             "b": (1.0 + 0.05 * rng.standard_normal(50)).astype(np.float32)} for _ in range(n)]


ATTACKS = {  # the global model is 0, so a site's weights are its update
    "scaled x100": lambda h: ({k: 100 * v for k, v in h.items()}, 10),
    "sign flip": lambda h: ({k: -v for k, v in h.items()}, 10),
    "NaN": lambda h: ({k: np.full_like(v, np.nan) for k, v in h.items()}, 10),
    "inflated num-examples": lambda h: ({k: 5 * v for k, v in h.items()}, 1_000_000),
}


def robust(name: str, n: int):
    from common.federation.settings import FederationSettings
    from server.strategies import build_strategy

    return build_strategy(FederationSettings(strategy=name), n)


@pytest.mark.parametrize("n_sites", [3, 4, 5])
@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_aggregate_stays_within_the_honest_sites_range_with_one_attacker(name, attack, n_sites):
    """The bound: every coordinate of the aggregate lies within the honest sites' range, so it
    is at most the honest spread (here <= 0.15) from the honest mean. FedAvg misses it by far."""
    honest_sites = honest_updates(n_sites - 1)
    poisoned, n_claimed = ATTACKS[attack](honest_updates(1, seed=99)[0])
    replies = [reply_from(i + 1, h) for i, h in enumerate(honest_sites)] + [reply_from(n_sites, poisoned, n_claimed)]
    arrays, _ = robust(name, n_sites).aggregate_train(1, replies)
    for key in ("w", "b"):
        stack = np.stack([h[key] for h in honest_sites])
        value = arrays[key].numpy()
        assert np.all(value >= stack.min(0) - 1e-6) and np.all(value <= stack.max(0) + 1e-6), (name, attack, key)
        spread = np.abs(stack - stack.mean(0)).max()
        assert spread <= 0.15 and np.abs(value - stack.mean(0)).max() <= spread
    replies = [reply_from(i + 1, h) for i, h in enumerate(honest_sites)] + [reply_from(n_sites, poisoned, n_claimed)]
    plain, _ = fedavg(n_sites).aggregate_train(1, replies)  # Flower's FedAvg, no validation
    error = np.abs(plain["b"].numpy() - np.stack([h["b"] for h in honest_sites]).mean(0)).max()
    assert not np.isfinite(error) or error > 0.3  # sign flip at 5 sites: ~2/5 of the update


def test_robust_aggregators_at_hemex_site_counts():
    from server.strategies import RobustKrum, assumed_attackers, robust_median, robust_trimmed_mean, trim_count

    assert [trim_count(n) for n in (2, 3, 4, 5, 10)] == [0, 1, 1, 1, 2]  # Flower's beta=0.2: 0 below 5 sites
    assert [assumed_attackers(n) for n in (3, 4, 5, 7)] == [1, 1, 1, 2]
    layers = [np.array([1.0, 1.0]), np.array([2.0, np.nan]), np.array([3.0, np.inf]), np.array([400.0, 2.0])]
    np.testing.assert_allclose(robust_median(layers), [2.5, 1.5])  # non-finite values ignored
    np.testing.assert_allclose(robust_trimmed_mean(layers), [2.5, 1.5])  # 1 per side; too few finite: median
    strategy = robust("krum", 3)
    assert isinstance(strategy, RobustKrum) and strategy.num_malicious_nodes == 1
    # Through the guard and Flower's start(): a x100 site at 3 sites moves the trimmed mean by
    # less than the honest spread, while FedAvg moves by ~33.
    sites = Sites({1: honest(1.00), 2: honest(1.04), 3: honest(100.0)})
    assert abs(run(guarded(robust("fedtrimmedavg", 3), 3), sites)["w"][0, 0] - 1.02) <= 0.02
    assert run(guarded(fedavg(3), 3), sites)["w"][0, 0] > 30


# ------------------------------------------------------------------------------------------
# Resume only under the settings that wrote the checkpoints


class CountingGrid(SiteGrid):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent += [m.metadata.message_type for m in messages]
        return super().send_and_receive(messages, timeout)


def test_a_resume_under_other_settings_is_refused_naming_the_keys(tmp_path):
    import json

    from common.errors import ConfigError

    def grid():
        return CountingGrid(["h1", "h2", "h3", "h4"], train=lambda center: 0.01)

    first = federated_run(tmp_path, grid(), seg_rounds=1).execute()
    assert first["stages"]["seg"]["resumed_after"] == 0
    # Another seed, or more rounds: one line naming what differs, before any site is contacted.
    for overrides, named in (({"seed": 1}, "seed 0 -> 1"), ({"seg_rounds": 2}, "seg-rounds 1 -> 2"),
                             ({"strategy": "fedmedian", "fedbn": True}, "fedbn False -> True, strategy 'fedavg' "
                                                                        "-> 'fedmedian'")):
        refused = grid()
        with pytest.raises(ConfigError) as err:
            federated_run(tmp_path, refused, seg_rounds=overrides.pop("seg_rounds", 1), **overrides).execute()
        assert str(err.value) == (f"{tmp_path / 'run' / 'checkpoints' / 'seg.json'}: cannot resume from this "
                                  f"checkpoint, settings differ: {named}; resume = false (hemex --fresh) starts "
                                  "afresh, or use another out-dir")
        assert refused.sent == []
    # Where things are and how long to wait may change: the run resumes after round 1.
    resumed = grid()
    again = federated_run(tmp_path, resumed, seg_rounds=1, node_wait_s=5.0, round_timeout_s=60.0).execute()
    assert again["stages"]["seg"]["resumed_after"] == 1 and "train.seg" not in resumed.sent
    # A profile whose contents changed (same name) is another run too.
    profile = tmp_path / "profiles" / "smoke.toml"
    profile.parent.mkdir()
    from common.config import CONFIG_DIR

    text = (CONFIG_DIR / "profiles" / "smoke.toml").read_text(encoding="utf-8")
    profile.write_text(text.replace("steps_per_epoch = 3", "steps_per_epoch = 4", 1), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"settings differ: profile.segmentation.steps_per_epoch 3 -> 4;"):
        federated_run(tmp_path, grid(), seg_rounds=1, profile=str(profile)).execute()
    # resume = false starts afresh and stamps the checkpoints with the new settings.
    stale = tmp_path / "run" / "checkpoints" / "cls.json"
    stale.write_text("{}")  # another stage's record: dropped with the rest
    fresh = grid()
    report = federated_run(tmp_path, fresh, seg_rounds=1, seed=1, resume=False).execute()
    assert not stale.exists()
    assert report["stages"]["seg"]["resumed_after"] == 0 and "train.seg" in fresh.sent
    assert federated_run(tmp_path, grid(), seg_rounds=1, seed=1).execute()["stages"]["seg"]["resumed_after"] == 1
    # A checkpoint without a fingerprint (an older hemex) is refused as well.
    path = tmp_path / "run" / "checkpoints" / "seg.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("fingerprint", "settings")}))
    with pytest.raises(ConfigError, match="it has no settings fingerprint; resume = false"):
        federated_run(tmp_path, grid(), seg_rounds=1, seed=1).execute()


@pytest.mark.parametrize("content, reason", [
    (RecordDict({"metrics": MetricRecord({"num-examples": 5, "dice": 0.8, "auc": float("nan")})}), None),
    (RecordDict({"metrics": MetricRecord({"num-examples": 5, "dice": float("inf")})}), "'dice' is infinite"),
    (RecordDict({"metrics": MetricRecord({"num-examples": 11, "dice": 0.5})}), "exceeds the 10 case(s)"),
    (RecordDict({"metrics": MetricRecord({"num-examples": 2.5})}), "is not a count"),
    (RecordDict({"metrics": MetricRecord({"num-examples": 5, "dice": [0.1, 0.9, 0.4]})}), "not a scalar"),
    (RecordDict({"metrics": MetricRecord({"num-examples": 5}),
                 "arrays": ArrayRecord([np.zeros((32, 64, 64), np.float32)])}), "metrics only"),
])
def test_evaluation_replies_are_validated_before_use(content, reason):
    from server.guard import metrics_reply_problem

    problem = metrics_reply_problem(content, declared_cases=10)
    assert (problem is None) if reason is None else (reason in problem)
