"""Terminal summary of a generated cohort (per centre n, HE, prevalence, oracle AUC, scanner)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_cohort_summary(record: dict, console: Console | None = None) -> None:
    console = console or Console()
    summary = record["summary"]
    roles = {c: "train" for c in summary.get("train_centers", [])} | {c: "external" for c in summary.get("test_centers", [])}
    table = Table(title=f"cohort {record['cohort']} (seed {record['seed']})")
    for column in ("centre", "role", "n", "HE", "prev %", "oracle AUC", "median mL", "lesion HU", "storage", "slice mm",
                   "pixel mm"):
        table.add_column(column, justify="left" if column in ("centre", "role", "storage") else "right")
    for center, s in summary["centers"].items():
        auc = f"{s['oracle_auc']:.3f}" if s["oracle_auc"] is not None else "-"
        table.add_row(center, roles.get(center, "-"), str(s["n"]), str(s["n_he"]), f"{100 * s['prevalence']:.1f}", auc,
                      f"{s['median_volume_ml']:.1f}", f"{s['median_lesion_hu']:.1f}", s["storage"], f"{s['slice_mm']:g}",
                      f"{s['inplane_mm']:g}")
    console.print(table)
    console.print(f"pooled oracle AUC (true risk vs label): {summary['oracle_auc_pooled']:.3f}")
