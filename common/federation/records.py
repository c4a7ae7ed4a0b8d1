"""Model weights in Flower records, FedBN's local normalisation layers, and the reply whitelist.

Only two kinds of content may leave a site: model weights (an ArrayRecord whose keys are the
model's own state-dict keys) and aggregate numbers (a MetricRecord of scalars). `check_reply`
enforces that on every reply a client sends, so a bug cannot leak an image, a mask, a
per-patient prediction or a synthetic sample.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import nn

NORM_TYPES = (nn.InstanceNorm3d, nn.InstanceNorm2d, nn.BatchNorm3d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
MAX_METRICS = 64  # aggregate summaries are small; a long record smells like per-case data
REPLY_STRINGS = {"center"}  # the only string a reply carries: the site's centre id (query.info)
SAFE_STRING = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
WITHHELD = "withheld"  # metric = 1: the reply holds counts only (fewer cases than min-aggregate-cases)


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


def array_spec(arrays: Mapping) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} of an ArrayRecord or a torch state dict."""
    spec = {}
    for key, value in arrays.items():
        if isinstance(value, torch.Tensor):
            spec[key] = (str(value.dtype).removeprefix("torch."), tuple(value.shape))
        else:  # flwr Array
            spec[key] = (str(value.dtype), tuple(value.shape))
    return spec


def weights_problem(record: ArrayRecord, model: Mapping, finite: bool = True) -> str | None:
    """Why `record` is not a set of weights of the model `model` (same keys, dtypes and shapes,
    and with `finite`, only finite values), or None. The reason names only the model's keys and
    counts, never anything else the record holds."""
    expected, got = array_spec(model), array_spec(record)
    missing, unexpected = set(expected) - set(got), set(got) - set(expected)
    if missing or unexpected:
        example = f" (e.g. missing {sorted(missing)[0]!r})" if missing else ""
        return (f"arrays are not the model's weights: {len(missing)} missing, {len(unexpected)} unexpected "
                f"key(s){example}")
    for key, (dtype, shape) in expected.items():
        if got[key] != (dtype, shape):
            return (f"array {key!r} is {got[key][0]} {list(got[key][1])}, the model's is {dtype} {list(shape)}")
    if finite:
        bad = [k for k, v in record.items() if np.issubdtype(np.dtype(v.dtype), np.inexact)
               and not np.isfinite(v.numpy()).all()]
        if bad:
            return f"{len(bad)} array(s) hold NaN or infinite values (e.g. {bad[0]!r})"
    return None


def check_reply(content: RecordDict, model: Mapping | None = None) -> RecordDict:
    """Raise PrivacyViolation unless `content` holds only weights shaped like `model` (the
    received global weights: same keys, dtypes and shapes) and scalar aggregate metrics / a few
    short identifier-like config strings."""
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            if model is None:
                raise PrivacyViolation(f"reply record {name!r} holds arrays but this reply may not carry weights")
            problem = weights_problem(record, model, finite=False)
            if problem:
                raise PrivacyViolation(f"reply record {name!r}: {problem}")
        elif isinstance(record, MetricRecord):
            if len(record) > MAX_METRICS:
                raise PrivacyViolation(f"reply metrics {name!r} hold {len(record)} values (> {MAX_METRICS})")
            for key, value in record.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PrivacyViolation(f"reply metric {key!r} is a {type(value).__name__}, not a scalar")
        elif isinstance(record, ConfigRecord):
            for key, value in record.items():
                if isinstance(value, str):
                    if key not in REPLY_STRINGS or not SAFE_STRING.fullmatch(value):
                        raise PrivacyViolation(f"reply config {key!r}: only {', '.join(sorted(REPLY_STRINGS))} may "
                                               "be a string, an identifier of at most 64 characters")
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PrivacyViolation(f"reply config {key!r} is a {type(value).__name__}, not a scalar")
        else:
            raise PrivacyViolation(f"reply record {name!r} of type {type(record).__name__} is not allowed")
    return content
