"""A site's cache of trained generators, keyed by what decides the trained weights.

A study over several folds (leave-one-centre-out) or a resumed run asks a site for synthetic ROIs
again with the same data and settings; retraining would spend minutes to get the same generator.
The key is a SHA-256 over the generator's training inputs (ROI pixels, labels), the settings that
shape training (not the sampling, ratio or audit ones: those act after training), the seed, and
this format's version. The cache lives on the site (it holds a model of the site's patients) and
is never sent anywhere.

Layout: <cache_dir>/generator-<key>.safetensors (EMA weights) and .json (shape, classes, training
record), each written to a temporary name and renamed, weights first, so a reader that finds the
JSON also finds complete weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.files import atomic_write, cpu_state, write_json
from common.synthesis.diffusion import TrainedGenerator, build_generator
from common.synthesis.settings import SynthesisSettings

FORMAT = "hemex-generator-cache/1"
# Settings that act after training: changing them must not retrain.
AFTER_TRAINING = ("sample_steps", "ddim_eta", "sample_batch", "ratio", "max_synthetic", "audit_percentile",
                  "audit_max_shift", "oversample", "realism_gate", "realism_samples")


def generator_key(inputs: np.ndarray, labels: np.ndarray | None, settings: SynthesisSettings, seed: int) -> str:
    digest = hashlib.sha256(FORMAT.encode())
    data = np.ascontiguousarray(inputs, dtype=np.float32)
    digest.update(repr(data.shape).encode())
    digest.update(data.tobytes())
    if labels is not None:
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    training = {k: v for k, v in settings.as_dict().items() if k not in AFTER_TRAINING}
    digest.update(json.dumps({"settings": training, "seed": int(seed), "conditional": labels is not None},
                             sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    base = Path(cache_dir) / f"generator-{key}"
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def load_generator(cache_dir: Path | None, key: str, settings: SynthesisSettings) -> TrainedGenerator | None:
    """The cached generator for `key`, or None when there is none (or it cannot be read: then it is
    retrained and overwritten rather than failing the site's run)."""
    if cache_dir is None:
        return None
    from safetensors.torch import load_file

    weights, record_path = _paths(cache_dir, key)
    if not (weights.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            return None
        shape = tuple(int(v) for v in record["image_shape"])
        num_classes = record["num_classes"]
        condition_channels = int(record.get("condition_channels", 0))
        model = build_generator(settings, shape[0], num_classes, condition_channels)
        model.load_state_dict(load_file(str(weights)))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainedGenerator(model, settings, shape, num_classes, condition_channels, losses=list(record["losses"]),
                            step_seconds=list(record["step_seconds"]), stopped_early=bool(record["stopped_early"]),
                            cached=True)


def save_generator(cache_dir: Path | None, key: str, trained: TrainedGenerator) -> None:
    if cache_dir is None:
        return
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights, record_path = _paths(cache_dir, key)
    state = {k: v.contiguous() for k, v in cpu_state(trained.model).items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp), ".safetensors")
    write_json(record_path, {"format": FORMAT, "image_shape": list(trained.image_shape),
                             "num_classes": trained.num_classes,
                             "condition_channels": trained.condition_channels, "losses": trained.losses,
                             "step_seconds": trained.step_seconds, "stopped_early": trained.stopped_early,
                             "torch": torch.__version__})
