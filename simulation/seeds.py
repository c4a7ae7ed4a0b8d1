"""Several seeds of one study, summarised: what holds across cohort draws, not on one.

An external AUC here rests on ~20 HE cases (SE ~0.06), so one seed cannot tell two arms apart or
show whether a model reaches a fraction of the oracle. `hemex simulate --seeds 0,1,2` runs the
study once per seed (on the built-in cohort: a new cohort draw per seed; on --data: new training
randomness on the same cases) into RUN_DIR/seed-<n>/, then writes seeds.json and seeds.md here:
per arm the pooled external AUC of every seed with its mean and SD, the mean AUC / oracle ratio,
and the paired difference to the federated arm with how many seeds the federated arm was ahead.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rich.table import Table

from common.files import write_json

FORMAT = "hemex-seed-summary/1"


def _mean_sd(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n_seeds": len(values)}


def seed_summary(runs: dict[int, dict]) -> dict:
    """The summary of {seed: that seed's metrics.json}. A seed where an arm has no pooled AUC (e.g.
    a held-out set without both classes) is left out of that arm's figures and counted."""
    seeds = sorted(runs)
    arms: dict[str, dict] = {}
    for arm in runs[seeds[0]]["arms"]:
        auc, ratio, diff, ahead, missing = {}, {}, {}, 0, []
        for seed in seeds:
            pooled = runs[seed]["arms"].get(arm, {}).get("pooled", {})
            if pooled.get("auc") is None:
                missing.append(seed)
                continue
            auc[seed] = pooled["auc"]
            if pooled.get("oracle_auc"):
                ratio[seed] = pooled["auc"] / pooled["oracle_auc"]
            versus = pooled.get("vs_federated")
            if versus:
                # vs_federated.diff is this arm minus the federated arm (the report's "vs federated").
                diff[seed] = versus["diff"]
                ahead += versus["diff"] <= 0
        arms[arm] = {"auc": {str(s): v for s, v in auc.items()}, "auc_summary": _mean_sd(list(auc.values())),
                     "oracle_ratio": {str(s): v for s, v in ratio.items()},
                     "oracle_ratio_summary": _mean_sd(list(ratio.values())),
                     "vs_federated": ({"diff": {str(s): v for s, v in diff.items()},
                                       "summary": _mean_sd(list(diff.values())),
                                       "federated_ahead_or_equal": ahead} if diff else None),
                     "seeds_without_auc": missing}
    oracle = [runs[s]["arms"]["federated"]["pooled"].get("oracle_auc") for s in seeds]
    return {"format": FORMAT, "seeds": seeds, "cohort": runs[seeds[0]].get("cohort"),
            "test_centers": runs[seeds[0]]["test_centers"], "arms": arms,
            "oracle_auc": _mean_sd([v for v in oracle if v is not None])}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _spread(summary: dict | None, digits: int = 3) -> str:
    if not summary:
        return "-"
    sd = f" ± {summary['sd']:.{digits}f}" if summary["sd"] is not None else ""
    return f"{summary['mean']:.{digits}f}{sd}"


def summary_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-arm table, shared by the terminal and seeds.md."""
    seeds = summary["seeds"]
    header = ["arm", *[f"seed {s}" for s in seeds], "mean ± SD", "/ oracle (mean)", "vs federated (mean)",
              "federated >= arm"]
    rows = []
    for arm, slot in summary["arms"].items():
        versus = slot["vs_federated"]
        rows.append([arm, *[_fmt(slot["auc"].get(str(s))) for s in seeds], _spread(slot["auc_summary"]),
                     _spread(slot["oracle_ratio_summary"], 2),
                     f"{versus['summary']['mean']:+.3f}" if versus else "-",
                     f"{versus['federated_ahead_or_equal']}/{versus['summary']['n_seeds']}" if versus else "-"])
    if summary["oracle_auc"]:
        rows.append(["oracle", *["" for _ in seeds], _spread(summary["oracle_auc"]), "1.00", "", ""])
    return header, rows


def write_seed_summary(summary: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    header, rows = summary_rows(summary)
    lines = [f"# hemex study over {len(summary['seeds'])} seeds", "",
             f"Cohort: **{summary['cohort'] or 'given DATA_ROOT'}**; held-out centres "
             f"{', '.join(summary['test_centers'])}; seeds {', '.join(map(str, summary['seeds']))} "
             "(each seed's own report is in seed-<n>/report.md).", "",
             "Pooled external AUC per seed (fixed-effect over the held-out centres), its mean ± SD over seeds, the "
             "mean of the per-seed AUC / oracle ratios, and the mean paired difference arm - federated with the "
             "number of seeds where the federated arm was at least as good.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    gaps = [f"{arm} (seed {', '.join(map(str, slot['seeds_without_auc']))})"
            for arm, slot in summary["arms"].items() if slot["seeds_without_auc"]]
    if gaps:
        lines += ["", "No pooled AUC (a held-out set without both classes, or an arm that returned none), left out of "
                      "the means: " + "; ".join(gaps) + "."]
    md = out / "seeds.md"
    write_json(out / "seeds.json", summary)
    tmp = md.with_name(f".{md.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(md)
    return out / "seeds.json", md


def print_seed_summary(summary: dict, console) -> None:
    header, rows = summary_rows(summary)
    table = Table(title=f"pooled external AUC over {len(summary['seeds'])} seeds")
    for column in header:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
