"""Model weights in Flower records, FedBN's local normalisation layers, and the reply whitelist.

Only two kinds of content may leave a site: model weights (an ArrayRecord whose keys are the
model's own state-dict keys) and aggregate numbers (a MetricRecord of scalars). `check_reply`
enforces that on every reply a client sends, so a bug cannot leak an image, a mask, a
per-patient prediction or a synthetic sample.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

NORM_TYPES = (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.BatchNorm3d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
MAX_METRICS = 64  # aggregate summaries are small; a long record smells like per-case data


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than model weights and aggregate metrics."""


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys of normalisation layers: FedBN keeps these local to each site, because
    they absorb scanner-specific intensity statistics."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys |= {f"{name}.{k}" if name else k for k in module.state_dict()}
    return keys


def load_global(model: nn.Module, state: dict[str, torch.Tensor], keep_local: set[str] = frozenset()) -> None:
    """Load the global weights into `model`, except the keys kept local (FedBN)."""
    current = model.state_dict()
    missing = set(current) - set(state)
    unexpected = set(state) - set(current)
    if missing or unexpected:
        raise ValueError(f"global weights do not match the model: {len(missing)} missing, {len(unexpected)} unexpected keys "
                         f"(e.g. {sorted(missing | unexpected)[:3]})")
    merged = {k: (current[k] if k in keep_local else state[k].to(current[k].dtype)) for k in current}
    model.load_state_dict(merged, strict=True)


def check_reply(content: RecordDict, model_keys: set[str] | None = None) -> RecordDict:
    """Raise PrivacyViolation unless `content` holds only weights of the model and scalar
    aggregate metrics / short config strings."""
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if model_keys is None:
                raise PrivacyViolation(f"reply record {name!r} holds arrays but this reply may not carry weights")
            if set(record.keys()) != model_keys:
                raise PrivacyViolation(f"reply record {name!r} holds arrays that are not exactly the model's weights")
        elif isinstance(record, MetricRecord):
            if len(record) > MAX_METRICS:
                raise PrivacyViolation(f"reply metrics {name!r} hold {len(record)} values (> {MAX_METRICS})")
            for key, value in record.items():
                if not isinstance(value, (int, float)):
                    raise PrivacyViolation(f"reply metric {key!r} is a {type(value).__name__}, not a scalar")
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                if not isinstance(value, (str, int, float, bool)) or (isinstance(value, str) and len(value) > 200):
                    raise PrivacyViolation(f"reply config {key!r} is not a short scalar")
        else:
            raise PrivacyViolation(f"reply record {name!r} of type {type(record).__name__} is not allowed")
    return content
