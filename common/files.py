"""Writing files, one way everywhere, and the provenance that goes into them.

Every file is written to a temporary name in its own folder and renamed (``os.replace``), so a
reader never sees half a file and an interrupted run leaves no partial output; the file gets the
usual permissions (0666 less the umask), not mkstemp's 0600.

* ``atomic_write(path, write)``: the primitive; ``write(tmp)`` fills the temporary file.
* ``write_json(path, payload)``: strict JSON (NaN and infinities become ``null``: strict readers
  such as jq, browsers and ``json.loads(..., parse_constant=...)`` reject the NaN token); numpy
  and torch scalars and arrays become numbers and lists, paths and other objects their text.
* ``write_text``, ``write_bytes``, ``write_csv``, ``write_npz``.
* ``versions()``: the software stack, for the config.json of every run.
* ``seed_everything(seed)``, ``cpu_state(model)``: the process's random state, a model's weights
  as CPU copies (what is saved or sent).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import random
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

# Distributions whose versions every run records (None where one is not installed).
PACKAGES = ("hemex", "torch", "timm", "monai", "mambapy", "numpy", "scipy", "scikit-learn", "SimpleITK",
            "safetensors")


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """Call ``write(tmp)`` on a temporary file beside `path` (hidden, ending in `suffix`: some
    writers choose the format by extension), then rename it to `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(handle)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)

    return atomic_write(path, write)


def write_text(path: Path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write)


def strict_json(value):
    """`value` as plain JSON types: non-finite floats become None, recursively (numpy and torch
    scalars first become Python numbers, arrays and tensors lists, sets sorted lists)."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    if isinstance(value, dict):
        return {k if k is None or isinstance(k, (str, int, float)) else str(k): strict_json(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [strict_json(v) for v in sorted(value)]
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return strict_json(value.tolist())
    if hasattr(value, "item"):
        return strict_json(value.item())
    return str(value)  # paths, devices, dtypes


def json_text(payload) -> str:
    """The text write_json writes: strict JSON, indented by two spaces, ending in a newline."""
    return json.dumps(strict_json(payload), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, payload) -> Path:
    """Strict JSON (see strict_json), written to a temporary name and renamed."""
    return write_text(path, json_text(payload))


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    return atomic_write(path, write)


def write_npz(path: Path, meta: dict, **arrays) -> Path:
    """Compressed arrays and a JSON `meta` string (``np.load(...)["meta"]``)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.array(json.dumps(meta)), **arrays)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()), ".npz")


def versions() -> dict:
    """Python, the platform and the installed versions of PACKAGES (None where missing)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (model initialisation and data order draw from these)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_state(model) -> dict:
    """CPU copies of a model's state dict (what is saved or sent; training may go on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
