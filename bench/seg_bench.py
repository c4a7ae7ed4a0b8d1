"""Segmentation benchmark: federated and central U-Mamba beside MONAI baselines, one wall-clock budget.

    .venv/bin/python bench/seg_bench.py [--data DATA_ROOT] [--models umamba-bot,segresnet,dynunet]
        [--budget-seconds 150] [--federated-rounds 3] [--profile cpu] [--seed N] [--out runs/seg_bench.json]

Every arm trains for the same wall-clock budget on the training centres of a cohort (profile
[segmentation] settings; the epochs are sized from one timed step so the learning-rate schedule
spans the budget): each architecture of --models centrally (the best validation epoch kept, as
`hemex train-seg`), and the first of them also federated (FedAvg in this process over the training
centres, the ClientApp's training call; the centres' training time adds up to the same budget).
Each is then scored on the external centres as hemex delivers masks (`bench/seg_downstream.py`):
Dice on the working grid and of the delivered mask on each scan's own grid (all lesions, < 5 mL),
volume errors, and the NCCT-marker baseline's external AUC on the delivered masks against the same
model on the reference masks, and on reference masks moved by one voxel at the boundary (the
ceiling). Step times come with ratios to SegResNet measured in the same run. Prints a table and
writes JSON (atomically).

Without --data the paper cohort of --seed is generated into runs/paper-seed<seed> if absent.
Choose settings on development seeds (not seed 0's external centres).
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
from common.files import seed_everything, versions, write_json  # noqa: E402
from common.networks import as_output_list  # noqa: E402
from common.data.contract import read_cohort  # noqa: E402
from common.training.central import (  # noqa: E402
    load_split,
    model_architecture,
    resolve_device,
    sample_cache,
    validate_centers,
    validate_model,
)
from common.training.checkpoint import build_model  # noqa: E402
from common.training.augment import window_tensor  # noqa: E402
from common.training.losses import DeepSupervisionDiceCE  # noqa: E402
from common.training.patches import PatchSampler  # noqa: E402
from common.training.segmentation import train_segmentation, uses_bf16  # noqa: E402
from common.training.settings import SegmentationSettings  # noqa: E402
from seg_downstream import MarkerModel, delivered_records, reference_aucs, reference_rows, summarize_arm  # noqa: E402

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
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=uses_bf16(settings.precision, device)):  # as training will run
            outputs = as_output_list(model(x))
        loss_fn([o.float() for o in outputs], y).backward()
        times.append(time.perf_counter() - start)
    return times[-1]


def epochs_for(budget_seconds: float, step_seconds: float, steps_per_epoch: int) -> int:
    """Epochs whose projected training time fills the budget (the learning-rate schedule spans them)."""
    return max(1, round(budget_seconds / max(step_seconds * steps_per_epoch, 1e-6)))


def train_budgeted(name: str, arch: dict, split, settings: SegmentationSettings, budget: float, step_seconds: float,
                   seed: int, device):
    """A central run of one architecture for `budget` seconds of training."""
    epochs = epochs_for(budget, step_seconds, settings.steps_per_epoch)
    seed_everything(seed)
    model = build_model(arch)
    result = train_segmentation(
        model, split.fit, epochs=epochs, steps_per_epoch=settings.steps_per_epoch, patch_size=settings.patch_size,
        batch_size=settings.batch_size, lr=settings.lr, seed=seed, device=device, val_samples=split.val or None,
        val_every=settings.val_every, optimizer=settings.optimizer, weight_decay=settings.weight_decay,
        schedule=settings.schedule, grad_clip=settings.grad_clip, foreground_fraction=settings.foreground_fraction,
        hard_negative_fraction=settings.hard_negative_fraction, precision=settings.precision, augment=settings.augment,
        roi_size=settings.inference_roi, sw_overlap=settings.sw_overlap, sw_batch_size=settings.sw_batch_size,
        satellite_mm=settings.satellite_mm, max_seconds=budget,
        progress=lambda r: print(f"  {name} epoch {r['epoch']}: loss {r['train_loss']:.4f}"
                                 + ("" if r["val_dice"] != r["val_dice"] else f", validation Dice {r['val_dice']:.3f}"),
                                 flush=True))
    return model, {"epochs": len(result.history), "steps": result.metrics["steps"],
                   "train_seconds": result.metrics["train_seconds_per_epoch"] * len(result.history)}


def train_federated(arch: dict, split, settings: SegmentationSettings, budget: float, step_seconds: float,
                    rounds: int, seed: int, device):
    """FedAvg over the training centres in this process: each round every centre runs the same
    training call as the ClientApp (`train_segmentation` from the global weights, one learning-rate
    schedule across rounds, no validation) and the weights are averaged by case count, as Flower's
    FedAvg does. The centres' training time adds up to `budget`, the central arms' budget."""
    centers = sorted({s.center for s in split.fit})
    per_call = budget / (rounds * len(centers))
    epochs = epochs_for(per_call, step_seconds, settings.steps_per_epoch)
    seed_everything(seed)
    model = build_model(arch)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    spent, steps = 0.0, 0
    for server_round in range(1, rounds + 1):
        states, weights = [], []
        for i, center in enumerate(centers):
            samples = [s for s in split.fit if s.center == center]
            model.load_state_dict(global_state)
            result = train_segmentation(
                model, samples, epochs=epochs, steps_per_epoch=settings.steps_per_epoch,
                patch_size=settings.patch_size, batch_size=settings.batch_size, lr=settings.lr,
                seed=seed * 1000 + server_round * 10 + i, device=device, optimizer=settings.optimizer,
                weight_decay=settings.weight_decay, schedule=settings.schedule,
                schedule_offset=(server_round - 1) * epochs * settings.steps_per_epoch,
                schedule_total=rounds * epochs * settings.steps_per_epoch, grad_clip=settings.grad_clip,
                foreground_fraction=settings.foreground_fraction,
                hard_negative_fraction=settings.hard_negative_fraction, precision=settings.precision, augment=settings.augment,
                restore_best=False, max_seconds=per_call)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(samples))
            spent += result.metrics["train_seconds_per_epoch"] * len(result.history)
            steps += int(result.metrics["steps"])
        total = float(sum(weights))
        global_state = {k: (sum(w * st[k].double() for w, st in zip(weights, states)) / total).to(v.dtype)
                        if v.is_floating_point() else states[0][k] for k, v in global_state.items()}
        print(f"  federated round {server_round}/{rounds} done ({spent:.0f} s of training so far)", flush=True)
    model.load_state_dict(global_state)
    return model, {"epochs": epochs * rounds, "steps": steps, "train_seconds": spent}


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
    settings = SegmentationSettings.from_profile(profile)
    cache = sample_cache(profile)
    device = resolve_device(args.device)
    split = load_split(data, train_centers, test_centers, settings, cache, args.seed)
    print(f"loaded {len(split.fit)} training, {len(split.val)} validation and {len(split.test)} external cases "
          f"in {split.load_seconds:.0f} s")
    cohort = read_cohort(data, list(train_centers) + list(test_centers))
    train_cases = [c for center in train_centers for c in cohort[center]]
    test_cases = [c for center in test_centers for c in cohort[center] if c.mask_path is not None]
    markers = MarkerModel(train_cases)
    references = reference_rows(test_cases, args.seed)
    ceiling = reference_aucs(references, markers)
    print(f"marker baseline ({markers.n_train} training cases), external AUC: reference masks "
          f"{ceiling['reference']:.3f}, one-voxel-perturbed reference masks {ceiling['one_voxel_perturbed']:.3f}")

    arms = [(name, name, "central") for name in models]
    if args.federated_rounds:
        arms.insert(1, (f"{settings.model} federated", settings.model, "federated"))
    rows = []
    for label, name, kind in arms:
        model_settings = SegmentationSettings.from_profile(profile, model=name)
        arch = model_architecture(model_settings, cache)
        step_seconds = timed_training_step(arch, split, model_settings, cache.windows, args.seed, device)
        print(f"{label}: {step_seconds:.2f} s/step, training for {args.budget_seconds:.0f} s", flush=True)
        start = time.perf_counter()
        if kind == "federated":
            model, trained = train_federated(arch, split, model_settings, args.budget_seconds, step_seconds,
                                             args.federated_rounds, args.seed, device)
        else:
            model, trained = train_budgeted(label, arch, split, model_settings, args.budget_seconds, step_seconds,
                                            args.seed, device)
        records = delivered_records(model, split.test, test_cases, model_settings)
        row = {"arm": label, "model": name, "kind": kind, "parameters": sum(p.numel() for p in model.parameters()),
               "step_seconds": step_seconds, **trained, "total_seconds": time.perf_counter() - start,
               **summarize_arm(records, references, markers), "per_case": records}
        row["marker_auc_loss"] = ceiling["reference"] - row["marker_auc"]
        rows.append(row)
        print(f"{label}: delivered Dice {row['dice_native']:.3f}, volume MAE {row['volume_mae_ml']:.2f} mL, "
              f"marker AUC {row['marker_auc']:.3f} ({row['total_seconds']:.0f} s)", flush=True)
    reference = next((r for r in rows if r["model"] == REFERENCE), None)
    for row in rows:
        if reference is not None:
            row[f"ratios_to_{REFERENCE}"] = {k: row[k] / reference[k] for k in ("parameters", "step_seconds")}
    central_umamba = next((r for r in rows if r["arm"] == settings.model), None)
    federated = next((r for r in rows if r["kind"] == "federated"), None)
    report = {
        "data": str(data), "train_centers": list(train_centers), "test_centers": list(test_centers),
        "profile": profile["name"], "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
        "budget_seconds": args.budget_seconds, "federated_rounds": args.federated_rounds,
        "segmentation": settings.as_dict(), "cases": {"train": len(split.fit), "validation": len(split.val),
                                                      "test": len(split.test)},
        "marker_auc": ceiling, "marker_training_cases": markers.n_train,
        "federated_over_central": (federated["dice_native"] / central_umamba["dice_native"]
                                   if federated and central_umamba else None),
        "versions": versions(), "arms": rows,
    }
    write_json(Path(args.out), report)
    print_table(rows, ceiling, report["federated_over_central"])
    print(f"wrote {args.out}")
    return report


def print_table(rows: list[dict], ceiling: dict, federated_ratio) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    table = Table(title="External centres, same training budget per arm: delivered masks on the scans' grids")
    columns = ("arm", "params", "s/step", f"x {REFERENCE}", "steps", "Dice grid", "Dice", "Dice <5 mL",
               "|dV| median", "|dV| mean", "marker AUC", "AUC loss")
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for r in rows:
        ratio = r.get(f"ratios_to_{REFERENCE}", {}).get("step_seconds")
        table.add_row(r["arm"], f"{r['parameters']:,d}", f"{r['step_seconds']:.2f}",
                      "" if ratio is None else f"{ratio:.2f}", str(int(r["steps"])), f"{r['dice_grid']:.3f}",
                      f"{r['dice_native']:.3f}", f"{r['dice_native_small']:.3f} (n={r['n_small']})",
                      f"{r['volume_median_abs_err_ml']:.2f}", f"{r['volume_mae_ml']:.2f}", f"{r['marker_auc']:.3f}",
                      f"{r['marker_auc_loss']:+.3f}")
    console.print(table)
    console.print(f"Marker baseline on reference masks {ceiling['reference']:.3f}; on reference masks moved by one "
                  f"voxel at the boundary {ceiling['one_voxel_perturbed']:.3f} (the ceiling of any segmentation). "
                  + ("" if federated_ratio is None else f"Federated / central U-Mamba delivered Dice: "
                                                        f"{federated_ratio:.3f}."))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="DATA_ROOT (default: the paper cohort in runs/paper-seed<seed>, generated "
                                       "if absent)")
    parser.add_argument("--models", default="umamba-bot,segresnet,dynunet",
                        help="comma-separated architectures trained centrally (the first is also federated)")
    parser.add_argument("--train-centers", help="comma-separated (default: the cohort's training centres)")
    parser.add_argument("--test-centers", help="comma-separated (default: the cohort's external centres)")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--budget-seconds", type=float, default=150.0,
                        help="training wall-clock seconds per arm (the federated arm's sites add up to it)")
    parser.add_argument("--federated-rounds", type=int, default=3, help="rounds of the federated arm (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
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
