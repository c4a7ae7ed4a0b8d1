"""A run's progress as structured events: one JSON object per line in <out-dir>/progress.jsonl.

The coordinator appends an event for each unit of work done (a round, the synthesis stage, an
evaluation): {"step", "total", "stage", "text", "time"}. Whoever follows the run (the study's
progress bar, a coordinator's `tail -f`, a dashboard) reads the file instead of parsing log
lines; it is on the coordinator's disk, so it works the same in simulation and deployment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS_NAME = "progress.jsonl"


class ProgressLog:
    """The writer: started empty for each run, one flushed line per event."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")

    def emit(self, step: int, total: int, text: str) -> dict:
        event = {"step": step, "total": total, "stage": text.split(":")[0], "text": text, "time": time.time()}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        return event


class ProgressReader:
    """The follower: each `read()` returns the events appended since the last one (complete lines
    only; a file started again by a new run is read from its start)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(0, 2)
                if handle.tell() < self.offset:  # a new run started the file again
                    self.offset = 0
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        events = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events
