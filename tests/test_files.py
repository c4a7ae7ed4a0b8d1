"""The shared file writers (common/files.py): strict JSON, atomic renames with the usual
permissions, nothing left behind on failure, npz with metadata, the recorded software stack."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from common.files import atomic_write, cpu_state, seed_everything, versions, write_csv, write_json, write_npz


def strict_load(path: Path):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_write_json_is_strict_json_with_non_finite_values_as_null(tmp_path):
    payload = {
        "nan": float("nan"), "inf": [1.0, float("inf"), -math.inf], "nested": {"deep": ({"x": np.float32("nan")},)},
        "numpy": {"f": np.float64(0.25), "i": np.int64(3), "b": np.bool_(True), "nan": np.float64("nan")},
        "array": np.array([[1.0, np.nan], [2.0, 3.0]]), "tensor": torch.tensor([0.5, float("inf")]),
        "scalar_tensor": torch.tensor(2.5), "path": tmp_path, "set": {"b", "a"}, 7: "int key",
    }
    path = write_json(tmp_path / "out" / "a.json", payload)
    assert path == tmp_path / "out" / "a.json"
    data = strict_load(path)
    assert data["nan"] is None and data["inf"] == [1.0, None, None] and data["nested"] == {"deep": [{"x": None}]}
    assert data["numpy"] == {"f": 0.25, "i": 3, "b": True, "nan": None}
    assert data["array"] == [[1.0, None], [2.0, 3.0]] and data["tensor"] == [0.5, None]
    assert data["scalar_tensor"] == 2.5 and data["path"] == str(tmp_path) and data["set"] == ["a", "b"]
    assert data["7"] == "int key"
    assert path.read_text(encoding="utf-8").endswith("}\n")


def test_atomic_write_leaves_nothing_behind_and_keeps_the_usual_permissions(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    def fail(tmp):
        Path(tmp).write_text("half a file", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert strict_load(target) == {"a": 1}  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_csv_and_npz_writers(tmp_path):
    write_csv(tmp_path / "p.csv", ["case", "score"], [["a", 0.5], ["b", 1]])
    assert (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines() == ["case,score", "a,0.5", "b,1"]
    write_npz(tmp_path / "s.npz", {"format": "f/1", "n": 2}, images=np.ones((2, 3), np.float32))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        assert json.loads(str(data["meta"])) == {"format": "f/1", "n": 2}
        assert data["images"].shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "s.npz"]


def test_versions_and_seeding():
    stack = versions()
    assert stack["python"] and stack["platform"] and stack["torch"] and stack["numpy"]
    assert {"hemex", "timm", "monai", "mambapy", "scipy", "scikit-learn", "SimpleITK", "safetensors"} <= set(stack)
    seed_everything(3)
    first = (np.random.rand(), torch.rand(2))
    seed_everything(3)
    again = (np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and torch.equal(first[1], again[1])
    model = torch.nn.Linear(2, 1)
    state = cpu_state(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(state["weight"], model.weight)  # a copy, not a view
