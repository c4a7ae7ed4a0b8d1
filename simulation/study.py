"""`hemex simulate`: a whole multicentre study on this machine, through the federation.

One federation per fold (one fold, or one per held-out centre with leave-one-out) runs every
arm: the shared federated segmentation, on-site synthesis, then the federated, no-synthesis,
local-only and centralized classifiers, all scored together at the held-out centres. The study
then writes metrics.json (validated against its schema), report.md / report.html with figures,
and keeps each fold's model bundle under <fold>/federation/model.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from common.federation.progress import EVENTS_NAME, ProgressReader
from common.federation.settings import ARMS, FederationSettings
from common.files import write_json
from simulation.metrics import study_metrics
from simulation.report import write_report
from simulation.resources import PeakMemory
from simulation.run import run_local_federation

def folds_of(settings: FederationSettings, leave_one_out: bool) -> list[tuple[str, FederationSettings]]:
    """(name, settings) per federation to run: the given split, or each centre held out in turn."""
    if not leave_one_out:
        return [("", settings)]
    centers = settings.centers
    return [(f"holdout-{c}", replace(settings, test_centers=(c,),
                                     out_dir=str(Path(settings.out_dir).parent / f"holdout-{c}" / "federation")))
            for c in centers]


def run_study(settings: FederationSettings, out: Path, *, leave_one_out: bool = False, cohort: str | None = None,
              console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    settings = replace(settings, arms=ARMS, out_dir=str(out / "federation"),
                       cache_dir=settings.cache_dir or str(out / "site-cache"))  # shared by every fold
    started = time.time()
    reports = []
    runs = folds_of(settings, leave_one_out)
    with PeakMemory() as memory, Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        for index, (name, fold) in enumerate(runs, start=1):
            label = f"fold {index}/{len(runs)} " if len(runs) > 1 else ""
            task = progress.add_task(f"{label}starting the federation", total=None)

            events = Path(fold.out_dir) / EVENTS_NAME
            events.unlink(missing_ok=True)  # a previous run's events
            reader = ProgressReader(events)

            def log(line: str, task=task, label=label, reader=reader) -> None:
                # The bar follows the coordinator's progress events; its log lines are shown as they come.
                for event in reader.read():
                    progress.update(task, completed=event["step"], total=event["total"],
                                    description=f"{label}{event['stage']}")
                if "ERROR" in line or "hemex:" in line:
                    progress.console.print(f"  {label}{line.strip().removeprefix('hemex: ')}"[:200])

            reports.append(run_local_federation(fold, log=log))
            progress.update(task, description=f"{label}done")
    metrics = study_metrics(reports, Path(settings.data_root), settings.seed, cohort)
    elapsed = time.time() - started
    metrics["resources"] = {"seconds": elapsed, "peak_memory_gib": memory.peak_bytes / 2**30,
                            "cpus": os.cpu_count()}
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", {"study": {"leave_one_out": leave_one_out, "cohort": cohort, "out": str(out)},
                                     "run_config": settings.to_run_config(),
                                     "folds": [r["settings"] for r in reports]})
    md, html = write_report(metrics, reports, out, elapsed)
    print_study_summary(metrics, console)
    console.print(f"Peak memory of the study (all processes, PSS): {memory.peak_bytes / 2**30:.2f} GiB")
    console.print(f"Wrote {out}/metrics.json, {md.name}, {html.name}, figures and the model bundle(s) "
                  f"({', '.join(str(Path(r['settings']['out-dir']) / 'model') for r in reports)}) "
                  f"in {elapsed / 60:.1f} min")
    return metrics


def print_study_summary(metrics: dict, console: Console) -> None:
    table = Table(title="external AUC per arm (held-out centres; pooled = fixed-effect over centres)")
    centers = metrics["test_centers"]
    for column in ("arm", *centers, "pooled [95% CI]", "vs federated", "/ oracle"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for arm, slot in metrics["arms"].items():
        pooled = slot["pooled"]
        ci = pooled.get("auc_ci")
        cells = [_fmt(slot["centers"].get(c, {}).get("auc")) for c in centers]  # local-<c> is never scored at c
        pooled_text = f"{_fmt(pooled['auc'])} [{_fmt(ci[0])}-{_fmt(ci[1])}]" if ci else _fmt(pooled["auc"])
        comparison = pooled.get("vs_federated")
        versus = f"{comparison['diff']:+.3f} p={comparison['p']:.2f}" if comparison else "-"
        ratio = _fmt(pooled["auc"] / pooled["oracle_auc"], 2) if pooled.get("auc") and pooled.get("oracle_auc") else "-"
        table.add_row(arm, *cells, pooled_text, versus, ratio)
    oracle = metrics["arms"]["federated"]["pooled"].get("oracle_auc")
    if oracle:
        table.add_row("oracle", *[_fmt(metrics["arms"]["federated"]["centers"][c].get("oracle_auc")) for c in centers],
                      _fmt(oracle), "", "1.00")
    console.print(table)
    fed = metrics["arms"]["federated"]["pooled"]
    console.print(f"segmentation (shared, federated): Dice {_fmt(fed.get('dice'))}, volume MAE "
                  f"{_fmt(fed.get('volume_mae_ml'), 2)} mL on the held-out centres (model grid)"
                  + (f"; delivered mask on the scans' grids: Dice {_fmt(fed.get('dice_native'))}, volume MAE "
                     f"{_fmt(fed.get('volume_mae_native_ml'), 2)} mL; lesions < 5 mL: Dice "
                     f"{_fmt(fed.get('dice_native_small'))}" if "dice_native" in fed else ""))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
