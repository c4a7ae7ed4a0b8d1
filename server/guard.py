"""Server-side checks on every training reply before aggregation, and the round quorum.

A reply is dropped, with a one-line reason and its site named by centre, when its weights are
not the global model's (keys, dtypes, shapes), hold NaN or infinite values, or its `num-examples`
is not an integer in 1..the number of cases the site declared in its info reply (an honest site
with nothing to train on sends 0: it is left out of the average, not counted as valid). A site's
weight is capped at `max-weight-ratio` x the median valid site's. A round with fewer than
`min-valid-replies` valid replies keeps the previous global weights (a failed round); more than
`max-failed-rounds` failed rounds in a stage stop the run (`RunFailed`).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.errors import HemexError
from common.federation.records import WITHHELD, weights_problem

WEIGHT_KEY = "num-examples"


class RunFailed(HemexError):
    """The federation cannot go on (too many failed rounds, or a stage that never aggregated)."""


def train_reply_problem(content: RecordDict, reference: ArrayRecord, declared_cases: int | None) -> str | None:
    """Why a training reply must not be aggregated, or None. The reason holds no case data."""
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"reply holds {len(content.array_records)} array and {len(content.metric_records)} metric "
                "records, expected one of each")
    problem = weights_problem(next(iter(content.array_records.values())), reference)
    if problem:
        return problem
    metrics = next(iter(content.metric_records.values()))
    if any(isinstance(v, list) for v in metrics.values()):
        return "metrics hold lists, expected scalars"
    n = metrics.get(WEIGHT_KEY)
    if n is None:
        return f"no {WEIGHT_KEY}"
    if not float(n).is_integer():
        return f"{WEIGHT_KEY} {n!r} is not an integer"
    if n < 1:
        return f"{WEIGHT_KEY} {int(n)}: trained on no case this round"
    if declared_cases is None:
        return f"{WEIGHT_KEY} {int(n)} but the site declared no case count at start-up"
    if n > declared_cases:
        return f"{WEIGHT_KEY} {int(n)} exceeds the {declared_cases} case(s) the site declared"
    return None


def metrics_reply_problem(content: RecordDict, declared_cases: int | None) -> str | None:
    """Why an evaluation or query reply's metrics must not be used, or None. Such a reply carries
    metrics only: no arrays, scalar numbers (NaN says "undefined", e.g. an AUC with one class; an
    infinite value is refused), and a `num-examples` that is an integer in 0..the declared cases."""
    if len(content.array_records):
        return f"reply holds {len(content.array_records)} array record(s); an evaluation sends metrics only"
    for record in content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"metric {key!r} is not a scalar number"
            if math.isinf(value):
                return f"metric {key!r} is infinite"
        n = record.get(WEIGHT_KEY)
        if n is not None:
            if math.isnan(n) or not float(n).is_integer() or n < 0:
                return f"{WEIGHT_KEY} {n!r} is not a count"
            if declared_cases is not None and n > declared_cases:
                return f"{WEIGHT_KEY} {int(n)} exceeds the {declared_cases} case(s) the site declared"
    return None


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """The aggregate in the reference's key order and dtypes (averaging turns int buffers into
    floats, which the next round's reply check would then refuse)."""
    out = {}
    for key, ref in reference.items():
        value, dtype = arrays[key].numpy(), np.dtype(ref.dtype)
        if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
            value = np.rint(value)
        out[key] = Array(np.array(value, dtype=dtype, order="C"))
    return ArrayRecord(out)


def cap_weights(counts: list[float], ratio: float) -> list[float]:
    """Each weight capped at `ratio` x the median weight."""
    cap = ratio * float(np.median(counts))
    return [min(float(c), cap) for c in counts]


def _metrics(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()))


def _keep_common_keys(contents: list[RecordDict]) -> None:
    """Flower aggregates only replies with identical metric keys: drop the keys not all share."""
    common = set.intersection(*(set(_metrics(c)) for c in contents))
    for content in contents:
        record = _metrics(content)
        for key in set(record) - common:
            del record[key]


