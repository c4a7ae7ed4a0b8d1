"""Reply deadlines (server/grid.py): a connected but silent site costs a round a bounded multiple of
what the others took, not the whole round timeout; sites that fail at once do not start that clock."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.errors import ConfigError
from common.federation.settings import FederationSettings
from fake_grid import PushPullGrid
from server.grid import Deadlines, StageGrid, collect_replies


class FakeGrid:
    """push_messages / pull_messages over sites that answer after a set delay (None: never)."""

    def __init__(self, delays: dict[str, float | None], errors: tuple[str, ...] = ()):
        self.delays, self.errors = delays, set(errors)
        self.pushed_at = None

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [m for m in messages]

    def pull_messages(self, ids):
        elapsed = time.monotonic() - self.pushed_at
        ready = [i for i in ids if self.delays[i] is not None and self.delays[i] <= elapsed]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i, src_node_id=i),
                                has_error=lambda i=i: i in self.errors) for i in ready]


def timed(grid, deadlines):
    start = time.monotonic()
    replies, why = collect_replies(grid, list(grid.delays), deadlines)
    return sorted(r.metadata.src_node_id for r in replies), why, time.monotonic() - start


def test_a_silent_site_is_dropped_at_the_straggler_deadline_not_the_round_timeout():
    grid = FakeGrid({"a": 0.2, "b": 0.3, "c": None})
    answered, why, seconds = timed(grid, Deadlines(timeout_s=60, straggler_factor=4, straggler_grace_s=0.5,
                                                   poll_s=0.05))
    assert answered == ["a", "b"]
    # Half of the sites (2 of 3) answered at ~0.2-0.3 s: the wait ends at 4 x that + 0.5 s, far
    # before the 60 s round timeout.
    assert 0.9 <= seconds <= 3.0
    assert "dropped for this round" in why and "straggler-factor 4" in why


def test_a_slow_site_within_the_straggler_deadline_is_waited_for():
    grid = FakeGrid({"a": 0.1, "b": 0.1, "c": 0.6})  # 6x the others' time, but within 4 x 0.1 + 1.0 s
    answered, why, _ = timed(grid, Deadlines(timeout_s=60, straggler_factor=4, straggler_grace_s=1.0, poll_s=0.05))
    assert answered == ["a", "b", "c"] and why is None


def test_sites_that_fail_at_once_do_not_start_the_straggler_clock():
    # Two sites fail immediately; the third trains for 1 s. Error replies say nothing about how
    # long the work takes, so the working site is not dropped after 4 x 0 s + grace.
    grid = FakeGrid({"a": 0.0, "b": 0.0, "c": 1.0}, errors=("a", "b"))
    answered, why, _ = timed(grid, Deadlines(timeout_s=60, straggler_factor=4, straggler_grace_s=0.2, poll_s=0.05))
    assert answered == ["a", "b", "c"] and why is None


def test_without_a_straggler_factor_the_round_timeout_is_the_only_limit():
    grid = FakeGrid({"a": 0.05, "b": None})
    answered, why, seconds = timed(grid, Deadlines(timeout_s=0.8, straggler_factor=0, poll_s=0.05))
    assert answered == ["a"] and "round-timeout-s" in why and 0.75 <= seconds <= 2.0


@pytest.mark.parametrize("config", [{"straggler-factor": 0.5}, {"straggler-grace-s": -1}])
def test_bad_straggler_settings_are_one_line_errors(config):
    with pytest.raises(ConfigError, match="straggler"):
        FederationSettings.from_run_config(config)


class DeadSiteGrid(PushPullGrid):
    """Node 2's SuperNode is dead: the SuperLink answers for it, from its own node id (0)."""

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.dst_node_id == 2:
                reply = Message(Error(code=2, reason="node went offline"), reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = 0
            else:
                reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=message)
            replies.append(reply)
        return replies


def test_a_dead_sites_error_is_filed_under_its_centre_not_the_superlinks_node_id(task_identity):
    grid = StageGrid(DeadSiteGrid(), {1: "center1", 2: "center2"}, "seg")
    content = RecordDict({"config": ConfigRecord({})})
    grid.send_and_receive([Message(content, dst_node_id=n, message_type="train") for n in (1, 2)], timeout=5)
    entry = grid.rounds["train.seg"][0]
    assert set(entry["errors"]) == {"center2"} and "offline" in entry["errors"]["center2"]
    assert set(entry["metrics"]) == {"center1"}
