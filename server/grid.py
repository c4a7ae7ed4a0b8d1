"""A view of the Grid restricted to one stage's nodes.

Strategies sample from `get_node_ids()`; showing them only the training centres' nodes is what
makes leave-center-out hold: a held-out centre can never be sent a train message. The view also
routes the strategy's plain "train"/"evaluate" messages to the stage's handler ("train.seg"), adds
the stage's fixed records to them (the classifier stage's segmentation weights) and records
per-centre metrics and bytes of every round.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class StageGrid(Grid):
    def __init__(self, grid: Grid, node_centers: dict[int, str], action: str, attach: dict | None = None):
        self.grid = grid
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
        replies = list(self.grid.send_and_receive(routed, timeout=timeout))
        self._record(routed, replies, time.perf_counter() - started)
        return replies

    def _record(self, sent: list[Message], replies: list[Message], wall_s: float) -> None:
        kind = sent[0].metadata.message_type
        # wall_s against the sites' own "seconds" metric gives Flower's share of a round.
        entry = {"sent_bytes": {}, "reply_bytes": {}, "metrics": {}, "errors": {}, "wall_s": wall_s}
        for message in sent:
            center = self.node_centers[message.metadata.dst_node_id]
            entry["sent_bytes"][center] = sum(r.count_bytes() for r in message.content.array_records.values())
        for reply in replies:
            center = self.node_centers.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
            if reply.has_error():
                entry["errors"][center] = error_summary(reply.error.reason)
                continue
            entry["reply_bytes"][center] = sum(r.count_bytes() for r in reply.content.array_records.values())
            for record in reply.content.metric_records.values():
                entry["metrics"][center] = dict(record)
        missing = set(entry["sent_bytes"]) - set(entry["reply_bytes"]) - set(entry["errors"])
        for center in missing:
            entry["errors"][center] = "no reply before the round timeout"
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
