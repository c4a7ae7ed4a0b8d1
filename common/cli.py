"""The `hemex` command: one subcommand per user task."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
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
        record = json.loads(record_path.read_text(encoding="utf-8"))
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


def cmd_train_cls(args) -> int:
    from common.training.classification.train_cls import run_train_cls

    overrides = {"epochs": args.epochs, "steps": args.steps, "max_seconds": args.max_seconds}
    def centers(values: list[str]) -> list[str]:  # "A,B,C" (as every other command) or "A B C"
        return [c.strip() for v in values for c in v.split(",") if c.strip()]

    run_train_cls(Path(args.data), centers(args.train_centers), centers(args.test_centers), Path(args.out),
                  profile=args.profile,
                  seed=args.seed, mask_source=args.mask_source, overrides=overrides, threads=args.threads)
    print(f"Wrote metrics.json, config.json, classifier weights, predictions and plots to {args.out}")
    return 0


def cmd_train_seg(args) -> int:
    from rich.console import Console

    from common.errors import ConfigError
    from common.training.central import RunRequest, run_train_seg

    def centers(value: str, flag: str) -> tuple[str, ...]:
        names = tuple(c.strip() for c in value.split(",") if c.strip())
        if not names:
            raise ConfigError(f"{flag} needs a comma-separated list of centre ids, got {value!r}")
        return names

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    overrides = {"model": args.model, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch}
    request = RunRequest(Path(args.data), centers(args.train_centers, "--train-centers"),
                         centers(args.test_centers, "--test-centers"), Path(args.out), args.profile, args.seed,
                         args.device, overrides)

    def on_epoch(record: dict) -> None:
        val = record["val_dice"]
        console.print(f"epoch {record['epoch']}: loss {record['train_loss']:.4f}"
                      + ("" if val != val else f", validation Dice {val:.3f}")
                      + f" ({record['train_seconds']:.0f} s)")

    metrics = run_train_seg(request, log=console.print, on_epoch=on_epoch)
    for center, stats in metrics["test"]["per_center"].items():
        console.print(f"{center}: Dice {stats['dice']['mean']:.3f}, IoU {stats['iou']['mean']:.3f}, "
                      f"HD95 {stats['hd95_mm']['median']:.1f} mm (median), "
                      f"|volume error| {stats['volume_abs_err_ml']['median']:.2f} mL (median)")
    console.print(f"Wrote {request.out}/model.safetensors, model.json, metrics.json, config.json")
    return 0


def cmd_synth(args) -> int:
    import torch

    from common.synthesis.run import run_synth

    if args.threads:
        torch.set_num_threads(args.threads)
    audit = run_synth(Path(args.data), args.center, Path(args.out), profile=args.profile, seed=args.seed,
                      ratio=args.ratio, generator=args.generator, train_steps=args.steps,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    memo = audit["memorization"]
    print(f"{args.center}: kept {memo['kept']} synthetic HE ROIs of {memo['needed']} needed "
          f"({memo['accepted']}/{memo['synthetic']} candidates passed the memorization audit, "
          f"threshold {memo['threshold']:.4f})")
    if audit["training"]:
        print(f"training {audit['training']['seconds_per_step']:.2f} s/step, "
              f"sampling {audit['timing']['seconds_per_sample'] or 0:.2f} s/sample")
    print(f"Wrote synthetic_he.npz, audit.json, quality.png, config.json to {args.out}")
    return 0


def cmd_certs(args) -> int:
    from common.federation.certs import create_dev_pki

    pki = create_dev_pki(Path(args.out), nodes=args.nodes or (), hosts=args.host, days=args.days)
    rows = [("ca.crt", "CA certificate: for every site, and flwr's root-certificates"),
            ("ca.key", "CA private key: keep it offline"),
            ("server.crt", f"SuperLink TLS certificate for {', '.join(pki.hosts)}"),
            ("server.key", "SuperLink TLS private key: coordinator only"),
            ("bundle.key", "Ed25519 key that signs model bundles: coordinator only (run-config bundle-key)"),
            ("bundle.pub", "its public key: sites trust it (hemex predict --trusted-key)")]
    for node in pki.node_keys:
        rows += [(f"nodes/{node}.key", f"SuperNode key of {node} (ECDSA SECP384R1, OpenSSH): site {node} only"),
                 (f"nodes/{node}.pub", "its public key: the coordinator registers it")]
    width = max(len(name) for name, _ in rows)
    print(f"Created a development PKI in {pki.root} (folder mode 0700, private keys 0600):")
    for name, what in rows:
        print(f"  {name:<{width}}  {what}")
    print("Next (README, Deployment; 8000 is Flower's default port):")
    print(f"  coordinator$ server/deploy/start-superlink.sh --certs {pki.root} --host 0.0.0.0 --port 8000")
    for _, public in pki.node_keys.values():
        print(f"  coordinator$ flwr supernode register {public} <connection>")
    for node, (private, _) in pki.node_keys.items():
        print(f"  site {node}$ client/deploy/start-supernode.sh --superlink {pki.hosts[0]}:8000 --ca ca.crt "
              f"--key {private.name} --center {node} --data-path /path/to/DATA_ROOT/{node}")
    return 0


def federation_settings(args, console) -> tuple[FederationSettings, str | None]:
    """Settings of `federate` / `simulate`: the given DATA_ROOT and centres, or the built-in
    synthetic cohort (generated once under --out, then reused) with its centre roles."""
    from common.federation.settings import FederationSettings, split_list
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
        train = split_list(args.train_centers) if args.train_centers else spec.train_centers
        test = split_list(args.test_centers) if args.test_centers else spec.test_centers
    else:
        if not args.train_centers or not (args.test_centers or getattr(args, "leave_one_out", False)):
            raise HemexError("--data needs --train-centers and --test-centers (comma-separated centre ids)")
        train = split_list(args.train_centers)
        test = split_list(args.test_centers) if args.test_centers else ()
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


def cmd_predict(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from common.inference.bundle import TRUSTED_KEY_ENV, load_bundle, trusted_key_path
    from common.inference.predict import predict_inputs

    trusted = trusted_key_path(args.trusted_key)
    if trusted is None:
        print(f"hemex predict: warning: the model bundle is checked against its checksums only; give --trusted-key "
              f"(or set {TRUSTED_KEY_ENV}) to verify the coordinator's signature", file=sys.stderr)
    bundle = load_bundle(Path(args.model), trusted_key=trusted)
    summary = predict_inputs(bundle, Path(args.input), Path(args.out), log=lambda line: print(line, flush=True))
    ok = len(summary["cases"]) - summary["failed"]
    print(f"Predicted {ok} of {len(summary['cases'])} case(s) with model {bundle.version}; "
          f"outputs and summary.json in {args.out}")
    return 1 if summary["failed"] else 0


def federation_arguments(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--data", default=None, help="DATA_ROOT (default: generate or reuse the --cohort synthetic cohort)")
    p.add_argument("--cohort", default="paper", help="built-in synthetic cohort used when --data is absent")
    p.add_argument("--train-centers", default=None, help="comma-separated training centres (default: the cohort's)")
    p.add_argument("--test-centers", default=None, help="comma-separated held-out centres (default: the cohort's)")
    p.add_argument("--out", default=out, help="run folder")
    p.add_argument("--profile", default="cpu", help="profile in configs/profiles (cpu, gpu, smoke) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="fedavg", help="fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum, multikrum")
    p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx proximal weight (with --strategy fedprox)")
    p.add_argument("--fedbn", action="store_true", help="keep normalisation layers local to each site (FedBN)")
    p.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                   help="> 0: server-side differential privacy (clipped site updates, Gaussian noise)")
    p.add_argument("--dp-clipping-norm", type=float, default=1.0, help="L2 bound of each site's update under DP")
    p.add_argument("--seg-rounds", type=int, default=3)
    p.add_argument("--seg-epochs", type=int, default=2, help="local segmentation epochs per round")
    p.add_argument("--ssl-rounds", type=int, default=0,
                   help="rounds of federated self-supervised pretraining of the classifier's encoder (0: none)")
    p.add_argument("--cls-rounds", type=int, default=3)
    p.add_argument("--cls-epochs", type=int, default=4, help="local classifier epochs per round")
    p.add_argument("--synthesis", default="1:2", help="on-site synthetic HE ROIs to reach HE:NHE = 1:2, 1:1, or none")
    p.add_argument("--bundle-key", default="",
                   help="Ed25519 key (hemex certs: bundle.key) that signs the model bundle")
    p.add_argument("--fresh", action="store_true",
                   help="start afresh instead of resuming from --out's checkpoints (resume = false)")
    p.add_argument("--min-aggregate-cases", type=int, default=5,
                   help="sites withhold aggregates (metrics, Dice summaries, histograms) of fewer cases")


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

    p = sub.add_parser("simulate", help="the main job: a whole simulated multicentre study (federated, local-only, "
                                        "centralized and no-synthesis arms) with metrics.json and a report")
    federation_arguments(p, "runs/simulate")
    p.add_argument("--leave-one-out", action="store_true",
                   help="one federation per centre, each centre held out in turn (all --train-centers)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: the study once per seed into OUT/seed-<n>/ (built-in cohort: a new "
                        "cohort draw each), then seeds.json / seeds.md across seeds (replaces --seed)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("federate", help="simulate a federation on this machine: one virtual site per centre, "
                                        "held-out centres evaluated only")
    federation_arguments(p, "runs/federate")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("check", help="validate a site's data against the data contract")
    p.add_argument("data_root", help="DATA_ROOT with one folder per centre")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train-cls", help="train the HE classifier (ViT on hematoma ROIs) centrally and evaluate "
                                         "it, with volume and marker baselines, on external centres")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--train-centers", nargs="+", required=True, help="centres to train on")
    p.add_argument("--test-centers", nargs="+", required=True, help="external centres, never used for any fitting")
    p.add_argument("--out", required=True, help="output folder (metrics.json, config.json, weights, plots)")
    p.add_argument("--profile", default="cpu", help="profile in configs/profiles (cpu, gpu) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask-source", default="reference", choices=["reference"],
                   help="hematoma masks the ROIs are centred on (segmentation-model masks: through the federation)")
    p.add_argument("--epochs", type=int, default=None, help="override classifier.epochs of the profile")
    p.add_argument("--steps", type=int, default=None, help="override classifier.steps (optimizer steps; > 0 wins over epochs)")
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock cap on ViT training")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_cls)
    p = sub.add_parser("synth", help="train a HE ROI generator on one centre, generate synthetic HE ROIs to reach "
                                     "a HE:NHE ratio, and audit them for memorization")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--center", required=True, help="the centre whose HE cases (reference masks) train the generator")
    p.add_argument("--out", required=True, help="output folder: synthetic_he.npz, audit.json, quality.png, config.json")
    p.add_argument("--profile", default="cpu", help="run profile in configs/profiles or a TOML file ([synthesis] section)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratio", default=None, help="target HE:NHE ratio: 1:2 (profile default), 1:1 or none")
    p.add_argument("--generator", choices=["ukan", "unet"], default=None,
                   help="ukan (Diffusion-UKAN) or unet (MONAI DiffusionModelUNet baseline); default from the profile")
    p.add_argument("--steps", type=int, default=None, help="override the profile's training steps")
    p.add_argument("--cache-dir", default=None,
                   help="keep the trained generator here and reuse it when data, settings and seed are unchanged")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_synth)
    p = sub.add_parser("certs", help="create a development CA, the SuperLink's TLS certificate and SuperNode "
                                     "authentication keys for a Flower deployment")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty; never overwritten)")
    p.add_argument("--nodes", default="", help="comma-separated node (centre) ids: one ECDSA SECP384R1 key pair "
                                               "each, in OpenSSH format (e.g. center1,center2,center3)")
    p.add_argument("--host", default="127.0.0.1",
                   help="comma-separated DNS names / IP addresses sites use to reach the SuperLink; the server "
                        "certificate is valid for them plus localhost and 127.0.0.1")
    p.add_argument("--days", type=int, default=365, help="server certificate validity in days")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("train-seg", help="train hematoma segmentation centrally and test it on unseen centres")
    p.add_argument("--data", required=True, help="DATA_ROOT with one folder per centre")
    p.add_argument("--train-centers", required=True, help="comma-separated training centre ids")
    p.add_argument("--test-centers", required=True, help="comma-separated external test centre ids")
    p.add_argument("--out", required=True, help="output folder for the model, metrics.json and config.json")
    p.add_argument("--model", default=None, help="architecture (umamba-bot, umamba-enc, unet, segresnet); "
                   "default: the profile's")
    p.add_argument("--profile", default="cpu", help="run profile in configs/profiles (cpu, gpu) or a TOML file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the profile's)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="batches per epoch (default: the profile's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("predict", help="hematoma mask, volume and HE probability for new NCCT scans "
                                       "(NIfTI file, DICOM series folder, or a folder of such cases)")
    p.add_argument("input", help="NIfTI file, DICOM series folder, or a folder of cases (batch)")
    p.add_argument("--model", required=True, help="model bundle folder (segmentation/, classifier/, manifest.json)")
    p.add_argument("--out", required=True, help="output folder: one subfolder per case plus summary.json")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--trusted-key", default=None,
                   help="the coordinator's bundle.pub: refuse a bundle it did not sign (default: $HEMEX_TRUSTED_KEY)")
    p.set_defaults(func=cmd_predict)
    return parser


class Terminated(BaseException):
    """SIGTERM (a job scheduler, `timeout`, systemd), raised like Ctrl-C so that every `finally`
    runs: a simulation stops its SuperLink and simulation runtime instead of leaving them running."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers live
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return args.func(args)
    except HemexError as err:
        print(f"hemex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hemex {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"hemex {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
