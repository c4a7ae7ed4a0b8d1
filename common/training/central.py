"""A central segmentation run (`hemex train-seg`): train on some centres, test on others.

Steps: validate the request, load the training centres' cases (those with masks), hold out a
validation split per centre, train, evaluate the best checkpoint on the test centres, and
write DIR/model.safetensors + model.json, DIR/metrics.json and DIR/config.json.
`load_split` and `train_and_evaluate` are shared with bench/seg_bench.py, which trains
several architectures on one loaded split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.config import load_profile
from common.data.contract import Case, list_centers, read_cohort
from common.data.dataset import SampleCache, SkippedCase, split_by_center, with_masks
from common.data.preprocess import Sample
from common.errors import ConfigError
from common.files import seed_everything, versions, write_json
from common.networks import list_models
from common.training.checkpoint import architecture, build_model, save_checkpoint
from common.training.evaluation import evaluate_segmentation
from common.training.segmentation import TrainResult, train_segmentation
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


@dataclass
class LoadedSplit:
    """Preprocessed samples of a train/validation/test split, and the cases left out."""

    fit: list[Sample]
    val: list[Sample]
    test: list[Sample]
    skipped: list[SkippedCase] = field(default_factory=list)
    load_seconds: float = 0.0

    def case_ids(self) -> dict:
        return {name: [f"{s.center}/{s.case_id}" for s in samples]
                for name, samples in (("train", self.fit), ("validation", self.val), ("test", self.test))}


@dataclass
class TrainedModel:
    model: torch.nn.Module
    arch: dict
    result: TrainResult
    evaluation: dict

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


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


def validate_model(name: str) -> None:
    if name not in list_models():
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}")


def sample_cache(profile: dict) -> SampleCache:
    preprocess = profile["preprocess"]
    if preprocess.get("windows"):
        return SampleCache(preprocess["spacing"], preprocess["windows"])
    return SampleCache(preprocess["spacing"])


def model_architecture(settings: SegmentationSettings, cache: SampleCache, model: str | None = None) -> dict:
    """Architecture record of `model` (default: the settings' model) for this profile's inputs."""
    name = model or settings.model
    overrides = settings.model_overrides if name == settings.model else {}
    return architecture(name, len(cache.windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS, overrides)


def load_split(data: Path, train_centers, test_centers, settings: SegmentationSettings, cache: SampleCache,
               seed: int, log: Callable[[str], None] = print) -> LoadedSplit:
    """Read the cohort, drop (and report) cases without masks, hold out validation cases per
    training centre, and preprocess everything once."""
    cohort = read_cohort(data, list(train_centers) + list(test_centers))
    train_cases, skipped = with_masks([c for center in train_centers for c in cohort[center]], "training")
    test_cases, skipped_test = with_masks([c for center in test_centers for c in cohort[center]], "evaluation")
    skipped += skipped_test
    for item in skipped:
        log(f"skipped {item}")
    if not train_cases:
        raise ConfigError(f"no training case with a hematoma mask in {', '.join(train_centers)}")
    if not test_cases:
        raise ConfigError(f"no test case with a hematoma mask in {', '.join(test_centers)}")
    fit_cases, val_cases = split_validation(train_cases, settings, seed)
    start = time.perf_counter()
    log(f"loading {len(train_cases)} training and {len(test_cases)} test cases at {cache.spacing} mm")
    split = LoadedSplit(cache.load(fit_cases), cache.load(val_cases), cache.load(test_cases), skipped)
    split.load_seconds = time.perf_counter() - start
    return split


def split_validation(cases: list[Case], settings: SegmentationSettings, seed: int) -> tuple[list[Case], list[Case]]:
    fit_cases, val_cases = split_by_center(cases, settings.val_fraction, seed)
    if settings.max_val_cases:  # the cap keeps validation cheap; the rest of the held-out cases train
        fit_cases += val_cases[settings.max_val_cases:]
        val_cases = val_cases[: settings.max_val_cases]
    return fit_cases, val_cases


def train_and_evaluate(arch: dict, split: LoadedSplit, settings: SegmentationSettings, seed: int, device,
                       on_epoch: Callable[[dict], None] | None = None) -> TrainedModel:
    """Build the network (seeded), train it on the split, and evaluate its best state on the test cases."""
    seed_everything(seed)
    model = build_model(arch)
    result = train_segmentation(
        model, split.fit, epochs=settings.epochs, steps_per_epoch=settings.steps_per_epoch,
        patch_size=settings.patch_size, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
        device=device, val_samples=split.val or None, val_every=settings.val_every, optimizer=settings.optimizer,
        weight_decay=settings.weight_decay, momentum=settings.momentum, schedule=settings.schedule,
        grad_clip=settings.grad_clip, foreground_fraction=settings.foreground_fraction,
        hard_negative_fraction=settings.hard_negative_fraction, precision=settings.precision, augment=settings.augment,
        roi_size=settings.inference_roi, sw_overlap=settings.sw_overlap, sw_batch_size=settings.sw_batch_size,
        satellite_mm=settings.satellite_mm, progress=on_epoch,
    )
    evaluation = evaluate_segmentation(model, split.test, settings.inference_roi, overlap=settings.sw_overlap,
                                       sw_batch_size=settings.sw_batch_size, device=device,
                                       satellite_mm=settings.satellite_mm)
    return TrainedModel(model, arch, result, evaluation)


def run_train_seg(request: RunRequest, log: Callable[[str], None] = print,
                  on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Run everything and write the outputs; returns the metrics record."""
    profile = load_profile(request.profile)
    settings = SegmentationSettings.from_profile(profile, **(request.overrides or {}))
    validate_model(settings.model)
    validate_centers(request.data, request.train_centers, request.test_centers)
    device = resolve_device(request.device)
    cache = sample_cache(profile)
    arch = model_architecture(settings, cache)
    build_model(arch)  # a bad model setting fails before any data is read

    split = load_split(request.data, request.train_centers, request.test_centers, settings, cache, request.seed, log)
    log(f"training {settings.model} on {len(split.fit)} cases (validation {len(split.val)}) on {device}")
    trained = train_and_evaluate(arch, split, settings, request.seed, device, on_epoch)

    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": "train-seg", "data": str(request.data), "profile": profile["name"], "seed": request.seed,
        "device": str(device), "train_centers": list(request.train_centers),
        "test_centers": list(request.test_centers),
        "preprocess": {"spacing": list(cache.spacing), "windows": [list(w) for w in cache.windows]},
        "segmentation": settings.as_dict(), "architecture": arch, "versions": versions(),
        "split": split.case_ids(),
    }
    metrics = {
        "model": settings.model, "parameters": trained.parameters,
        "training": {**trained.result.metrics, "load_seconds": split.load_seconds},
        "history": trained.result.history, "test": trained.evaluation,
        "skipped": [s.as_dict() for s in split.skipped],
    }
    save_checkpoint(out, trained.result.best_state, arch,
                    {"seed": request.seed, "profile": profile["name"], "train_centers": list(request.train_centers),
                     "best_epoch": trained.result.best_epoch, "val_dice": trained.result.metrics["val_dice"]})
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", config)
    return metrics
