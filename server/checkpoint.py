"""Server state after every round: global weights (safetensors) and run state (JSON).

An interrupted run restarts from the last completed round of the stage it was in. Clients
derive their seeds from the global round number, so the resumed rounds replay exactly what an
uninterrupted run would have done (for stateless aggregators; FedAdam's moments restart).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ArrayRecord
from safetensors.torch import load_file, save_file

from common.federation.records import from_record, to_record


class ServerCheckpoints:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def save(self, stage: str, server_round: int, arrays: ArrayRecord, state: dict) -> None:
        weights = self.folder / f"{stage}-round{server_round:03d}.safetensors"
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_file({k: v.contiguous() for k, v in from_record(arrays).items()}, str(tmp))
        os.replace(tmp, weights)
        record = {"stage": stage, "round": server_round, "weights": weights.name, **state}
        self._write_json(self.folder / f"{stage}.json", record)

    def latest(self, stage: str) -> tuple[int, ArrayRecord, dict] | None:
        """(round, weights, state) of the last completed round of `stage`, or None."""
        path = self.folder / f"{stage}.json"
        if not path.is_file():
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
        weights = load_file(str(self.folder / record["weights"]))
        return int(record["round"]), to_record(weights), record

    @staticmethod
    def _write_json(path: Path, payload: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
        os.replace(tmp, path)
