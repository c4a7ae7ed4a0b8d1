"""Terminal summary of a federation report (federation.json): per-centre results and traffic."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_federation_summary(report: dict, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 110))
    seg = report["stages"].get("seg", {}).get("final", {})
    cls = report["stages"].get("cls", {}).get("final", {})
    table = Table(title="federation: final models at every centre (held-out centres never trained)")
    for column in ("centre", "role", "seg n", "Dice", "IoU", "HD95 mm", "|dV| median mL", "cls n", "HE", "AUC", "Brier",
                   "sens", "spec"):
        table.add_column(column, justify="left" if column in ("centre", "role") else "right")
    for center, info in report.get("centers", {}).items():
        s, c = seg.get(center, {}), cls.get(center, {})
        table.add_row(center, "external" if info.get("role") == "test" else "train-val",
                      str(s.get("num-examples", "-")), _fmt(s.get("dice")), _fmt(s.get("iou")),
                      _fmt(s.get("hd95-mm"), 1), _fmt(s.get("volume-median-abs-err-ml"), 2), str(c.get("num-examples", "-")),
                      str(c.get("num-he", "-")), _fmt(c.get("auc")), _fmt(c.get("brier")), _fmt(c.get("sensitivity"), 2),
                      _fmt(c.get("specificity"), 2))
    console.print(table)
    point = report["stages"].get("cls", {}).get("operating_point")
    if point:
        console.print(f"operating point fixed on training centres: threshold {point['threshold']:.3f} "
                      f"(Platt a={point['calib-a']:.2f}, b={point['calib-b']:.2f}, n={point['n']})")
    sizes = report.get("model_bytes", {})
    timing = report.get("timing", {})
    console.print("model size per message: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items())
                  + f"; total {timing.get('total_seconds', 0) / 60:.1f} min")
