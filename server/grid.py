"""A view of the Grid restricted to one stage's nodes.

Strategies sample from `get_node_ids()`; showing them only the training centres' nodes is what
makes leave-center-out hold: a held-out centre can never be sent a train message. The view also
routes the strategy's plain "train"/"evaluate" messages to the stage's handler ("train.seg"), adds
the stage's fixed records to them (the classifier stage's segmentation weights) and records
per-centre metrics and bytes of every round.

Replies are collected by `collect_replies`: a hard deadline (round-timeout-s) and a straggler
deadline, so that a site that is connected but silent (hung, SIGSTOPped, swapping) costs a round a
bounded multiple of what the others took rather than the whole round timeout, round after round.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


POLL_S = 1.0  # how often replies are pulled (Flower's own loop waits 3 s)


@dataclass(frozen=True)
class Deadlines:
    """When to stop waiting for the replies to one batch of messages.

    `timeout_s` is the hard limit (run-config round-timeout-s). Once half of the sites (rounded up)
    have answered successfully, after `t` seconds, the call waits until `straggler_factor` x t +
    `straggler_grace_s` seconds from its start; a site still silent then is dropped for this call
    (it is sent the next round's message as usual, so a site that was only slow rejoins). Error replies do not start the
    straggler clock: sites that fail at once say nothing about how long the work takes.
    `straggler_factor` 0 waits for the hard limit only.
    """

    timeout_s: float | None = None
    straggler_factor: float = 0.0
    straggler_grace_s: float = 0.0
    poll_s: float = POLL_S


def collect_replies(grid: Grid, messages: list[Message], deadlines: Deadlines) -> tuple[list[Message], str | None]:
    """Push `messages` and pull their replies until all have answered or a deadline passes.
    Returns the replies and, when a deadline cut the wait short, why (for the silent sites' entry)."""
    started = time.monotonic()
    pending = set(grid.push_messages(messages))
    expected = len(pending)
    hard = started + deadlines.timeout_s if deadlines.timeout_s is not None else math.inf
    straggler = math.inf
    replies: list[Message] = []
    while pending:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending.difference_update(m.metadata.reply_to_message_id for m in received)
        now = time.monotonic()
        succeeded = sum(not m.has_error() for m in replies)
        if (pending and straggler == math.inf and deadlines.straggler_factor > 0
                and succeeded >= math.ceil(expected / 2)):
            quorum_s = now - started
            straggler = started + deadlines.straggler_factor * quorum_s + deadlines.straggler_grace_s
        if not pending:
            break
        if now >= min(hard, straggler):
            if straggler < hard:
                return replies, (f"no reply within {now - started:.0f} s: dropped for this round (half of the sites "
                                 f"answered in {quorum_s:.0f} s; straggler-factor {deadlines.straggler_factor:g}, "
                                 f"straggler-grace-s {deadlines.straggler_grace_s:g})")
            return replies, f"no reply within round-timeout-s ({deadlines.timeout_s:g} s)"
        time.sleep(max(0.0, min(deadlines.poll_s, min(hard, straggler) - now)))
    return replies, None


class StageGrid(Grid):
    def __init__(self, grid: Grid, node_centers: dict[int, str], action: str, attach: dict | None = None,
                 deadlines: Deadlines = Deadlines()):
        self.grid = grid
        self.deadlines = deadlines
        self.node_centers = dict(node_centers)
        self.action = action
        self.attach = dict(attach or {})  # records added to every message (e.g. "seg-arrays")
        self.rounds: dict[str, list[dict]] = defaultdict(list)  # message type -> one entry per call

    # Delegated plumbing.
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs):
        return self.grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_centers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        routed = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self.node_centers:
                raise RuntimeError(f"refusing to send {message.metadata.message_type} to node {node}: not a "
                                   f"{self.action} node of this stage (held-out centres never train)")
            kind = message.metadata.message_type.split(".")[0]
            content = message.content
            for name, record in self.attach.items():
                content[name] = record
            routed.append(Message(content, dst_node_id=node, message_type=f"{kind}.{self.action}",
                                  group_id=message.metadata.group_id))
        if not routed:
            return []
        started = time.perf_counter()
        replies, cut_short = collect_replies(self.grid, routed, replace(self.deadlines, timeout_s=timeout))
        self._record(routed, replies, time.perf_counter() - started, cut_short)
        return replies

    def _record(self, sent: list[Message], replies: list[Message], wall_s: float, cut_short: str | None = None) -> None:
        kind = sent[0].metadata.message_type
        # wall_s against the sites' own "seconds" metric gives Flower's share of a round.
        entry = {"sent_bytes": {}, "reply_bytes": {}, "metrics": {}, "errors": {}, "wall_s": wall_s}
        # A reply names the message it answers: a dead site's error reply comes from the SuperLink's
        # node id, not the site's, and must still be filed under the site's centre.
        answers = {m.metadata.message_id: self.node_centers[m.metadata.dst_node_id] for m in sent}
        for message in sent:
            center = self.node_centers[message.metadata.dst_node_id]
            entry["sent_bytes"][center] = sum(r.count_bytes() for r in message.content.array_records.values())
        for reply in replies:
            center = answers.get(reply.metadata.reply_to_message_id) or self.node_centers.get(
                reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                entry["errors"][center] = error_summary(reply.error.reason)
                continue
            entry["reply_bytes"][center] = sum(r.count_bytes() for r in reply.content.array_records.values())
            for record in reply.content.metric_records.values():
                entry["metrics"][center] = dict(record)
        missing = set(entry["sent_bytes"]) - set(entry["reply_bytes"]) - set(entry["errors"])
        for center in missing:
            entry["errors"][center] = cut_short or "no reply before the round timeout"
        self.rounds[kind].append(entry)


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Violation)):\s*(\S.*)$")
WRAPPERS = {"ClientAppException", "RayTaskError"}  # the runtime's envelopes around a site's own error


def error_summary(reason: str) -> str:
    """The site's own error from a Flower error reply, e.g. "DataError: training set: needs both
    classes, ...": the simulation engine wraps it in a remote traceback whose first lines name only
    the runtime. Falls back to the reason's first line."""
    lines = ANSI_ESCAPE.sub("", str(reason)).splitlines()
    found = [m for m in map(EXCEPTION_LINE.match, lines) if m and m.group(1) not in WRAPPERS
             and not m.group(1).startswith("RayTaskError")]
    if found:
        return f"{found[-1].group(1)}: {found[-1].group(2).strip()}"
    first = next((line.strip() for line in lines if line.strip()), "")
    return first or "unknown error"
