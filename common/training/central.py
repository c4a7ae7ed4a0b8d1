"""A central segmentation run (`hemex train-seg`): train on some centres, test on others.

Steps: validate the request, load the training centres' cases (those with masks), hold out a
validation split per centre, train, evaluate the best checkpoint on the test centres, and
write DIR/model.safetensors + model.json, DIR/metrics.json and DIR/config.json.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from common.config import load_profile
from common.data.contract import list_centers, read_cohort
from common.data.dataset import SampleCache, split_by_center, with_masks
from common.errors import ConfigError
from common.networks import list_models
from common.training.checkpoint import architecture, build_model, save_checkpoint, write_json_atomic
from common.training.evaluation import evaluate_segmentation
from common.training.segmentation import seed_everything, train_segmentation
from common.training.settings import SegmentationSettings

IN_CHANNELS_PER_WINDOW = 1
OUT_CHANNELS = 2  # background, hematoma


@dataclass(frozen=True)
class RunRequest:
    data: Path
    train_centers: tuple[str, ...]
    test_centers: tuple[str, ...]
    out: Path
    profile: str = "cpu"
    seed: int = 0
    device: str = "auto"
    overrides: dict | None = None  # SegmentationSettings fields from the command line (None = profile value)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid device {name!r}: {err}") from err


def validate_centers(data: Path, train: tuple[str, ...], test: tuple[str, ...]) -> None:
    """ConfigError for an empty, unknown, repeated or overlapping centre list."""
    available = list_centers(data)
    for role, centers in (("train", train), ("test", test)):
        if not centers:
            raise ConfigError(f"--{role}-centers is empty; available centres: {', '.join(available)}")
        unknown = [c for c in centers if c not in available]
        if unknown:
            raise ConfigError(f"--{role}-centers: unknown centre(s) {', '.join(unknown)} in {data}; "
                              f"available: {', '.join(available)}")
        if len(set(centers)) != len(centers):
            raise ConfigError(f"--{role}-centers lists a centre twice: {', '.join(centers)}")
    both = sorted(set(train) & set(test))
    if both:
        raise ConfigError(f"centre(s) {', '.join(both)} are in both --train-centers and --test-centers; "
                          "test centres must be unseen in training")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("hemex", "torch", "monai", "mambapy", "numpy", "SimpleITK", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_train_seg(request: RunRequest, log: Callable[[str], None] = print,
                  on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Run everything and write the outputs; returns the metrics record."""
    profile = load_profile(request.profile)
    settings = SegmentationSettings.from_profile(profile, **(request.overrides or {}))
    if settings.model not in list_models():
        raise ConfigError(f"unknown model {settings.model!r}; available: {', '.join(list_models())}")
    validate_centers(request.data, request.train_centers, request.test_centers)
    device = resolve_device(request.device)
    preprocess = profile["preprocess"]
    windows = preprocess.get("windows")
    cache = SampleCache(preprocess["spacing"], windows) if windows else SampleCache(preprocess["spacing"])
    arch = architecture(settings.model, len(cache.windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS,
                        settings.model_overrides)
    seed_everything(request.seed)
    model = build_model(arch)  # built before any data is read: a bad model setting fails fast

    cohort = read_cohort(request.data, list(request.train_centers) + list(request.test_centers))
    train_cases, skipped = with_masks([c for center in request.train_centers for c in cohort[center]], "training")
    test_cases, skipped_test = with_masks([c for center in request.test_centers for c in cohort[center]],
                                          "evaluation")
    skipped += skipped_test
    for item in skipped:
        log(f"skipped {item.center}/{item.case_id}: {item.reason}")
    if not train_cases:
        raise ConfigError(f"no training case with a hematoma mask in {', '.join(request.train_centers)}")
    if not test_cases:
        raise ConfigError(f"no test case with a hematoma mask in {', '.join(request.test_centers)}")
    fit_cases, val_cases = split_by_center(train_cases, settings.val_fraction, request.seed)
    if settings.max_val_cases:  # the cap keeps validation cheap; the rest of the held-out cases train
        fit_cases += val_cases[settings.max_val_cases:]
        val_cases = val_cases[: settings.max_val_cases]

    start = time.perf_counter()
    log(f"loading {len(train_cases)} training and {len(test_cases)} test cases at {cache.spacing} mm")
    fit_samples, val_samples = cache.load(fit_cases), cache.load(val_cases)
    test_samples = cache.load(test_cases)
    load_seconds = time.perf_counter() - start
    log(f"training {settings.model} on {len(fit_samples)} cases (validation {len(val_samples)}) on {device}")
    result = train_segmentation(
        model, fit_samples, epochs=settings.epochs, steps_per_epoch=settings.steps_per_epoch,
        patch_size=settings.patch_size, batch_size=settings.batch_size, lr=settings.lr, seed=request.seed,
        device=device, val_samples=val_samples or None, val_every=settings.val_every, optimizer=settings.optimizer,
        weight_decay=settings.weight_decay, momentum=settings.momentum, schedule=settings.schedule,
        grad_clip=settings.grad_clip, foreground_fraction=settings.foreground_fraction, augment=settings.augment,
        roi_size=settings.inference_roi, sw_overlap=settings.sw_overlap, sw_batch_size=settings.sw_batch_size,
        progress=on_epoch,
    )
    log(f"evaluating on {len(test_samples)} cases of {', '.join(request.test_centers)}")
    evaluation = evaluate_segmentation(model, test_samples, settings.inference_roi, overlap=settings.sw_overlap,
                                       sw_batch_size=settings.sw_batch_size, device=device)

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": "train-seg", "data": str(request.data), "profile": profile["name"], "seed": request.seed,
        "device": str(device), "train_centers": list(request.train_centers),
        "test_centers": list(request.test_centers), "preprocess": {"spacing": list(cache.spacing),
                                                                   "windows": [list(w) for w in cache.windows]},
        "segmentation": settings.as_dict(), "architecture": arch, "versions": package_versions(),
        "split": {"train": [c.case_id for c in fit_cases], "validation": [c.case_id for c in val_cases],
                  "test": [c.case_id for c in test_cases]},
    }
    metrics = {
        "model": settings.model, "parameters": sum(p.numel() for p in model.parameters()),
        "training": {**result.metrics, "load_seconds": load_seconds}, "history": result.history,
        "test": evaluation, "skipped": [s.as_dict() for s in skipped],
    }
    save_checkpoint(out, result.best_state, arch, {"seed": request.seed, "profile": profile["name"],
                                                   "train_centers": list(request.train_centers),
                                                   "best_epoch": result.best_epoch,
                                                   "val_dice": result.metrics["val_dice"]})
    write_json_atomic(out / "metrics.json", metrics)
    write_json_atomic(out / "config.json", config)
    return metrics
