"""truth.csv of synthetic cohorts (the true risk and phenotype of every case): read for evaluation
only, after every model is trained and has predicted."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

def read_truth(data_root: Path) -> dict[str, dict] | None:
    """Rows of DATA_ROOT/truth.csv ("center/case_id" -> row), or None without it (real data).
    Evaluation only: called after every model is trained and has predicted."""
    path = Path(data_root) / "truth.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = {f"{r.get('center')}/{r.get('case_id')}": r for r in csv.DictReader(handle)}
    return rows or None


def read_oracle_risk(data_root: Path) -> dict[str, float] | None:
    """True risks from DATA_ROOT/truth.csv ("center/case_id" -> risk), or None without it."""
    rows = read_truth(data_root)
    if rows is None:
        return None
    out = {}
    for k, row in rows.items():
        try:
            out[k] = float(row["risk"])
        except (KeyError, ValueError):
            continue
    return out or None


PHENOTYPE_COLUMNS = ("volume_ml", "irregularity", "heterogeneity", "blend", "black_hole", "islands", "ivh",
                     "onset_to_ct_h")


def phenotype_matrix(rows: list[dict]) -> np.ndarray:
    """The true phenotype of truth.csv rows as numbers (logs of volume and time, booleans 0/1)."""
    out = []
    for row in rows:
        values = []
        for col in PHENOTYPE_COLUMNS:
            v = row[col]
            v = float(v == "True") if v in ("True", "False") else float(v)
            values.append(math.log(max(v, 1e-3)) if col in ("volume_ml", "onset_to_ct_h") else v)
        out.append(values)
    return np.asarray(out, float)