class GuardedStrategy(Strategy):
    """Wraps a Flower strategy (DP wrappers included): validates, filters and weights the
    training replies, enforces the quorum, then lets the wrapped strategy aggregate."""

    def __init__(self, strategy: Strategy, node_centers: dict[int, str], declared_cases: dict[str, int],
                 min_valid: int, max_failed_rounds: int, max_weight_ratio: float, stage: str = "",
                 log=print):
        self.strategy = strategy
        self.node_centers = dict(node_centers)
        self.declared_cases = dict(declared_cases)
        self.min_valid = min(min_valid, len(node_centers))
        self.max_failed_rounds = max_failed_rounds
        self.max_weight_ratio = max_weight_ratio
        self.stage = stage
        self.log = log
        self.reference: ArrayRecord | None = None
        self.sent: list[int] = []
        self.rounds: dict[int, dict] = {}  # server round -> {"rejected", "clipped", "valid", "failed"}
        self.failed_rounds = 0
        self.aggregated_rounds = 0

    def center(self, node_id: int) -> str:
        return self.node_centers.get(node_id, f"node {node_id}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.reference = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = {"valid": [], "rejected": {}, "clipped": {}, "failed": None}
        self.rounds[server_round] = entry
        valid, errors = [], []
        for reply in replies:
            center = self.center(reply.metadata.src_node_id)
            if reply.has_error():
                errors.append(center)  # the error itself is in the round's "errors"
                continue
            problem = train_reply_problem(reply.content, self.reference, self.declared_cases.get(center))
            if problem:
                entry["rejected"][center] = problem
                self.log(f"{self.stage}: round {server_round}: dropped {center}'s reply: {problem}")
            else:
                valid.append((center, reply))
        answered = {r.metadata.src_node_id for r in replies}
        silent = [self.center(n) for n in self.sent if n not in answered]
        valid.sort(key=lambda item: item[0])
        entry["valid"] = [c for c, _ in valid]
        if len(valid) < self.min_valid:
            parts = [f"{c} rejected ({r})" for c, r in sorted(entry["rejected"].items())]
            parts += [f"{c} failed" for c in sorted(errors)] + [f"{c} did not answer" for c in sorted(silent)]
            return self.fail(server_round, f"{len(valid)} valid training repl{'y' if len(valid) == 1 else 'ies'} "
                                            f"of {len(self.sent)}, min-valid-replies is {self.min_valid}"
                                            + (f": {'; '.join(parts)}" if parts else ""))
        contents = [r.content for _, r in valid]
        claimed = [float(_metrics(c)[WEIGHT_KEY]) for c in contents]
        for (center, _), content, n, used in zip(valid, contents, claimed,
                                                 cap_weights(claimed, self.max_weight_ratio)):
            if used < n:
                _metrics(content)[WEIGHT_KEY] = used
                entry["clipped"][center] = [n, used]
        _keep_common_keys(contents)
        arrays, metrics = self.strategy.aggregate_train(server_round, [r for _, r in valid])
        if arrays is None:
            return self.fail(server_round, f"the {type(self.strategy).__name__} strategy did not aggregate")
        arrays = cast_like(arrays, self.reference)
        problem = weights_problem(arrays, self.reference)
        if problem:
            return self.fail(server_round, f"the aggregate is unusable: {problem}")
        self.aggregated_rounds += 1
        return arrays, metrics

    def fail(self, server_round: int, reason: str) -> tuple[None, None]:
        """A failed round keeps the previous global weights; too many of them stop the run."""
        self.failed_rounds += 1
        entry = self.rounds.setdefault(server_round, {})
        entry["failed"] = reason
        self.log(f"{self.stage}: round {server_round} failed, the global weights are kept: {reason}")
        if self.failed_rounds > self.max_failed_rounds:
            raise RunFailed(f"{self.stage} round {server_round}: {reason}; {self.failed_rounds} failed round(s) "
                            f"> max-failed-rounds {self.max_failed_rounds}")
        return None, None

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean of the sites' validation metrics over the replies with examples and aggregates
        (per-centre metrics are in the round's report either way); None when no site had any."""
        usable = []
        for reply in replies:
            if reply.has_error() or len(reply.content.metric_records) != 1:
                continue
            metrics = _metrics(reply.content)
            n = metrics.get(WEIGHT_KEY)
            if metrics.get(WITHHELD):  # too few cases for aggregates: counts only
                continue
            if isinstance(n, (int, float)) and math.isfinite(n) and n > 0 and \
                    not any(isinstance(v, list) for v in metrics.values()):
                usable.append(reply)
        if not usable:
            return None
        _keep_common_keys([r.content for r in usable])
        return self.strategy.aggregate_evaluate(server_round, usable)

    def summary(self) -> None:
        self.strategy.summary()
