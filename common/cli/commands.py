"""The single-task commands: each reads its arguments, calls one `common/` function and prints
what it wrote. The federation commands are in federation.py, the argument parser in parser.py."""

from __future__ import annotations

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
    run_train_cls(Path(args.data), list(args.train_centers), list(args.test_centers), Path(args.out),
                  profile=args.profile, seed=args.seed, overrides=overrides, threads=args.threads)
    print(f"Wrote metrics.json, config.json, classifier weights, predictions and plots to {args.out}")
    return 0


def cmd_train_seg(args) -> int:
    from rich.console import Console

    from common.training.central import RunRequest, run_train_seg

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console()
    overrides = {"model": args.model, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch}
    request = RunRequest(Path(args.data), args.train_centers, args.test_centers, Path(args.out), args.profile,
                         args.seed, args.device, overrides)

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
