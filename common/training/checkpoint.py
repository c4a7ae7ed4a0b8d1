"""Segmentation checkpoints: weights in safetensors, architecture beside them in JSON.

    DIR/model.safetensors   the state dict (no pickle: safe to load from another site)
    DIR/model.json          {"format", "architecture": {model, in_channels, out_channels, config}, ...}

The architecture record holds the network's full resolved configuration (defaults merged
with overrides), so a checkpoint rebuilds its own network, and loading into a different
architecture or size fails with the differing settings named instead of a wall of
state-dict key errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import ConfigError, DataError
from common.files import atomic_write, write_json
from common.networks import create_model, get_default_config

FORMAT = "hemex-seg-checkpoint/1"
WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "model.json"


def _plain_json(value):
    """Tuples to lists, recursively: the form the record takes after a JSON round trip."""
    return json.loads(json.dumps(value))


def architecture(model_name: str, in_channels: int, out_channels: int, overrides: dict | None = None) -> dict:
    """The full architecture record of `create_model(model_name, in_channels, out_channels, **overrides)`."""
    config = {**get_default_config(model_name), **(overrides or {})}
    return _plain_json({"model": model_name, "in_channels": int(in_channels), "out_channels": int(out_channels),
                        "config": config})


def build_model(arch: dict) -> nn.Module:
    return create_model(arch["model"], arch["in_channels"], arch["out_channels"], **arch["config"])


# How a network runs, not which weights it has: U-Mamba's Mamba backend (mamba_ssm kernels and
# mambapy share parameter names) and whether deep-supervision outputs are returned (the heads
# always exist). A checkpoint loads whatever these are; the requested values win.
RUNTIME_SETTINGS = frozenset({"mamba_backend", "mamba_pscan", "deep_supervision"})


def architecture_differences(saved: dict, requested: dict) -> list[str]:
    """Human-readable 'key: saved -> requested' for every differing architecture setting."""
    saved, requested = _plain_json(saved), _plain_json(requested)
    diffs = [f"{k}: {saved.get(k)!r} -> {requested.get(k)!r}" for k in ("model", "in_channels", "out_channels")
             if saved.get(k) != requested.get(k)]
    s_cfg, r_cfg = saved.get("config", {}), requested.get("config", {})
    diffs += [f"{k}: {s_cfg.get(k)!r} -> {r_cfg.get(k)!r}" for k in sorted((set(s_cfg) | set(r_cfg)) - RUNTIME_SETTINGS)
              if s_cfg.get(k) != r_cfg.get(k)]
    return diffs


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], arch: dict, info: dict | None = None) -> Path:
    """Write DIR/model.safetensors and DIR/model.json atomically; returns the weights path."""
    folder = Path(folder)
    # safetensors refuses shared or strided storage: store contiguous copies.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    weights = atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(
        state, tmp, metadata={"format": FORMAT, "architecture": json.dumps(_plain_json(arch))}))
    write_json(folder / RECORD_NAME, {"format": FORMAT, "architecture": _plain_json(arch), **(info or {})})
    return weights


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        raise DataError(path, "missing: not a hemex segmentation checkpoint folder")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read checkpoint record: {err}") from err
    if record.get("format") != FORMAT or "architecture" not in record:
        raise DataError(path, f"not a {FORMAT} record (format {record.get('format')!r})")
    return record


def load_checkpoint(folder: Path, expected: dict | None = None, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the saved network and load its weights; returns (model, record).

    With `expected` (an `architecture(...)` record), a checkpoint of another architecture or
    size raises ConfigError naming the differing settings before any weight is touched, and
    the expected runtime settings (e.g. the Mamba backend of this machine) are used.
    """
    folder = Path(folder)
    record = read_record(folder)
    saved = record["architecture"]
    if expected is not None:
        diffs = architecture_differences(saved, expected)
        if diffs:
            raise ConfigError(f"{folder}: checkpoint architecture differs from the requested one "
                              f"(saved -> requested): {'; '.join(diffs)}")
        runtime = {k: v for k, v in _plain_json(expected).get("config", {}).items() if k in RUNTIME_SETTINGS}
        saved = {**saved, "config": {**saved["config"], **runtime}}
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise DataError(weights, "missing checkpoint weights")
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise DataError(weights, f"cannot read weights: {err}") from err
    model = build_model(saved)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DataError(weights, f"weights do not fit the recorded architecture: {' '.join(first[:2])}") from err
    return model.to(device), record
