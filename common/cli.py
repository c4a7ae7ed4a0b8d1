"""The `hemex` command: one subcommand per user task."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.errors import HemexError


def cmd_phantoms(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from common.phantoms.cohort import load_cohort_spec
    from common.phantoms.report import print_cohort_summary

    console = Console(width=max(Console().width, 110))  # the summary table needs ~100 columns, even in logs
    out = Path(args.out)
    spec, _ = load_cohort_spec(args.cohort)
    record_path = out / "cohort.json"
    if args.reuse and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("cohort") == spec.name and record.get("seed") == args.seed:
            console.print(f"Reusing cohort {spec.name!r} (seed {args.seed}) at {out}")
            print_cohort_summary(record, console)
            return 0
        raise HemexError(f"{out}: holds cohort {record.get('cohort')!r} seed {record.get('seed')}, "
                         f"not {spec.name!r} seed {args.seed}; choose another --out")
    from common.phantoms.cohort import generate_cohort

    total = sum(c.n for c in spec.centers)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"Generating {spec.name} cohort", total=total)
        record = generate_cohort(args.cohort, out, seed=args.seed, workers=args.workers,
                                 progress=lambda done, _total: bar.update(task, completed=done))
    console.print(f"Wrote {total} cases to {out} in {record['seconds']:.0f} s")
    print_cohort_summary(record, console)
    if args.preview:
        from common.phantoms.preview import write_preview

        console.print(f"Preview: {write_preview(out, Path(args.preview))}")
    return 0


def cmd_check(args) -> int:
    from common.data.check import run_check

    return run_check(Path(args.data_root))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hemex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantoms", help="generate a synthetic multicentre NCCT cohort in the site data contract")
    p.add_argument("--out", required=True, help="output DATA_ROOT (must not exist or be empty)")
    p.add_argument("--cohort", default="paper", help="cohort name in configs/cohorts (paper, tiny, full) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: up to 2 cores)")
    p.add_argument("--preview", help="also write a PNG grid of axial slices through hematomas")
    p.add_argument("--reuse", action="store_true", help="if --out already holds this cohort and seed, only summarize it")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("check", help="validate a site's data against the data contract")
    p.add_argument("data_root", help="DATA_ROOT with one folder per centre")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HemexError as err:
        print(f"hemex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hemex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
