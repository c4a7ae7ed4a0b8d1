"""Discovery: which node serves which centre. Every connected node is asked for its centre and
case count (`query.info`) as it connects, until every expected centre has answered or node-wait-s
has passed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common.errors import ConfigError
from common.federation.settings import FederationSettings
from server.grid import Deadlines, collect_replies, error_summary

NOT_EVALUATED = "not evaluated: no node answered for this centre at start-up"


@dataclass
class Sites:
    centers: dict[str, int] = field(default_factory=dict)  # centre -> node id, in the settings' order
    counts: dict[str, dict] = field(default_factory=dict)  # centre -> its info reply's metrics
    declared_cases: dict[str, int] = field(default_factory=dict)  # bounds each site's num-examples
    refused: dict[str, str] = field(default_factory=dict)  # node id -> why it answered with an error


def discover_sites(grid: Grid, settings: FederationSettings, deadlines: Deadlines, log) -> Sites:
    """Nodes are asked as they connect, until every expected centre has answered: a node count
    would stop too early when a node outside the run (or one that refuses the app) is connected
    while an expected site is still reconnecting. A silent held-out centre is reported as not
    evaluated; a silent training centre stops the run (ConfigError)."""
    expected = set(settings.node_centers)
    deadline = time.monotonic() + settings.node_wait_s
    # A first message makes each site load its app and libraries, and a site may still be
    # finishing stale work of an earlier run: the straggler rule gives it at least node-wait-s
    # more (a site silent even then is missing; round-timeout-s stays the hard limit).
    deadlines = replace(deadlines, straggler_grace_s=max(deadlines.straggler_grace_s, settings.node_wait_s))
    asked: set[int] = set()
    found, centers = Sites(), {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in asked]
        asked.update(new)
        messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.info")
                    for n in new]
        for reply in collect_replies(grid, messages, deadlines)[0] if messages else []:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # E.g. a site whose SuperNode trusts only signed app bundles refuses this one
                # before any hemex code runs: it has no centre to name, only its node id.
                found.refused[str(node)] = error_summary(reply.error.reason)
                log(f"node {node} failed to describe itself: {found.refused[str(node)]}")
                continue
            center = str(reply.content["info"]["center"])
            if center in centers:
                raise ConfigError(f"two nodes claim centre {center!r} (nodes {centers[center]} and {node})")
            centers[center] = node
            found.counts[center] = dict(reply.content["metrics"])
            declared = found.counts[center].get("num-cases")
            if isinstance(declared, (int, float)) and float(declared).is_integer() and declared >= 0:
                found.declared_cases[center] = int(declared)
        if expected <= set(centers) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    missing = expected - set(centers)
    if missing - set(settings.test_centers):
        failed = "".join(f"; node {node}: {why}" for node, why in sorted(found.refused.items()))
        raise ConfigError(f"no node answered for centre(s) {', '.join(sorted(missing))} within node-wait-s / "
                          f"round-timeout-s (answered: {', '.join(sorted(centers)) or 'none'}; "
                          f"{len(asked)} node(s) connected{failed})")
    if missing:
        log(f"held-out centre(s) {', '.join(sorted(missing))} did not answer within node-wait-s: not evaluated")
    found.centers = {c: centers[c] for c in settings.node_centers if c in centers}
    return found
