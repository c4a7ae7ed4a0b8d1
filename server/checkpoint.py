"""Server state after every round: global weights (safetensors) and run state (JSON).

An interrupted run restarts from the last completed round of the stage it was in. Clients
derive their seeds from the global round number, so the resumed rounds replay exactly what an
uninterrupted run would have done (for stateless aggregators; FedAdam's moments restart).
Every checkpoint carries a fingerprint of the settings that decide what training computes; a
resume under other settings is refused, naming the keys that differ (resume = false starts afresh).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from common.config import load_profile
from common.errors import ConfigError
from common.files import atomic_write, write_json
from common.federation.records import from_record, to_record
from common.federation.settings import FederationSettings

# Where data and outputs live and how long to wait: a resume may change these. Everything else in
# the run config, and the profile's contents, decides the weights.
NOT_TRAINING = ("data-root", "out-dir", "cache-dir", "resume", "node-wait-s", "round-timeout-s", "straggler-factor",
                "straggler-grace-s", "min-aggregate-cases",
                "max-cls-scorings", "bundle-key", "profile")


def training_settings(settings: FederationSettings, profile: dict | None = None) -> dict:
    """The resolved settings that decide the trained weights, flat ("profile.segmentation.lr")."""
    flat = {k: v for k, v in settings.to_run_config().items() if k not in NOT_TRAINING}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        else:
            flat[prefix] = value

    walk("profile", profile if profile is not None else load_profile(settings.profile))
    return json.loads(json.dumps(flat, sort_keys=True, default=str))  # JSON types: tuples become lists


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _differences(stored: dict, current: dict) -> str:
    parts = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key, "(unset)"), current.get(key, "(unset)")
        if old != new:
            shown = f"{old!r} -> {new!r}"
            parts.append(f"{key} {shown}" if len(shown) <= 40 else key)
    return ", ".join(parts[:8]) + (f" and {len(parts) - 8} more" if len(parts) > 8 else "")


class ServerCheckpoints:
    def __init__(self, folder: Path, settings: dict | None = None):
        """`settings`: training_settings() of this run; checkpoints of other settings are refused."""
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = settings or {}
        self.fingerprint = fingerprint(self.settings)

    def save(self, stage: str, server_round: int, arrays: ArrayRecord, state: dict) -> None:
        tensors = {k: v.contiguous() for k, v in from_record(arrays).items()}
        weights = atomic_write(self.folder / f"{stage}-round{server_round:03d}.safetensors",
                               lambda tmp: save_file(tensors, tmp))
        record = {"stage": stage, "round": server_round, "weights": weights.name, **state,
                  "fingerprint": self.fingerprint, "settings": self.settings}
        write_json(self.folder / f"{stage}.json", record)

    def _record(self, path: Path) -> dict:
        """A stage's checkpoint record, refused unless this run's settings wrote it."""
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: unreadable checkpoint ({err}); resume = false (hemex --fresh) starts "
                              "afresh") from err
        if record.get("fingerprint") != self.fingerprint:
            what = (f"settings differ: {_differences(record['settings'], self.settings)}"
                    if isinstance(record.get("settings"), dict) else "it has no settings fingerprint")
            raise ConfigError(f"{path}: cannot resume from this checkpoint, {what}; resume = false (hemex "
                              "--fresh) starts afresh, or use another out-dir")
        return record

    def verify(self) -> None:
        """Refuse now, before any site is contacted, every stage checkpoint of other settings."""
        for path in sorted(self.folder.glob("*.json")):
            self._record(path)

    def clear(self) -> None:
        """Start afresh: drop every stage's record, so no later resume mixes two runs."""
        for path in self.folder.glob("*.json"):
            path.unlink()

    def latest(self, stage: str) -> tuple[int, ArrayRecord, dict] | None:
        """(round, weights, state) of the last completed round of `stage`, or None."""
        path = self.folder / f"{stage}.json"
        if not path.is_file():
            return None
        record = self._record(path)
        weights = load_file(str(self.folder / record["weights"]))
        return int(record["round"]), to_record(weights), record
