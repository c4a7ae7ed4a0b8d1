"""One classifier training call: slice arrays, augmentation, optimizer and schedule, the loop."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.preprocess import DEFAULT_WINDOWS
from common.data.roi import CaseROIs
from common.errors import DataError
from common.files import cpu_state, seed_everything
from common.metrics.markers import MARKER_NAMES
from common.networks.vit import marker_inputs  # cheap: timm is imported only when a model is built
from common.training.classification.prediction import case_logits
from common.training.classification.rois import key, roi_array, slice_markers
from common.training.classification.settings import ClassifierSettings

@dataclass(frozen=True)
class Budget:
    """How long one training call runs: epochs over the slices, or optimizer steps (steps win
    when both are set), capped by wall-clock seconds (0 = no cap)."""

    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, budget) -> "Budget":
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, int):
            return cls(steps=budget)
        if isinstance(budget, dict):
            return cls(**budget)
        raise TypeError(f"budget must be a Budget, an int (steps) or a dict, got {type(budget).__name__}")

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps > 0:
            return self.steps
        if self.epochs > 0:
            return self.epochs * steps_per_epoch
        raise ValueError("budget needs epochs or steps > 0")


@dataclass
class ClassifierResult:
    """What one training call produced: CPU weights (the EMA weights when enabled), flat scalar
    metrics (for a Flower MetricRecord; ``num_examples`` = training cases) and a history."""

    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)


def slice_arrays(train_rois: Sequence[CaseROIs], settings: ClassifierSettings, extra_he_rois=None,
                 extra_he_masks=None) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the training slices: real cases' k slices with the case label, then extra HE ROIs.

    extra_he_rois: synthetic HE ROIs, (n, C, P, P) float in [0, 1] (or a list of such arrays).
    C is the network's input channels, or the HU-window channels alone when their masks come
    in `extra_he_masks` (n, P, P) (appended as the mask channel when settings.mask_channel).
    """
    xs, ys = [], []
    for rois in train_rois:
        if rois.he not in (0, 1):
            raise DataError(key(rois), f"training ROI without a 0/1 HE label ({rois.he!r})")
        arr = roi_array(rois, settings.mask_channel)
        xs.append(arr)
        ys.append(np.full(len(arr), float(rois.he), np.float32))
    if not xs:
        raise DataError("training set", "no training cases")
    n_chans, size = xs[0].shape[1], xs[0].shape[-1]
    if extra_he_rois is not None:
        extra = np.concatenate([np.asarray(a, np.float32) for a in extra_he_rois]) if isinstance(extra_he_rois, (list, tuple)) \
            else np.asarray(extra_he_rois, np.float32)
        if extra.ndim != 4 or extra.shape[-2:] != (size, size):
            raise DataError("extra_he_rois", f"expected (n, C, {size}, {size}) arrays, got {extra.shape}")
        if extra.shape[1] == n_chans - 1 and settings.mask_channel:
            if extra_he_masks is None:
                raise DataError("extra_he_rois", f"{extra.shape[1]} channels: the classifier also takes the hematoma "
                                "mask; pass extra_he_masks (n, P, P) or ROIs with the mask as last channel")
            masks = np.asarray(extra_he_masks, np.float32)
            if masks.shape != (len(extra), size, size):
                raise DataError("extra_he_masks", f"expected ({len(extra)}, {size}, {size}), got {masks.shape}")
            extra = np.concatenate([extra, (masks > 0.5).astype(np.float32)[:, None]], axis=1)
        if extra.shape[1] != n_chans:
            raise DataError("extra_he_rois", f"{extra.shape[1]} channels, the classifier takes {n_chans}")
        if not np.isfinite(extra).all():
            raise DataError("extra_he_rois", "non-finite values")
        xs.append(np.clip(extra, 0.0, 1.0))
        ys.append(np.ones(len(extra), np.float32))
    return np.concatenate(xs), np.concatenate(ys)


