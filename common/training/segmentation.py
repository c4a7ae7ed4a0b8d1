"""Hematoma segmentation training for one budget: central runs and federated rounds alike.

`train_segmentation` trains a given model on given samples and returns the weights and
metrics; it reads no files and keeps no global state, so a Flower client calls it once per
round with the round's global weights (and, for FedProx, `proximal_mu`), and `hemex
train-seg` calls it once for a whole central run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from common.data.preprocess import Sample
from common.errors import DataError
from common.files import cpu_state, seed_everything
from common.metrics.segmentation import segmentation_metrics
from common.networks import as_output_list
from common.training.augment import augment_batch, build_augmentation, window_tensor
from common.inference.segmentation import check_volume, predict_mask
from common.training.losses import DeepSupervisionDiceCE, proximal_term
from common.training.patches import PatchSampler
from common.training.settings import OPTIMIZERS, PRECISIONS, SCHEDULES


@dataclass
class TrainResult:
    """What one training call produced.

    `best_state` is the CPU state dict with the best validation Dice (the final one without
    validation samples); the model itself is left holding it when `restore_best` is set.
    `metrics` holds flat scalars, ready for a Flower MetricRecord.
    """

    best_state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0


def uses_bf16(precision: str, device) -> bool:
    """Whether training runs under bfloat16 autocast for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # native bf16 (AVX512-BF16 / AMX), not emulated


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Learning-rate multiplier at `step` of `total`: nnU-Net's poly (power 0.9), cosine or constant."""
    progress = min(step / max(total, 1), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True)
    raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def validation_dice(model: nn.Module, samples: list[Sample], roi_size, *, overlap: float, sw_batch_size: int,
                    device, satellite_mm: float = 0.0) -> float:
    """Mean per-case Dice of whole-volume predictions on the working grid."""
    scores = []
    for sample in samples:
        pred = predict_mask(model, sample.image, roi_size, overlap=overlap, sw_batch_size=sw_batch_size,
                            device=device, name=f"{sample.center}/{sample.case_id}", spacing=sample.spacing,
                            satellite_mm=satellite_mm, hu=sample.hu)
        scores.append(segmentation_metrics(pred, sample.mask, sample.spacing)["dice"])
    return float(np.mean(scores))


def sample_windows(samples: list[Sample]) -> tuple:
    """The HU windows of the samples' image channels (one set for all of them).

    Training draws HU patches, augments them and windows them again, so the windows must be
    the ones inference will see in `Sample.image`.
    """
    windows = {tuple(map(tuple, s.windows)) for s in samples}
    if len(windows) > 1:
        raise ValueError(f"samples were preprocessed with different HU windows: {sorted(windows)}")
    return windows.pop()


