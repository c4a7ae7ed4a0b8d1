"""Segmentation benchmark: every registered architecture, one budget, external centres.

    .venv/bin/python bench/seg_bench.py [--data DATA_ROOT] [--models umamba-bot,unet,...]
        [--epochs N] [--steps-per-epoch N] [--profile cpu] [--out runs/seg_bench.json]

Trains each architecture with the same settings (profile [segmentation] section: patch
size, batch size, epochs x steps, optimizer, schedule, validation) on the training centres
of a cohort, evaluates its best checkpoint on the external centres, and reports per centre
Dice / IoU / HD95 / absolute volume error, parameter count, training time per epoch and
inference time per scan, with ratios to SegResNet measured in the same run. Prints a table
and writes JSON (atomically).

Without --data the paper cohort (seed 0) is generated into runs/paper-seed0 if absent, the
folder `make simulate` uses. Before training, one timed training step per architecture
projects its training time; an architecture whose projection exceeds --max-train-minutes is
skipped and the reason recorded (on CPUs this is usually U-Mamba-Enc, whose full-resolution
Mamba layer scans every voxel of the patch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.config import load_profile  # noqa: E402
from common.errors import HemexError  # noqa: E402
from common.networks import as_output_list, list_models  # noqa: E402
from common.training.central import (  # noqa: E402
    load_split,
    model_architecture,
    package_versions,
    resolve_device,
    sample_cache,
    train_and_evaluate,
    validate_centers,
    validate_model,
)
from common.training.checkpoint import build_model, write_json_atomic  # noqa: E402
from common.training.augment import window_tensor  # noqa: E402
from common.training.losses import DeepSupervisionDiceCE  # noqa: E402
from common.training.patches import PatchSampler  # noqa: E402
from common.training.settings import SegmentationSettings  # noqa: E402

DEFAULT_DATA = REPO / "runs" / "paper-seed0"
REFERENCE = "segresnet"  # ratios are relative to MONAI SegResNet, as the issue asks


def ensure_cohort(data: Path | None, seed: int) -> Path:
    """The given cohort, or the paper cohort generated into runs/paper-seed<seed> if absent."""
    if data is not None:
        return data
    root = DEFAULT_DATA.with_name(f"paper-seed{seed}")
    if not (root / "cohort.json").is_file():
        from common.phantoms.cohort import generate_cohort

        print(f"generating the paper cohort (seed {seed}) into {root} (a few minutes)")
        generate_cohort("paper", root, seed=seed)
    return root


def cohort_roles(data: Path) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """Training and external centres recorded by a synthetic cohort (cohort.json), if any."""
    record_path = data / "cohort.json"
    if not record_path.is_file():
        return None
    config = json.loads(record_path.read_text(encoding="utf-8")).get("config", {})
    train, test = tuple(config.get("train_centers", ())), tuple(config.get("test_centers", ()))
    return (train, test) if train and test else None


def timed_training_step(arch: dict, split, settings: SegmentationSettings, windows, seed: int, device) -> float:
    """Seconds of one training step (forward, loss, backward) after a warm-up step."""
    torch.manual_seed(seed)
    model = build_model(arch).to(device).train()
    sampler = PatchSampler(split.fit, settings.patch_size, settings.foreground_fraction,
                           np.random.default_rng(seed))
    loss_fn = DeepSupervisionDiceCE()
    times = []
    for _ in range(2):
        hu, labels = sampler.batch(settings.batch_size)
        x, y = window_tensor(torch.from_numpy(hu), windows).to(device), torch.from_numpy(labels).long().to(device)
        start = time.perf_counter()
        loss_fn(as_output_list(model(x)), y).backward()
        times.append(time.perf_counter() - start)
    return times[-1]


def model_row(name: str, trained, seconds: float) -> dict:
    evaluation = trained.evaluation
    per_case = evaluation["per_case"]
    return {
        "model": name,
        "status": "trained",
        "parameters": trained.parameters,
        "architecture": trained.arch,
        "train_seconds_per_epoch": trained.result.metrics["train_seconds_per_epoch"],
        "inference_seconds_per_scan": float(np.mean([c["inference_seconds"] for c in per_case])),
        "best_epoch": trained.result.best_epoch,
        "val_dice": trained.result.metrics["val_dice"],
        "total_seconds": seconds,
        "per_center": evaluation["per_center"],
        "overall": evaluation["overall"],
        "history": trained.result.history,
        "per_case": per_case,
    }


def add_ratios(rows: list[dict]) -> None:
    reference = next((r for r in rows if r["model"] == REFERENCE and r["status"] == "trained"), None)
    for row in rows:
        if row["status"] != "trained" or reference is None:
            continue
        row[f"ratios_to_{REFERENCE}"] = {
            key: row[key] / reference[key]
            for key in ("parameters", "train_seconds_per_epoch", "inference_seconds_per_scan")
        }


def print_tables(rows: list[dict], test_centers) -> None:
    """Two tables: cost per architecture (with ratios to SegResNet), accuracy per external centre."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))  # piped output: do not squeeze to 80 columns
    cost = Table(title=f"Cost (ratio to {REFERENCE} measured in this run)")
    for column in ("model", "parameters", "train s/epoch", "inference s/scan", "note"):
        cost.add_column(column, justify="left" if column in ("model", "note") else "right")
    for row in rows:
        if row["status"] != "trained":
            cost.add_row(row["model"], "", "", "", f"skipped: {row['reason']}")
            continue
        ratios = row.get(f"ratios_to_{REFERENCE}", {})

        def with_ratio(key: str, fmt: str) -> str:
            text = format(row[key], fmt)
            return f"{text} (x{ratios[key]:.2f})" if key in ratios else text

        cost.add_row(row["model"], with_ratio("parameters", ",d"), with_ratio("train_seconds_per_epoch", ".1f"),
                     with_ratio("inference_seconds_per_scan", ".2f"),
                     f"best epoch {row['best_epoch']}, validation Dice {row['val_dice']:.3f}")
    console.print(cost)

    accuracy = Table(title="External centres: Dice, IoU (mean over cases); HD95, |volume error| (median)")
    for column in ("model", "centre", "cases", "Dice", "Dice median", "IoU", "HD95 mm", "|dV| mL",
                   "|dV| mL stored grid"):
        accuracy.add_column(column, justify="left" if column in ("model", "centre") else "right")
    for row in rows:
        if row["status"] != "trained":
            continue
        for i, center in enumerate([*test_centers, "all"]):
            stats = row["overall"] if center == "all" else row["per_center"][center]
            accuracy.add_row(row["model"] if i == 0 else "", center, str(stats["dice"]["n"]),
                             f"{stats['dice']['mean']:.3f}", f"{stats['dice']['median']:.3f}",
                             f"{stats['iou']['mean']:.3f}", f"{stats['hd95_mm']['median']:.1f}",
                             f"{stats['abs_vol_err_ml']['median']:.2f}",
                             f"{stats['abs_vol_err_original_ml']['median']:.2f}")
        accuracy.add_section()
    console.print(accuracy)
    console.print("|dV|: on the working grid; 'stored grid': the prediction mapped back onto the stored scan "
                  "and compared with the stored mask.")


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = ensure_cohort(Path(args.data) if args.data else None, args.seed)
    roles = cohort_roles(data)
    train_centers = tuple(args.train_centers.split(",")) if args.train_centers else (roles or ((), ()))[0]
    test_centers = tuple(args.test_centers.split(",")) if args.test_centers else (roles or ((), ()))[1]
    validate_centers(data, train_centers, test_centers)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in models:
        validate_model(name)
    profile = load_profile(args.profile)
    settings = SegmentationSettings.from_profile(profile, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch)
    cache = sample_cache(profile)
    device = resolve_device(args.device)
    split = load_split(data, train_centers, test_centers, settings, cache, args.seed)
    print(f"loaded {len(split.fit)} training, {len(split.val)} validation and {len(split.test)} external cases "
          f"in {split.load_seconds:.0f} s")

    total_steps = settings.epochs * settings.steps_per_epoch
    rows = []
    for name in models:
        model_settings = SegmentationSettings.from_profile(profile, model=name, epochs=settings.epochs,
                                                           steps_per_epoch=settings.steps_per_epoch)
        arch = model_architecture(model_settings, cache)
        step_seconds = timed_training_step(arch, split, model_settings, cache.windows, args.seed, device)
        projected_minutes = step_seconds * total_steps / 60
        if args.max_train_minutes and projected_minutes > args.max_train_minutes:
            reason = (f"projected training {projected_minutes:.0f} min ({step_seconds:.1f} s/step x {total_steps} "
                      f"steps) > --max-train-minutes {args.max_train_minutes:g}")
            print(f"{name}: skipped: {reason}")
            rows.append({"model": name, "status": "skipped", "reason": reason, "step_seconds": step_seconds})
            continue
        print(f"{name}: training {total_steps} steps (~{projected_minutes:.1f} min projected)")
        start = time.perf_counter()
        trained = train_and_evaluate(
            arch, split, model_settings, args.seed, device,
            on_epoch=lambda r, n=name: print(f"  {n} epoch {r['epoch']}: loss {r['train_loss']:.4f}"
                                             + ("" if r["val_dice"] != r["val_dice"] else
                                                f", validation Dice {r['val_dice']:.3f}")
                                             + f" ({r['train_seconds']:.0f} s)", flush=True))
        rows.append(model_row(name, trained, time.perf_counter() - start))
        print(f"{name}: external Dice {trained.evaluation['overall']['dice']['mean']:.3f} "
              f"({rows[-1]['total_seconds']:.0f} s)", flush=True)
    add_ratios(rows)
    report = {
        "data": str(data), "train_centers": list(train_centers), "test_centers": list(test_centers),
        "profile": profile["name"], "seed": args.seed, "device": str(device),
        "threads": torch.get_num_threads(), "segmentation": settings.as_dict(),
        "cases": {"train": len(split.fit), "validation": len(split.val), "test": len(split.test)},
        "skipped_cases": [s.as_dict() for s in split.skipped], "load_seconds": split.load_seconds,
        "versions": package_versions(), "models": rows,
    }
    write_json_atomic(Path(args.out), report)
    print_tables(rows, test_centers)
    print(f"wrote {args.out}")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="DATA_ROOT (default: the paper cohort in runs/paper-seed<seed>, generated "
                                       "if absent)")
    parser.add_argument("--models", default=",".join(list_models()),
                        help="comma-separated architectures (default: all registered)")
    parser.add_argument("--train-centers", help="comma-separated (default: the cohort's training centres)")
    parser.add_argument("--test-centers", help="comma-separated (default: the cohort's external centres)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="default: the profile's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--max-train-minutes", type=float, default=15.0,
                        help="skip an architecture whose projected training time exceeds this (0: never skip)")
    parser.add_argument("--out", default=str(REPO / "runs" / "seg_bench.json"), help="JSON report path")
    args = parser.parse_args(argv)
    try:
        run(args)
    except HemexError as err:
        print(f"seg_bench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
