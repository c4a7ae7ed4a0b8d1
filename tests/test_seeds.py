"""`hemex simulate --seeds`: the across-seed summary of several studies."""

from __future__ import annotations

import json
import statistics

import pytest
from rich.console import Console

from common.cli.federation import _seed_list
from common.errors import HemexError
from simulation.seeds import print_seed_summary, seed_summary, write_seed_summary


def metrics(fed: float, local: float | None, oracle: float, diff: float | None) -> dict:
    """The parts of a study's metrics.json that the summary reads."""
    local_pooled = {"auc": local, "oracle_auc": oracle}
    if diff is not None:
        local_pooled["vs_federated"] = {"diff": diff, "se": 0.05, "p": 0.4}
    return {"cohort": "paper", "test_centers": ["center4", "center5"],
            "arms": {"federated": {"pooled": {"auc": fed, "oracle_auc": oracle}},
                     "local-center1": {"pooled": local_pooled}}}


def test_seed_summary_means_ratios_and_paired_differences(tmp_path):
    runs = {0: metrics(0.72, 0.70, 0.90, -0.02), 3: metrics(0.80, 0.82, 0.85, 0.02), 1: metrics(0.66, None, 0.80, None)}
    summary = seed_summary(runs)
    assert summary["seeds"] == [0, 1, 3]
    fed = summary["arms"]["federated"]
    assert fed["auc_summary"]["mean"] == pytest.approx((0.72 + 0.66 + 0.80) / 3)
    assert fed["auc_summary"]["sd"] == pytest.approx(statistics.stdev([0.72, 0.66, 0.80]))
    assert fed["oracle_ratio_summary"]["mean"] == pytest.approx((0.72 / 0.90 + 0.66 / 0.80 + 0.80 / 0.85) / 3)
    assert fed["vs_federated"] is None and fed["seeds_without_auc"] == []
    local = summary["arms"]["local-center1"]
    assert local["seeds_without_auc"] == [1]  # no AUC that seed: left out and named, not counted as 0
    assert local["auc_summary"]["n_seeds"] == 2 and local["auc_summary"]["mean"] == pytest.approx(0.76)
    assert local["vs_federated"]["summary"]["mean"] == pytest.approx(0.0)
    assert local["vs_federated"]["federated_ahead_or_equal"] == 1  # seed 0 only
    assert summary["oracle_auc"]["mean"] == pytest.approx(0.85)

    json_path, md_path = write_seed_summary(summary, tmp_path)
    assert json.loads(json_path.read_text(encoding="utf-8"))["arms"]["local-center1"]["auc"] == {"0": 0.70, "3": 0.82}
    markdown = md_path.read_text(encoding="utf-8")
    assert "| federated | 0.720 | 0.660 | 0.800 | 0.727 ± 0.070 | 0.86 ± 0.08 | - | - |" in markdown
    assert "| local-center1 | 0.700 | - | 0.820 | 0.760 ± 0.085 | 0.87 ± 0.13 | +0.000 | 1/2 |" in markdown
    assert "left out of the means: local-center1 (seed 1)." in markdown
    console = Console(record=True, width=200)
    print_seed_summary(summary, console)
    assert "pooled external AUC over 3 seeds" in console.export_text()


@pytest.mark.parametrize("text, message", [("1", "at least two different seeds"), ("1,1", "at least two different"),
                                           ("0,x", "expected comma-separated integers")])
def test_seed_list_is_checked(text, message):
    with pytest.raises(HemexError, match=message):
        _seed_list(text)
    assert _seed_list("0, 2,5") == [0, 2, 5]


def test_simulate_seeds_runs_one_study_per_seed_in_its_own_folder(tmp_path, monkeypatch):
    import simulation.study
    from common.cli import main

    calls = []

    def fake_study(settings, out, **kwargs):  # the federations themselves are tested in test_federation
        calls.append((settings.seed, out, kwargs["leave_one_out"]))
        return metrics(0.7 + settings.seed / 100, 0.7, 0.9, -0.01)

    monkeypatch.setattr(simulation.study, "run_study", fake_study)
    data = tmp_path / "data"
    for center in ("a", "b", "c"):  # the centres are checked before any study starts
        (data / center).mkdir(parents=True)
        (data / center / "cases.csv").write_text("case_id,he\n", encoding="utf-8")
    code = main(["simulate", "--data", str(data), "--train-centers", "a,b", "--test-centers", "c", "--seeds", "4,2",
                 "--out", str(tmp_path / "run")])
    assert code == 0
    assert calls == [(4, tmp_path / "run" / "seed-4", False), (2, tmp_path / "run" / "seed-2", False)]
    summary = json.loads((tmp_path / "run" / "seeds.json").read_text(encoding="utf-8"))
    assert summary["seeds"] == [2, 4] and summary["arms"]["federated"]["auc"] == {"2": 0.72, "4": 0.74}
    assert (tmp_path / "run" / "seeds.md").is_file()
