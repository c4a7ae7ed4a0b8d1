"""A trained classifier on disk: DIR/classifier.safetensors and DIR/classifier.json."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from common.errors import DataError
from common.files import atomic_write, write_json
from common.training.classification.calibration import Calibration
from common.training.classification.settings import ClassifierSettings, create_model

MODEL_FORMAT = "hemex-cls-checkpoint/1"


def save_classifier(folder: Path, state: dict[str, torch.Tensor], record: dict) -> Path:
    """DIR/classifier.safetensors (torch.save .pt if safetensors is missing) + DIR/classifier.json."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    try:
        from safetensors.torch import save_file

        weights = atomic_write(folder / "classifier.safetensors",
                          lambda tmp: save_file(state, tmp, metadata={"format": MODEL_FORMAT}))
    except ImportError:
        weights = atomic_write(folder / "classifier.pt", lambda tmp: torch.save(state, tmp))
    write_json(folder / "classifier.json", {"format": MODEL_FORMAT, "weights": weights.name, **record})
    return weights


def load_classifier(folder: Path, device="cpu") -> tuple[nn.Module, ClassifierSettings, Calibration, dict]:
    """Rebuild a saved classifier: (model, settings, calibration, record)."""
    folder = Path(folder)
    path = folder / "classifier.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read classifier record: {err}") from err
    if record.get("format") != MODEL_FORMAT:
        raise DataError(path, f"not a {MODEL_FORMAT} record")
    saved = dict(record["settings"])
    saved.setdefault("stem", record.get("architecture", {}).get("stem", "patch"))  # records before the conv stem
    known = {f.name for f in fields(ClassifierSettings)}
    settings = ClassifierSettings(**{**{k: v for k, v in saved.items() if k in known}, "weights": None,
                                     "spacing": tuple(saved["spacing"]) if saved.get("spacing") else None})
    model = create_model(settings)
    weights = folder / record["weights"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), settings, Calibration(**record["calibration"]), record