def aux_arrays(train_rois: Sequence[CaseROIs], aux_targets: dict | None, n_slices: int):
    """(targets (n_slices, n_markers), known (n_slices,)): the case markers standardised over the
    training cases that have them, repeated per slice; rows of cases without markers (e.g. no
    reference mask) and of extra ROIs (after the real slices) are unknown."""
    have = [key(r) in aux_targets for r in train_rois] if aux_targets else []
    if not any(have):
        raise DataError("aux_targets", "classifier.aux_weight > 0 needs the marker features of the training cases")
    try:
        per_case = np.nan_to_num(np.array([[aux_targets[key(r)][n] for n in MARKER_NAMES] if h else [0.0] * len(MARKER_NAMES)
                                           for r, h in zip(train_rois, have)], np.float64))
    except KeyError as err:
        raise DataError("aux_targets", f"no marker features {err} in a case's targets") from err
    seen = per_case[np.array(have)]
    per_case = (per_case - seen.mean(0)) / np.where(seen.std(0) > 1e-8, seen.std(0), 1.0)
    rows = np.concatenate([np.repeat(per_case[i:i + 1], len(r.images), axis=0) for i, r in enumerate(train_rois)])
    row_known = np.concatenate([np.full(len(r.images), float(h)) for r, h in zip(train_rois, have)])
    targets = np.zeros((n_slices, len(MARKER_NAMES)), np.float32)
    known = np.zeros(n_slices, np.float32)
    targets[:len(rows)], known[:len(rows)] = rows, row_known
    return torch.from_numpy(targets), torch.from_numpy(known)


def augment_batch(x: torch.Tensor, settings: ClassifierSettings, generator: torch.Generator,
                  window_widths: Sequence[float]) -> torch.Tensor:
    """Random flips, rotation (+- rotate_deg), shift (+- shift_px), HU offset and noise.

    The ROI is axial and hematoma-centred, so left-right and anterior-posterior flips are both
    plausible (hematomas occur on either side and at any angle). The HU offset (a scanner's
    calibration error) shifts every window channel by offset / window width; noise mimics dose
    and kernel differences. The mask channel (last, when present) moves with the image and is
    re-binarised, but gets no intensity change.
    """
    b, c, h, w = x.shape
    n_win = len(window_widths)
    flip_x = torch.rand(b, generator=generator) < 0.5
    flip_y = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip_x[:, None, None, None], x.flip(-1), x)
    x = torch.where(flip_y[:, None, None, None], x.flip(-2), x)
    if settings.rotate_deg > 0 or settings.shift_px > 0:
        angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(settings.rotate_deg)
        shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * settings.shift_px / w)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Padding with zeros = air in every window and no mask: what lies outside a real ROI.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = x[:, :n_win]
    if settings.hu_jitter > 0:
        offset = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * settings.hu_jitter
        widths = torch.tensor(window_widths, dtype=x.dtype).view(1, n_win, 1, 1)
        images = images + offset / widths
    if settings.noise > 0:
        images = images + torch.randn(images.shape, generator=generator) * settings.noise
    images = images.clamp(0.0, 1.0)
    if c > n_win:
        return torch.cat([images, (x[:, n_win:] > 0.5).to(x.dtype)], dim=1)
    return images


