"""`hemex federate` and `hemex simulate`: their settings (a DATA_ROOT or the built-in synthetic
cohort), one study or one per seed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from common.cli.commands import cmd_phantoms
from common.errors import HemexError

if TYPE_CHECKING:
    from common.federation.settings import FederationSettings


def federation_settings(args, console) -> tuple[FederationSettings, str | None]:
    """Settings of `federate` / `simulate`: the given DATA_ROOT and centres, or the built-in
    synthetic cohort (generated once under --out, then reused) with its centre roles."""
    from common.federation.settings import FederationSettings
    from common.phantoms.cohort import load_cohort_spec
    from common.data.contract import list_centers
    from common.training.central import validate_centers

    cohort = None
    data = Path(args.data) if args.data else None
    if data is None:
        spec, _ = load_cohort_spec(args.cohort)
        cohort = spec.name
        data = Path(args.out) / f"cohort-{spec.name}-seed{args.seed}"
        cmd_phantoms(argparse.Namespace(cohort=args.cohort, out=str(data), seed=args.seed, workers=None,
                                        preview=str(Path(args.out) / "cohort-preview.png"), reuse=True))
        train = args.train_centers or spec.train_centers
        test = args.test_centers or spec.test_centers
    else:
        if not args.train_centers or not (args.test_centers or getattr(args, "leave_one_out", False)):
            raise HemexError("--data needs --train-centers and --test-centers (comma-separated centre ids)")
        train, test = args.train_centers, args.test_centers or ()
    # Before any Flower process starts: the data root and every named centre must exist.
    if test or len(train) < 2:
        validate_centers(data, train, test)
    else:  # leave-one-out: checked as a fold holding out one (existing) training centre
        held = next((c for c in train if c in list_centers(data)), train[0])
        rest = list(train)
        rest.remove(held)
        validate_centers(data, tuple(rest), (held,))
    settings = FederationSettings(
        data_root=str(data.resolve()), centers=tuple(train) + tuple(test), test_centers=tuple(test),
        profile=args.profile, seed=args.seed, strategy=args.strategy, proximal_mu=args.proximal_mu, fedbn=args.fedbn,
        dp_noise_multiplier=args.dp_noise_multiplier, dp_clipping_norm=args.dp_clipping_norm,
        seg_rounds=args.seg_rounds, seg_epochs=args.seg_epochs, ssl_rounds=args.ssl_rounds, cls_rounds=args.cls_rounds,
        cls_epochs=args.cls_epochs,
        synthesis=args.synthesis, min_aggregate_cases=args.min_aggregate_cases, resume=not args.fresh,
        bundle_key=str(Path(args.bundle_key).resolve()) if args.bundle_key else "",
        out_dir=str((Path(args.out) / "federation").resolve()))
    return settings, cohort


def cmd_federate(args) -> int:
    from rich.console import Console

    from simulation.run import run_local_federation
    from simulation.summary import print_federation_summary

    console = Console(width=max(Console().width, 110))
    settings, _ = federation_settings(args, console)
    console.print(f"Federation of {len(settings.centers)} simulated sites: train {', '.join(settings.train_centers)}; "
                  f"held out {', '.join(settings.test_centers)} (log: {settings.out_dir}/flower.log)")
    report = run_local_federation(settings, log=console.print)
    print_federation_summary(report, console)
    console.print(f"Wrote {settings.out_dir}/federation.json, config.json, checkpoints/ and the model bundle model/")
    return 0


def cmd_simulate(args) -> int:
    from rich.console import Console

    from simulation.study import run_study

    console = Console(width=max(Console().width, 110))
    if args.seeds:
        return _simulate_seeds(args, console)
    settings, cohort = federation_settings(args, console)
    if args.leave_one_out:
        console.print(f"Leave-one-centre-out study over {', '.join(settings.centers)}: one federation per held-out "
                      "centre")
    else:
        console.print(f"Study: train {', '.join(settings.train_centers)}; held out {', '.join(settings.test_centers)}; "
                      "arms: federated, no-synthesis, local-only per centre, centralized; baselines: volume-only, "
                      "markers-only")
    run_study(settings, Path(args.out), leave_one_out=args.leave_one_out, cohort=cohort, console=console)
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HemexError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise HemexError(f"--seeds {text!r}: give at least two different seeds (one seed: --seed)")
    return seeds


def _simulate_seeds(args, console) -> int:
    from simulation.seeds import print_seed_summary, seed_summary, write_seed_summary
    from simulation.study import run_study

    seeds, out = _seed_list(args.seeds), Path(args.out)
    runs = {}
    for index, seed in enumerate(seeds, start=1):
        console.rule(f"seed {seed} ({index}/{len(seeds)})")
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out / f"seed-{seed}")})
        settings, cohort = federation_settings(run_args, console)
        runs[seed] = run_study(settings, Path(run_args.out), leave_one_out=args.leave_one_out, cohort=cohort,
                               console=console)
    summary = seed_summary(runs)
    paths = write_seed_summary(summary, out)
    print_seed_summary(summary, console)
    console.print(f"Wrote {paths[0]} and {paths[1].name}; each seed's study in {out}/seed-<n>/")
    return 0
