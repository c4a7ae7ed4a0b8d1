"""What every handler of the ClientApp shares: the whitelisted reply, the global weights
received (FedBN's local layers kept), the round a message belongs to, and the small-group limits."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.site import Site, privacy_limits
from common.federation.records import PrivacyViolation, check_reply, from_record, load_global, norm_keys


def reply(message: Message, content: RecordDict, model=None) -> Message:
    """The whitelisted reply; weights must match `model` (the received global weights)."""
    return Message(check_reply(content, model), reply_to=message)


def receive_global(model, record: ArrayRecord, context: Context, stage: str, fedbn: bool) -> set[str]:
    """Load the global weights; under FedBN keep this site's own normalisation layers, which
    persist across rounds in the node's context state (one entry per stage / arm)."""
    local_keys = norm_keys(model) if fedbn else set()
    key = f"{stage}-local-norm"
    if fedbn and key in context.state:
        model.load_state_dict(from_record(context.state[key]), strict=False)
    load_global(model, from_record(record), keep_local=local_keys if key in context.state else set())
    return local_keys


def global_round(config: ConfigRecord) -> int:
    """The message's round in the whole stage (the strategy counts from 1 again after a resume)."""
    return int(config["server-round"]) + int(config.get("round-offset", 0))


def proximal_mu(config: ConfigRecord) -> float:
    """FedProx's proximal weight, as the strategy sends it with each training round (0 otherwise)."""
    return float(config.get("proximal-mu", 0.0))


SCORINGS_KEY = "cls-scorings"  # classifier models scored so far in this run (node context state)


def small_group(context: Context, site: Site, n: int) -> bool:
    """True when n cases are too few to report aggregates of (a Dice summary or a histogram of
    a handful of cases is each case's own value)."""
    return 0 < n < privacy_limits(context.node_config, site.settings)[0]


def spend_scorings(context: Context, site: Site, n: int) -> None:
    """Count n classifier scorings against the run's bound: many thresholds or slightly different
    models scored on the same cases would reveal each case's score."""
    cap = privacy_limits(context.node_config, site.settings)[1]
    used = int(context.state[SCORINGS_KEY]["used"]) if SCORINGS_KEY in context.state else 0
    if used + n > cap:
        raise PrivacyViolation(f"scoring {n} more classifier model(s) after {used} would exceed max-cls-scorings {cap}")
    context.state[SCORINGS_KEY] = MetricRecord({"used": used + n})