def train_segmentation(
    model: nn.Module,
    train_samples: list[Sample],
    *,
    epochs: int,
    steps_per_epoch: int,
    patch_size,
    batch_size: int = 2,
    lr: float = 2e-3,
    seed: int = 0,
    device="cpu",
    val_samples: list[Sample] | None = None,
    val_every: int = 1,
    proximal_mu: float = 0.0,
    global_params: dict[str, torch.Tensor] | None = None,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    momentum: float = 0.99,
    schedule: str = "poly",
    schedule_offset: int = 0,
    schedule_total: int | None = None,
    grad_clip: float = 12.0,
    foreground_fraction: float = 1 / 3,
    hard_negative_fraction: float = 0.0,
    augment: bool = True,
    roi_size=None,
    sw_overlap: float = 0.25,
    sw_batch_size: int = 4,
    satellite_mm: float = 0.0,
    restore_best: bool = True,
    max_seconds: float | None = None,
    precision: str = "fp32",
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train `model` in place for `epochs` x `steps_per_epoch` batches of random patches.

    Args:
        train_samples: preprocessed samples with masks (`Sample.mask` not None).
        patch_size: (z, y, x) voxels; must be a multiple of the model's strides.
        val_samples: held-out samples; the state with the best mean Dice on them is kept.
        proximal_mu, global_params: FedProx; with mu > 0 the loss gains mu/2 * ||w - w_global||^2,
            w_global being `global_params` (a state dict) or, if None, the weights at the start
            of this call (the round's global model, as a Flower client receives it).
        schedule_offset, schedule_total: where this call sits in a longer schedule, in steps
            (a federated client continues the global learning-rate schedule across rounds);
            by default the schedule spans this call.
        roi_size, sw_overlap, sw_batch_size, satellite_mm: validation inference (see `predict_mask`).
        max_seconds: a wall-clock budget for training (validation excluded): no epoch starts once
            it is spent, and the epoch that spends it validates (a benchmark compares models at equal time).
        precision: "fp32", "bf16" (the forward pass under bfloat16 autocast; the Mamba layer,
            weights, loss and optimizer stay fp32) or "auto" (bf16 where the device computes it
            natively: CUDA with bf16, a CPU with AVX512-BF16/AMX; ~1.5x the steps per second on
            such a CPU). Inference is always fp32.
        progress: called after every epoch with that epoch's record.

    Returns a TrainResult; `metrics` holds train_loss, val_dice (NaN without validation),
    best_epoch, num_examples (training cases, the FedAvg weight), steps and seconds.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    bf16 = uses_bf16(precision, device)
    if epochs < 1 or steps_per_epoch < 1 or batch_size < 1:
        raise ValueError("epochs, steps_per_epoch and batch_size must be >= 1")
    patch_size = tuple(int(p) for p in patch_size)
    multiple = getattr(model, "required_multiple", (1, 1, 1))
    if any(p % m for p, m in zip(patch_size, multiple)):
        raise ValueError(f"patch size {patch_size} must be a multiple of the model's {tuple(multiple)} per axis")
    if not train_samples:
        raise ValueError("no training samples")
    in_channels = getattr(model, "in_channels", len(train_samples[0].windows))
    for sample in list(train_samples) + list(val_samples or []):
        name = f"{sample.center}/{sample.case_id}"
        check_volume(sample.hu[None], 1, name)  # finite HU: windows would clip an infinite value to 1
        if len(sample.windows) != in_channels:
            raise DataError(name, f"expected {in_channels} channels (one per HU window), got {len(sample.windows)}")
    windows = sample_windows(train_samples)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    sampler = PatchSampler(train_samples, patch_size, foreground_fraction, rng, hard_negative_fraction)
    transforms = build_augmentation(seed, windows) if augment else None
    model.to(device)
    model.train()
    loss_fn = DeepSupervisionDiceCE()
    opt = build_optimizer(model, optimizer, lr, weight_decay, momentum)
    anchor = None
    if proximal_mu > 0:
        source = global_params if global_params is not None else dict(model.named_parameters())
        missing = [name for name, _ in model.named_parameters() if name not in source]
        if missing:
            raise ValueError(f"global_params lacks {len(missing)} model parameter(s), e.g. {missing[0]!r}")
        anchor = {name: torch.as_tensor(source[name]).detach().to(device, copy=True)
                  for name, _ in model.named_parameters()}
    total_steps = schedule_total or epochs * steps_per_epoch
    roi = roi_size or patch_size

    history, best_dice, best_epoch, best_state = [], -1.0, 0, None
    start = time.perf_counter()
    step = 0
    for epoch in range(1, epochs + 1):
        epoch_start, losses = time.perf_counter(), []
        for _ in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(schedule, schedule_offset + step, total_steps)
            hu, labels = sampler.batch(batch_size)
            if transforms is not None:
                x, y = augment_batch(transforms, hu, labels)
            else:
                x, y = window_tensor(torch.from_numpy(hu), windows), torch.from_numpy(labels).long()
            x, y = x.to(device), y.to(device)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                outputs = as_output_list(model(x))
            loss = loss_fn([o.float() for o in outputs], y)
            if anchor is not None:
                loss = loss + proximal_term(model, anchor, proximal_mu)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}, step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append(loss.item())
            step += 1
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": opt.param_groups[0]["lr"],
                  "train_seconds": time.perf_counter() - epoch_start, "val_dice": float("nan")}
        out_of_time = max_seconds is not None and sum(r["train_seconds"] for r in history) + record[
            "train_seconds"] >= max_seconds
        validate = val_samples and (epoch % val_every == 0 or epoch == epochs or out_of_time)
        if validate:
            val_start = time.perf_counter()
            record["val_dice"] = validation_dice(model, val_samples, roi, overlap=sw_overlap,
                                                 sw_batch_size=sw_batch_size, device=device,
                                                 satellite_mm=satellite_mm)
            record["val_seconds"] = time.perf_counter() - val_start
            if record["val_dice"] > best_dice:
                best_dice, best_epoch, best_state = record["val_dice"], epoch, cpu_state(model)
        history.append(record)
        if progress is not None:
            progress(record)
        if out_of_time:
            break

    if best_state is None:  # no validation: the final weights are the result
        best_epoch, best_state = len(history), cpu_state(model)
    elif restore_best:
        model.load_state_dict(best_state)
    train_seconds = sum(r["train_seconds"] for r in history)
    metrics = {
        "train_loss": history[-1]["train_loss"],
        "val_dice": best_dice if val_samples else float("nan"),
        "best_epoch": float(best_epoch),
        "num_examples": float(len(train_samples)),
        "steps": float(step),
        "seconds": time.perf_counter() - start,
        "train_seconds_per_epoch": train_seconds / len(history),
        "epochs": float(len(history)),
    }
    return TrainResult(best_state=best_state, metrics=metrics, history=history, best_epoch=best_epoch)