def make_optimizer(model: nn.Module, settings: ClassifierSettings) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases, position embeddings and tokens; the marker path
    of a MarkerFusion model (parameters named ``markers.*``) at ``marker_lr``. Every group keeps
    its ``base_lr`` for the schedule."""
    groups = {"decay": [], "no_decay": [], "markers": []}
    for name, p in model.named_parameters():
        if name.startswith("markers."):
            groups["markers"].append(p)
        elif p.ndim > 1 and "pos_embed" not in name and "token" not in name:
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    params = [{"params": groups["decay"], "weight_decay": settings.weight_decay, "base_lr": settings.lr},
              {"params": groups["no_decay"], "weight_decay": 0.0, "base_lr": settings.lr}]
    if groups["markers"]:
        params.append({"params": groups["markers"], "weight_decay": settings.weight_decay, "base_lr": settings.marker_lr})
    return torch.optim.AdamW(params, lr=settings.lr)


def lr_at(step: int, total: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to 0 over `total` steps."""
    warm = int(warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(total - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_schedule(optimizer: torch.optim.Optimizer, step: int, total: int, warmup_fraction: float) -> None:
    """Every parameter group at its base rate times the schedule's factor at `step` of `total`."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_at(step, total, warmup_fraction)


def he_loss(out: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """The HE loss of a batch: class-weighted BCE on output 0 (further outputs are auxiliary heads)."""
    return F.binary_cross_entropy_with_logits(out[:, 0], labels, pos_weight=pos_weight)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, step: int, clip_params=None,
                   clip: float = 0.0) -> float:
    """Backpropagate `loss` and step (gradient norm clipped to `clip` when > 0); a non-finite loss
    stops training with the step it happened at. The one step of plain and DP-SGD training."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"classifier loss became {loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(clip_params, clip)
    optimizer.step()
    return loss.item()


def classifier_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, step: int,
                    schedule: tuple[int, int], *, settings: ClassifierSettings, generator: torch.Generator,
                    widths: list[float], pos_weight: torch.Tensor, extend_loss=None, clip_params=None,
                    device="cpu") -> float:
    """One training step of the HE classifier, plain or DP-SGD: augment the batch (x, markers or
    None, labels), set the learning rate at `step` of the schedule (offset, total), take the
    class-weighted HE loss, let `extend_loss(out, loss)` add terms (auxiliary heads, FedProx), and
    step (norm-clipped over `clip_params` at settings.grad_clip; DP-SGD clips per patient instead)."""
    xb, fb, yb = batch
    if settings.augment:
        xb = augment_batch(xb, settings, generator, widths)
    xb, yb = xb.to(device), yb.to(device)
    offset, total = schedule
    set_schedule(optimizer, offset + step, total, settings.warmup_fraction)
    out = model(xb) if fb is None else model(xb, fb.to(device))
    loss = he_loss(out, yb, pos_weight.to(device))
    if extend_loss is not None:
        loss = extend_loss(out, loss)
    return optimizer_step(optimizer, loss, step, clip_params, settings.grad_clip if clip_params is not None else 0.0)


def train_classifier(model: nn.Module, train_rois: Sequence[CaseROIs], budget, seed: int = 0, extra_he_rois=None,
                     proximal_mu: float = 0.0, global_params: dict[str, torch.Tensor] | None = None, *,
                     settings: ClassifierSettings | None = None, extra_he_masks=None,
                     val_rois: Sequence[CaseROIs] | None = None, windows=DEFAULT_WINDOWS, device="cpu",
                     schedule_offset: int = 0, schedule_total: int | None = None, aux_targets: dict | None = None,
                     progress: Callable[[dict], None] | None = None) -> ClassifierResult:
    """Train `model` in place on the k ROI slices of `train_rois` (+ extra synthetic HE ROIs).

    Args:
        model: a classifier from ``create_model`` (one logit per ROI).
        train_rois: labelled cases (``CaseROIs.he`` 0/1).
        budget: a ``Budget`` (epochs / steps / seconds), an int (steps) or a dict.
        extra_he_rois: synthetic HE ROIs (n, C, P, P) from the synthesis stage (see slice_arrays).
        proximal_mu, global_params: FedProx; loss += mu/2 ||w - w_global||^2 with w_global =
            `global_params` or, if None, the weights at the start of this call.
        val_rois: optional labelled cases; their case-level AUC is recorded after each epoch
            (monitoring only: no checkpoint is selected on them).
        schedule_offset, schedule_total: position in a longer learning-rate schedule (federated
            rounds continue one schedule); by default the schedule spans this call.
        aux_targets: with settings.aux_weight > 0, the marker features per case ("center/case_id"
            -> ``common.metrics.markers`` features, as ``build_roi_dataset(with_markers=True)``
            returns them in ``.markers``). Every slice then also regresses its case's markers,
            standardised over this call's training cases (extra synthetic ROIs have none and only
            take the HE loss): dense, label-free targets that teach the network shape and density
            descriptors from every case, not only from the few HE cases. Without aux_targets the
            auxiliary outputs are left untrained and only the HE loss is used (metrics["aux"] = 0).

    Returns ClassifierResult(state, metrics, history); metrics: train_loss, num_examples (cases),
    num_slices, num_extra, pos_weight, steps, epochs, seconds, val_auc (nan without val_rois).
    """
    settings = settings or ClassifierSettings()
    budget = Budget.of(budget)
    seed_everything(seed)
    x_np, y_np = slice_arrays(train_rois, settings, extra_he_rois, extra_he_masks)
    n_pos, n_neg = float(y_np.sum()), float(len(y_np) - y_np.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("training set", f"needs both classes, got {int(n_pos)} HE and {int(n_neg)} non-HE slices")
    x_all, y_all = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n_real = sum(len(r.images) for r in train_rois)
    f_np = slice_markers(train_rois, marker_inputs(model), len(y_np) - n_real)
    f_all = None if f_np is None else torch.from_numpy(f_np)
    aux = aux_known = None
    if settings.aux_weight > 0 and aux_targets is not None:
        aux, aux_known = aux_arrays(train_rois, aux_targets, len(y_all))
    n = len(y_all)
    batch = min(settings.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = budget.total_steps(steps_per_epoch)
    schedule_total = schedule_total or total
    generator = torch.Generator().manual_seed(seed)
    pos_weight = torch.tensor(n_neg / n_pos if settings.balance == "weighted_loss" else 1.0)
    if settings.balance == "sampler":  # each class drawn with probability 1/2
        sample_weight = torch.where(y_all > 0.5, 0.5 / n_pos, 0.5 / n_neg)
    widths = [float(w) for _, w in windows]

    model.to(device)
    opt = make_optimizer(model, settings)
    anchor = None
    if proximal_mu > 0:
        source = global_params if global_params is not None else dict(model.named_parameters())
        anchor = {name: torch.as_tensor(source[name]).detach().to(device, copy=True) for name, _ in model.named_parameters()}
    ema = copy.deepcopy(model).eval() if settings.ema > 0 else None

    history, losses, start, step, epoch = [], [], time.perf_counter(), 0, 0
    order = torch.randperm(n, generator=generator)
    cursor = 0
    while step < total:
        if budget.seconds and time.perf_counter() - start > budget.seconds:
            break
        model.train()
        if settings.balance == "sampler":
            idx = torch.multinomial(sample_weight, batch, replacement=True, generator=generator)
        else:
            if cursor + batch > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx, cursor = order[cursor:cursor + batch], cursor + batch

        def extend_loss(out, loss, idx=idx):
            if aux is not None:
                known = aux_known[idx].to(device)
                err = (out[:, 1:] - aux[idx].to(device)) ** 2 * known[:, None]
                loss = loss + settings.aux_weight * err.sum() / max(float(known.sum()) * aux.shape[1], 1.0)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum(((p - anchor[name]) ** 2).sum()
                                                    for name, p in model.named_parameters())
            return loss

        batch_xy = (x_all[idx], None if f_all is None else f_all[idx], y_all[idx])
        losses.append(classifier_step(model, opt, batch_xy, step, (schedule_offset, schedule_total), settings=settings,
                                      generator=generator, widths=widths, pos_weight=pos_weight,
                                      extend_loss=extend_loss, clip_params=model.parameters(), device=device))
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(settings.ema).add_(pm.detach(), alpha=1 - settings.ema)
        step += 1
        if step % steps_per_epoch == 0 or step == total:
            epoch += 1
            record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses[-steps_per_epoch:])),
                      "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - start, "val_auc": float("nan")}
            if val_rois:
                from common.metrics.classification import auc

                y_val = [r.he for r in val_rois]
                record["val_auc"] = auc(y_val, case_logits(ema or model, val_rois, settings, device=device))
            history.append(record)
            if progress is not None:
                progress(record)
    final = ema if ema is not None else model
    if ema is not None:  # the caller's model ends up holding the weights that are returned
        model.load_state_dict(ema.state_dict())
    model.eval()
    metrics = {
        "train_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else float("nan"),
        "num_examples": float(len(train_rois)),
        "num_slices": float(n),
        "num_extra": float(0 if extra_he_rois is None else n - sum(len(r.images) for r in train_rois)),
        "pos_weight": float(pos_weight),
        "steps": float(step),
        "epochs": float(step / steps_per_epoch),
        "seconds": time.perf_counter() - start,
        "val_auc": history[-1]["val_auc"] if history else float("nan"),
        "aux": float(aux is not None),
    }
    return ClassifierResult(cpu_state(final), metrics, history)
