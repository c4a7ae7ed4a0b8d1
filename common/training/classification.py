"""HE classification: ROI datasets, ViT training, calibration and the `hemex train-cls` run.

Pieces, each usable on its own (a Flower client uses the first four):

* ``build_roi_dataset(cases, settings, mask_provider=...)``: hematoma ROIs (and marker features)
  for a list of cases, with every case it could not use listed with the reason. The mask comes
  from a *mask provider*, ``Callable[[Sample], ndarray | None]``: the reference mask by default
  (``reference_mask``), or a segmentation model's prediction (any callable returning a (z, y, x)
  mask on the sample's grid), so the classifier can be fed by the federated U-Mamba.
* ``train_classifier(model, train_rois, budget, seed, extra_he_rois=None, proximal_mu=0,
  global_params=None)``: trains a ViT in place for a budget of epochs / steps / seconds and returns
  the weights and flat metrics. Slice-level training: every ROI slice carries its case's label.
  Class imbalance: BCE with ``pos_weight`` = negatives / positives over the slices actually
  trained on (so it tends to 1 once synthetic HE ROIs rebalance the set), or a class-balanced
  sampler. Augmentation: flips, small rotations and shifts, a HU calibration offset, Gaussian
  noise. Optional auxiliary loss (``aux_weight``): every slice also regresses its case's marker
  features (volume, density, shape), label-free targets available for every case.
* ``case_logits(model, rois)``: the patient-level score = **mean of the k slice logits** (test-time
  flips averaged too). Mean logits (a geometric mean of odds) rather than mean probabilities,
  so one confident slice cannot dominate and the score stays on the scale Platt scaling expects.
* ``fit_calibration(logits, y)``: Platt scaling (a, b: p = sigmoid(a z + b)) or a temperature,
  fitted on held-out cases of the *training* centres only.
* ``run_train_cls(...)``: the central run behind ``hemex train-cls``: split the training
  centres into a fitting and a held-out calibration part (stratified per centre), train, calibrate,
  choose the Youden threshold on the held-out training cases, fit the volume-only and marker
  baselines on the training centres, then evaluate everything once on the external centres.
  Nothing is tuned on external centres. truth.csv (synthetic cohorts) is read only at the very
  end, for the oracle AUC.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.data.contract import Case
from common.data.preprocess import DEFAULT_WINDOWS, Sample, load_case
from common.data.roi import CaseROIs, extract_rois
from common.errors import ConfigError, DataError, HemexError
from common.files import atomic_write, cpu_state, seed_everything, versions, write_csv, write_json
from common.metrics.markers import MARKER_NAMES, marker_features, marker_vector
from common.networks.vit import marker_inputs  # cheap: timm is imported only when a model is built

AGGREGATIONS = ("mean_logit", "mean_prob")
CALIBRATIONS = ("platt", "temperature", "none")
BALANCING = ("weighted_loss", "sampler", "none")
MASK_SOURCES = ("reference",)
METRICS_FORMAT = "hemex-cls-metrics/1"
MODEL_FORMAT = "hemex-cls-checkpoint/1"

MaskProvider = Callable[[Sample], "np.ndarray | None"]


# ============================================================================ settings

@dataclass(frozen=True)
class ClassifierSettings:
    """The profile's [classifier] section (every key optional), validated once."""

    model: str = "vit-micro-roi"
    weights: str | None = None  # optional local weight file to initialise the ViT
    pixels: int = 64  # ROI side in pixels = ViT img_size
    patch_size: int = 8
    stem: str = "conv"  # "conv": convolutional stem (common.networks.vit); "patch": plain ViT
    size_mm: float = 80.0  # ROI side in mm
    k_slices: int = 3  # axial slices with the largest hematoma area per case
    mask_channel: bool = True  # append the hematoma mask to the HU-window channels
    spacing: tuple[float, float, float] | None = None  # None: ROIs from the native grid
    batch_size: int = 32
    epochs: int = 40
    steps: int = 0  # > 0 overrides epochs
    max_seconds: float = 0.0  # wall-clock cap of training (0 = none)
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.1
    drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    grad_clip: float = 1.0
    balance: str = "weighted_loss"
    augment: bool = True
    rotate_deg: float = 15.0
    shift_px: int = 4
    hu_jitter: float = 5.0  # HU calibration offset, uniform +- this
    noise: float = 0.02  # Gaussian noise SD on the [0, 1] window channels
    ema: float = 0.0  # > 0: evaluate an exponential moving average of the weights
    tta: bool = True  # average flipped views at prediction time
    aggregation: str = "mean_logit"
    calibration: str = "platt"
    val_fraction: float = 0.25  # of every training centre, held out for calibration and threshold
    n_boot: int = 2000
    hypodense_hu: float = 18.0  # marker feature threshold (see common.metrics.markers)
    aux_weight: float = 0.0  # > 0: auxiliary regression of the case's marker features (see train_classifier)
    marker_fusion: bool = False  # add a linear path from the case's NCCT markers to the HE logit (MarkerFusion)
    marker_lr: float = 0.1  # learning rate of that linear path (a logistic fit needs far larger steps than the ViT)

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"classifier.{key} {why}, got {getattr(self, key)!r}")

        for key in ("pixels", "patch_size", "k_slices", "batch_size"):
            if int(getattr(self, key)) < 1:
                bad(key, "must be >= 1")
        if self.pixels % self.patch_size:
            bad("pixels", f"must be a multiple of patch_size {self.patch_size}")
        if self.epochs < 1 and self.steps < 1:
            bad("epochs", "must be >= 1 (or steps >= 1)")
        for key in ("size_mm", "lr", "marker_lr"):
            if not getattr(self, key) > 0:
                bad(key, "must be > 0")
        for key in ("weight_decay", "rotate_deg", "shift_px", "hu_jitter", "noise", "max_seconds", "steps", "grad_clip"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if not 0 <= self.warmup_fraction < 1:
            bad("warmup_fraction", "must be in [0, 1)")
        if not 0 <= self.ema < 1:
            bad("ema", "must be in [0, 1)")
        if not 0 <= self.val_fraction < 0.9:
            bad("val_fraction", "must be in [0, 0.9)")
        if self.aggregation not in AGGREGATIONS:
            bad("aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
        if self.calibration not in CALIBRATIONS:
            bad("calibration", f"must be one of {', '.join(CALIBRATIONS)}")
        if self.balance not in BALANCING:
            bad("balance", f"must be one of {', '.join(BALANCING)}")
        if self.spacing is not None and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            bad("spacing", "must be three positive mm values (x, y, z) or absent")
        if self.n_boot < 100:
            bad("n_boot", "must be >= 100")
        if self.aux_weight < 0:
            bad("aux_weight", "must be >= 0")

    @classmethod
    def from_profile(cls, profile: dict, **overrides) -> "ClassifierSettings":
        section = dict(profile.get("classifier", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"profile {profile.get('name', '?')!r}: unknown [classifier] key(s) "
                              f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
        section.update({k: v for k, v in overrides.items() if v is not None})
        if section.get("spacing") is not None:
            section["spacing"] = tuple(float(v) for v in section["spacing"])
        if section.get("weights") == "":
            section["weights"] = None
        try:
            return cls(**section)
        except TypeError as err:
            raise ConfigError(f"profile {profile.get('name', '?')!r}: invalid [classifier] value: {err}") from err

    @property
    def in_chans(self) -> int:
        return 3 + int(self.mask_channel)  # three HU windows (common.data.preprocess.DEFAULT_WINDOWS)

    @property
    def num_outputs(self) -> int:
        """Output 0 is the HE logit; with aux_weight > 0 one regression output per marker follows."""
        return 1 + (len(MARKER_NAMES) if self.aux_weight > 0 else 0)

    def model_kwargs(self) -> dict:
        return {"img_size": self.pixels, "patch_size": self.patch_size, "in_chans": self.in_chans,
                "stem": self.stem, "num_classes": self.num_outputs, "drop_rate": self.drop_rate,
                "drop_path_rate": self.drop_path_rate, "marker_inputs": len(MARKER_NAMES) if self.marker_fusion else 0}

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def create_model(settings: ClassifierSettings, windows=DEFAULT_WINDOWS) -> nn.Module:
    from common.networks.vit import create_classifier

    kwargs = settings.model_kwargs()
    kwargs["in_chans"] = len(windows) + int(settings.mask_channel)
    return create_classifier(settings.model, weights=settings.weights, **kwargs)


# ============================================================================ ROI datasets

@dataclass(frozen=True)
class Exclusion:
    center: str
    case_id: str
    reason: str

    def __str__(self) -> str:
        return f"{self.center}/{self.case_id}: {self.reason}"


@dataclass
class ROIDataset:
    """ROIs of the usable cases, their marker features, and every case left out with the reason."""

    cases: list[CaseROIs] = field(default_factory=list)
    markers: dict[str, dict] = field(default_factory=dict)  # "center/case_id" -> features
    excluded: list[Exclusion] = field(default_factory=list)
    # With a mask provider and reference_markers=True: the markers of the reference masks, where
    # cases have one (the auxiliary targets when ROIs are cut by a segmentation model).
    reference_markers: dict[str, dict] = field(default_factory=dict)

    def labels(self) -> np.ndarray:
        return np.array([c.he for c in self.cases], dtype=int)

    def subset(self, keep: Sequence[int]) -> "ROIDataset":
        chosen = [self.cases[i] for i in keep]
        return ROIDataset(chosen, {key(c): self.markers[key(c)] for c in chosen if key(c) in self.markers},
                          list(self.excluded))


def key(case) -> str:
    return f"{case.center}/{case.case_id}"


def reference_mask(sample: Sample) -> np.ndarray | None:
    """The default mask provider: the case's reference mask (None when it has none)."""
    return sample.mask


def build_roi_dataset(cases: Iterable[Case], settings: ClassifierSettings, *, mask_provider: MaskProvider | None = None,
                      windows=DEFAULT_WINDOWS, require_label: bool = True, with_markers: bool = True,
                      reference_markers: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> ROIDataset:
    """ROIs for `cases`, never silently dropping one: a case without a label (when required),
    without a mask, with an empty mask, or whose image cannot be read goes to ``excluded``.

    mask_provider: ``None`` = the reference masks (``masks/<case_id>``); otherwise a callable
    receiving the loaded ``Sample`` (without reference mask) and returning a (z, y, x) mask
    on its grid, e.g. a segmentation model's prediction.
    with_markers: also measure the marker features (``.markers``); always done for a
    marker-fusion classifier, whose ROIs carry them (``CaseROIs.features``).
    reference_markers: with a mask provider, also measure the markers of each case's reference
    mask where it has one (``.reference_markers``); a case without one is not excluded for it.
    """
    cases = list(cases)
    out = ROIDataset()
    reference = mask_provider is None
    for i, case in enumerate(cases):
        reason = None
        if require_label and case.he is None:
            reason = "no HE label (he is empty in cases.csv)"
        elif reference and case.mask_path is None:
            reason = "no reference mask (masks/<case_id> missing)"
        if reason is None:
            try:
                sample = load_case(case, spacing=settings.spacing, windows=windows,
                                   with_mask=reference or (reference_markers and case.mask_path is not None))
                mask = reference_mask(sample) if reference else mask_provider(sample)
                if not reference and reference_markers and sample.mask is not None and sample.mask.any():
                    out.reference_markers[key(case)] = marker_features(sample.hu, sample.mask, sample.spacing,
                                                                       settings.hypodense_hu)
                if mask is None:
                    reason = "mask provider returned no mask"
                elif not np.asarray(mask).any():
                    reason = "empty hematoma mask (nothing to centre an ROI on)"
                else:
                    mask = (np.asarray(mask) != 0).astype(np.uint8)
                    rois = extract_rois(sample, mask, k=settings.k_slices, size_mm=settings.size_mm,
                                        pixels=settings.pixels, windows=windows)
                    rois.he = case.he
                    if with_markers or settings.marker_fusion:
                        features = marker_features(sample.hu, mask, sample.spacing, settings.hypodense_hu)
                        rois.features = marker_vector(features)
                        features["onset_to_ct_h"] = case.onset_to_ct_h
                        out.markers[key(case)] = features
                    out.cases.append(rois)
            except HemexError as err:
                reason = str(getattr(err, "reason", err))
            except (ValueError, RuntimeError) as err:  # SimpleITK / provider failures
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if reason is not None:
            out.excluded.append(Exclusion(case.center, case.case_id, reason))
        if progress is not None:
            progress(i + 1, len(cases))
    return out


def roi_array(rois: CaseROIs, mask_channel: bool) -> np.ndarray:
    """(k, C[+1], P, P) float32 network input of one case: HU windows [+ mask]."""
    images = rois.images.astype(np.float32)
    if mask_channel:
        images = np.concatenate([images, rois.masks[:, None].astype(np.float32)], axis=1)
    return images


def stratified_split(labels: Sequence[int], groups: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) indices: `fraction` of each (group, label) stratum held out, at least one
    of each label per group when that group has two or more of it."""
    rng = np.random.default_rng(seed)
    labels, groups = np.asarray(labels), np.asarray(groups)
    held = []
    if fraction > 0:
        for g in sorted(set(groups.tolist())):
            for label in (0, 1):
                idx = np.flatnonzero((groups == g) & (labels == label))
                if len(idx) < 2:
                    continue
                n = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1)
                held += rng.choice(idx, size=n, replace=False).tolist()
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


# ============================================================================ training

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


def case_markers(rois: CaseROIs, n_markers: int) -> np.ndarray:
    """The case's scaled marker vector, checked (a marker-fusion classifier cannot score without it)."""
    if rois.features is None:
        raise DataError(key(rois), "no marker features: this classifier fuses the NCCT markers, "
                        "build the ROIs with build_roi_dataset (or set CaseROIs.features)")
    features = np.asarray(rois.features, np.float32).reshape(-1)
    if len(features) != n_markers or not np.isfinite(features).all():
        raise DataError(key(rois), f"marker features must be {n_markers} finite values, got {features.tolist()}")
    return features


def slice_markers(rois: Sequence[CaseROIs], n_markers: int, n_extra: int = 0) -> np.ndarray | None:
    """(n_slices, n_markers) marker rows: each real case's vector repeated for its slices, then
    `n_extra` rows of reference values (zeros) for synthetic HE ROIs: a 2D synthetic image has no
    volume to measure, so it trains the image path only. (Pairing each synthetic ROI with a random
    real HE case's markers instead lowered the federated arm's pooled AUC on the development
    cohort, 0.750 -> 0.712.) None when the classifier takes no markers."""
    if n_markers == 0:
        return None
    rows = [np.repeat(case_markers(r, n_markers)[None], len(r.images), axis=0) for r in rois]
    rows.append(np.zeros((n_extra, n_markers), np.float32))
    return np.concatenate(rows)


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
        xb, yb = x_all[idx], y_all[idx]
        if settings.augment:
            xb = augment_batch(xb, settings, generator, widths)
        xb, yb = xb.to(device), yb.to(device)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_at(schedule_offset + step, schedule_total, settings.warmup_fraction)
        out = model(xb) if f_all is None else model(xb, f_all[idx].to(device))
        loss = F.binary_cross_entropy_with_logits(out[:, 0], yb, pos_weight=pos_weight.to(device))
        if aux is not None:
            known = aux_known[idx].to(device)
            err = (out[:, 1:] - aux[idx].to(device)) ** 2 * known[:, None]
            loss = loss + settings.aux_weight * err.sum() / max(float(known.sum()) * aux.shape[1], 1.0)
        if anchor is not None:
            loss = loss + proximal_mu / 2 * sum(((p - anchor[name]) ** 2).sum() for name, p in model.named_parameters())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"classifier loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(settings.ema).add_(pm.detach(), alpha=1 - settings.ema)
        losses.append(loss.item())
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


# ============================================================================ prediction

@torch.no_grad()
def slice_logits(model: nn.Module, x: np.ndarray | torch.Tensor, tta: bool = True, device="cpu",
                 batch_size: int = 64, markers: np.ndarray | None = None) -> np.ndarray:
    """One logit per ROI slice (N, C, P, P) -> (N,); with `tta`, the mean over the four flips.
    `markers` (N, M): the slices' marker rows, for a marker-fusion classifier."""
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    f = None if markers is None else torch.as_tensor(markers, dtype=torch.float32)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        fb = None if f is None else f[i:i + batch_size].to(device)
        views = [xb, xb.flip(-1), xb.flip(-2), xb.flip(-1).flip(-2)] if tta else [xb]
        out.append(torch.stack([(model(v) if fb is None else model(v, fb))[:, 0] for v in views]).mean(0).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def case_logits(model: nn.Module, rois: Sequence[CaseROIs], settings: ClassifierSettings, device="cpu") -> np.ndarray:
    """Patient-level score per case: mean of its slice logits (aggregation 'mean_logit'), or the
    logit of its mean slice probability ('mean_prob')."""
    if not rois:
        return np.zeros(0)
    arrays = [roi_array(r, settings.mask_channel) for r in rois]
    z = slice_logits(model, np.concatenate(arrays), tta=settings.tta, device=device,
                     markers=slice_markers(rois, marker_inputs(model)))
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if settings.aggregation == "mean_logit":
            out.append(z[a:b].mean())
        else:
            p = np.clip((1 / (1 + np.exp(-z[a:b]))).mean(), 1e-7, 1 - 1e-7)
            out.append(math.log(p / (1 - p)))
    return np.asarray(out)


@dataclass
class Calibration:
    """p = sigmoid(a * z + b) on the patient-level logit z. Platt fits a and b; temperature fits
    a = 1/T with b = -log(pos_weight)/T (the known prior shift of the weighted loss); none = (1, 0)."""

    method: str = "none"
    a: float = 1.0
    b: float = 0.0
    n: int = 0

    def __call__(self, z) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(z, float) + self.b)))


def fit_calibration(z, y, method: str = "platt", pos_weight: float = 1.0) -> Calibration:
    """Fit on held-out training-centre cases only (never on external centres)."""
    z, y = np.asarray(z, float), np.asarray(y, int)
    if method == "none" or len(set(y.tolist())) < 2:
        return Calibration("none" if method == "none" else f"{method}-skipped (one class)", 1.0, 0.0, len(y))
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        # Mild L2 (C=10 on an unscaled 1-D logit) keeps the slope finite on separable sets.
        fit = LogisticRegression(C=10.0, max_iter=1000).fit(z.reshape(-1, 1), y)
        return Calibration("platt", float(fit.coef_[0, 0]), float(fit.intercept_[0]), len(y))
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        shift = math.log(pos_weight) if pos_weight > 0 else 0.0

        def nll(log_t):
            t = math.exp(log_t)
            p = np.clip(1 / (1 + np.exp(-(z - shift) / t)), 1e-7, 1 - 1e-7)
            return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

        t = math.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x)
        return Calibration("temperature", 1 / t, -shift / t, len(y))
    raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {method!r}")


# ============================================================================ files

def save_classifier(folder: Path, state: dict[str, torch.Tensor], record: dict) -> Path:
    """DIR/classifier.safetensors (torch.save .pt if safetensors is missing) + DIR/classifier.json."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    try:
        from safetensors.torch import save_file

        weights = atomic_write(folder / "classifier.safetensors",
                          lambda tmp: save_file(state, tmp, metadata={"format": MODEL_FORMAT}))
    except ImportError:
        weights = atomic_write(folder / "classifier.pt", lambda tmp: torch.save(state, tmp))
    write_json(folder / "classifier.json", {"format": MODEL_FORMAT, "weights": weights.name, **record})
    return weights


def load_classifier(folder: Path, device="cpu") -> tuple[nn.Module, ClassifierSettings, Calibration, dict]:
    """Rebuild a saved classifier: (model, settings, calibration, record)."""
    folder = Path(folder)
    path = folder / "classifier.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(path, f"cannot read classifier record: {err}") from err
    if record.get("format") != MODEL_FORMAT:
        raise DataError(path, f"not a {MODEL_FORMAT} record")
    saved = dict(record["settings"])
    saved.setdefault("stem", record.get("architecture", {}).get("stem", "patch"))  # records before the conv stem
    known = {f.name for f in fields(ClassifierSettings)}
    settings = ClassifierSettings(**{**{k: v for k, v in saved.items() if k in known}, "weights": None,
                                     "spacing": tuple(saved["spacing"]) if saved.get("spacing") else None})
    model = create_model(settings)
    weights = folder / record["weights"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), settings, Calibration(**record["calibration"]), record


# ============================================================================ the central run

def read_truth(data_root: Path) -> dict[str, dict] | None:
    """Rows of DATA_ROOT/truth.csv ("center/case_id" -> row), or None without it (real data).
    Evaluation only: called after every model is trained and has predicted."""
    path = Path(data_root) / "truth.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as handle:
        rows = {f"{r.get('center')}/{r.get('case_id')}": r for r in csv.DictReader(handle)}
    return rows or None


def read_oracle_risk(data_root: Path) -> dict[str, float] | None:
    """True risks from DATA_ROOT/truth.csv ("center/case_id" -> risk), or None without it."""
    rows = read_truth(data_root)
    if rows is None:
        return None
    out = {}
    for k, row in rows.items():
        try:
            out[k] = float(row["risk"])
        except (KeyError, ValueError):
            continue
    return out or None


PHENOTYPE_COLUMNS = ("volume_ml", "irregularity", "heterogeneity", "blend", "black_hole", "islands", "ivh",
                     "onset_to_ct_h")


def phenotype_matrix(rows: list[dict]) -> np.ndarray:
    """The true phenotype of truth.csv rows as numbers (logs of volume and time, booleans 0/1)."""
    out = []
    for row in rows:
        values = []
        for col in PHENOTYPE_COLUMNS:
            v = row[col]
            v = float(v == "True") if v in ("True", "False") else float(v)
            values.append(math.log(max(v, 1e-3)) if col in ("volume_ml", "onset_to_ct_h") else v)
        out.append(values)
    return np.asarray(out, float)


def _log(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(message, flush=True)


def run_train_cls(data_root: Path, train_centers: list[str], test_centers: list[str], out: Path, *,
                  profile: str = "cpu", seed: int = 0, mask_source: str = "reference",
                  mask_provider: MaskProvider | None = None, overrides: dict | None = None, threads: int | None = None,
                  quiet: bool = False) -> dict:
    """Train the ViT centrally on `train_centers`, evaluate on `test_centers`; returns metrics.json's content.

    `mask_provider` (Python callers) replaces the reference masks everywhere (e.g. a trained
    segmentation model); the CLI offers `--mask-source reference`.
    """
    from common.baselines import MARKER_MODEL_FEATURES, VOLUME_FEATURES, fit_baseline
    from common.config import load_profile
    from common.data.contract import read_cohort
    from common.metrics import classification as st

    wall = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    overlap = sorted(set(train_centers) & set(test_centers))
    if overlap:
        raise ConfigError(f"centre(s) {', '.join(overlap)} are both training and test centres")
    if not train_centers or not test_centers:
        raise ConfigError("--train-centers and --test-centers each need at least one centre")
    if mask_provider is None and mask_source not in MASK_SOURCES:
        raise ConfigError(f"--mask-source {mask_source!r}: only {', '.join(MASK_SOURCES)} is available here "
                          "(segmentation-model masks come through a mask provider)")
    loaded_profile = load_profile(profile)
    settings = ClassifierSettings.from_profile(loaded_profile, **(overrides or {}))
    windows = tuple(tuple(w) for w in loaded_profile.get("preprocess", {}).get("windows", DEFAULT_WINDOWS))
    if len(windows) != 3:
        raise ConfigError(f"profile {profile!r}: preprocess.windows must hold three (level, width) windows for the ViT")
    out = Path(out)
    cohort = read_cohort(Path(data_root), list(train_centers) + list(test_centers))

    # --- ROIs and marker features --------------------------------------------------------
    datasets: dict[str, ROIDataset] = {}
    for center, cases in cohort.items():
        t0 = time.perf_counter()
        datasets[center] = build_roi_dataset(cases, settings, mask_provider=mask_provider, windows=windows)
        d = datasets[center]
        _log(f"{center}: {len(d.cases)} of {len(cases)} cases usable ({int(d.labels().sum())} HE), "
             f"{len(d.excluded)} excluded, {time.perf_counter() - t0:.0f} s", quiet)
        for ex in d.excluded:
            _log(f"  excluded {ex}", quiet)
    excluded = [asdict(e) for c in cohort for e in datasets[c].excluded]

    train_all = [r for c in train_centers for r in datasets[c].cases]
    y_train_all = np.array([r.he for r in train_all], int)
    if len(set(y_train_all.tolist())) < 2:
        raise DataError(data_root, f"training centres {', '.join(train_centers)} need usable HE and non-HE cases")
    fit_idx, held_idx = stratified_split(y_train_all, [r.center for r in train_all], settings.val_fraction, seed)
    fit_rois, held_rois = [train_all[i] for i in fit_idx], [train_all[i] for i in held_idx]
    y_held = np.array([r.he for r in held_rois], int)
    if settings.val_fraction > 0 and len(set(y_held.tolist())) < 2:
        raise DataError(data_root, "the held-out part of the training centres lacks HE or non-HE cases; "
                        "raise classifier.val_fraction or add cases")

    # --- ViT -------------------------------------------------------------------------------
    seed_everything(seed)
    model = create_model(settings, windows)
    from common.networks.vit import parameter_count

    budget = Budget(epochs=settings.epochs, steps=settings.steps, seconds=settings.max_seconds)
    _log(f"Training {settings.model} ({parameter_count(model) / 1e6:.2f} M parameters) on {len(fit_rois)} cases "
         f"({int(sum(r.he for r in fit_rois))} HE) x {settings.k_slices} slices; {len(held_rois)} held out "
         f"for calibration and threshold", quiet)

    def report(record):
        if record["epoch"] % 5 == 0 or record["epoch"] == 1:
            _log(f"  epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  {record['seconds']:.0f} s", quiet)

    markers_all = {k: v for c in train_centers for k, v in datasets[c].markers.items()}
    result = train_classifier(model, fit_rois, budget, seed, settings=settings, windows=windows,
                              aux_targets=markers_all, progress=report)
    calib_rois = held_rois if held_rois else fit_rois
    z_cal = case_logits(model, calib_rois, settings)
    y_cal = np.array([r.he for r in calib_rois], int)
    calibration = fit_calibration(z_cal, y_cal, settings.calibration, result.metrics["pos_weight"])
    p_cal = calibration(z_cal)
    threshold_vit = st.youden_threshold(y_cal, p_cal)
    _log(f"Calibration ({calibration.method}) and Youden threshold {threshold_vit:.3f} from {len(calib_rois)} "
         f"{'held-out ' if held_rois else 'in-sample '}training-centre cases", quiet)

    # --- baselines (fitted on every training-centre case) -------------------------------------
    def features(rois, names):
        return np.array([[datasets[r.center].markers[key(r)][n] for n in names] for r in rois], float)

    baselines = {"volume": fit_baseline(features(train_all, VOLUME_FEATURES), y_train_all, VOLUME_FEATURES),
                 "markers": fit_baseline(features(train_all, MARKER_MODEL_FEATURES), y_train_all, MARKER_MODEL_FEATURES)}
    thresholds = {"vit": threshold_vit}
    train_scores = {}
    for name, base in baselines.items():
        train_scores[name] = base.predict_proba(features(train_all, base.names))
        thresholds[name] = st.youden_threshold(y_train_all, train_scores[name])

    # --- external evaluation: every decision above is frozen now ---------------------------------
    test_rois = {c: datasets[c].cases for c in test_centers}
    preds: dict[str, dict[str, np.ndarray]] = {"vit": {}, "volume": {}, "markers": {}}
    labels = {}
    for c in test_centers:
        rois = test_rois[c]
        labels[c] = np.array([r.he for r in rois], int)
        preds["vit"][c] = calibration(case_logits(model, rois, settings)) if rois else np.zeros(0)
        for name, base in baselines.items():
            preds[name][c] = base.predict_proba(features(rois, base.names)) if rois else np.zeros(0)
    groups = list(test_centers) + (["pooled"] if len(test_centers) > 1 else [])
    labels["pooled"] = np.concatenate([labels[c] for c in test_centers])
    for name in preds:
        preds[name]["pooled"] = np.concatenate([preds[name][c] for c in test_centers])

    def evaluate(y, p, threshold):
        if len(y) == 0:
            return {"n": 0, "note": "no usable cases"}
        if len(set(y.tolist())) < 2:
            return {"n": int(len(y)), "n_he": int(y.sum()), "note": "one class only: AUC undefined",
                    "at_threshold": st.operating_point(y, p, threshold), "brier": st.brier(y, p)}
        return st.summarize(y, p, threshold, n_boot=settings.n_boot, seed=seed)

    external = {name: {g: evaluate(labels[g], preds[name][g], thresholds[name]) for g in groups} for name in preds}
    comparisons = {}
    for g in groups:
        y = labels[g]
        if len(y) and len(set(y.tolist())) == 2:
            comparisons[g] = {"vit_vs_volume": st.delong_test(y, preds["vit"][g], preds["volume"][g]),
                              "vit_vs_markers": st.delong_test(y, preds["vit"][g], preds["markers"][g])}
    internal = {"vit_held_out": evaluate(y_cal, p_cal, threshold_vit) if held_rois else None,
                "volume_train": evaluate(y_train_all, train_scores["volume"], thresholds["volume"]),
                "markers_train": evaluate(y_train_all, train_scores["markers"], thresholds["markers"])}

    # --- oracle (synthetic cohorts): truth.csv is read only now --------------------------------
    oracle = None
    risk = read_oracle_risk(Path(data_root))
    truth = read_truth(Path(data_root))
    phenotype_lr = None
    if risk is not None:
        oracle = {"note": "true risk of truth.csv vs label on the same evaluable cases; a perfect model "
                          "cannot exceed it in expectation. phenotype_lr: a logistic regression on the true "
                          "phenotype (truth.csv: log volume, irregularity, heterogeneity, blend, black hole, "
                          "islands, IVH, log onset time) fitted on the training centres' evaluable cases, i.e. "
                          "what a model measuring every marker perfectly could learn from this training set",
                  "groups": {}}
        try:
            phenotype_lr = fit_baseline(phenotype_matrix([truth[key(r)] for r in train_all]), y_train_all,
                                        PHENOTYPE_COLUMNS)
        except (KeyError, ValueError):
            phenotype_lr = None
        for g in groups:
            rois = test_rois[g] if g != "pooled" else [r for c in test_centers for r in test_rois[c]]
            r_scores = np.array([risk.get(key(r), np.nan) for r in rois])
            y = labels[g]
            if len(y) and np.isfinite(r_scores).all() and len(set(y.tolist())) == 2:
                a, lo, hi, _ = st.delong_ci(y, r_scores)
                entry = {"auc": a, "auc_ci_delong": [lo, hi]}
                if phenotype_lr is not None:
                    entry["phenotype_lr_auc"] = st.auc(y, phenotype_lr.predict_proba(
                        phenotype_matrix([truth[key(r)] for r in rois])))
                for name in preds:
                    if "auc" in external[name][g]:
                        entry[f"{name}_ratio"] = external[name][g]["auc"] / a
                oracle["groups"][g] = entry

    # --- files -------------------------------------------------------------------------------
    from common.networks.vit import classifier_config

    record = {"settings": settings.as_dict(), "architecture": classifier_config(settings.model, **settings.model_kwargs()),
              "calibration": asdict(calibration), "threshold": threshold_vit, "windows": [list(w) for w in windows],
              "train_centers": list(train_centers), "seed": seed}
    weights = save_classifier(out, result.state, record)
    plots = {}
    for g in groups:
        if len(labels[g]) and len(set(labels[g].tolist())) == 2:
            curves = {n: (labels[g], preds[n][g]) for n in ("vit", "markers", "volume")}
            if oracle and g in oracle["groups"]:
                rois = test_rois[g] if g != "pooled" else [r for c in test_centers for r in test_rois[c]]
                curves["oracle (true risk)"] = (labels[g], np.array([risk[key(r)] for r in rois]))
            plots[f"roc_{g}"] = st.plot_roc(curves, out / f"roc_{g}.png", title=f"ROC, {g} (external)").name
            plots[f"calibration_{g}"] = st.plot_calibration(
                {n: (labels[g], preds[n][g]) for n in ("vit", "markers", "volume")},
                out / f"calibration_{g}.png", title=f"Calibration, {g} (external)").name
    rows = []
    for c in test_centers:
        for i, r in enumerate(test_rois[c]):
            rows.append([c, r.case_id, r.he] + [round(float(preds[n][c][i]), 6) for n in ("vit", "volume", "markers")])
    write_csv(out / "predictions.csv", ["center", "case_id", "he", "vit", "volume", "markers"], rows)

    metrics = {
        "format": METRICS_FORMAT,
        "data_root": str(data_root),
        "train_centers": list(train_centers),
        "test_centers": list(test_centers),
        "seed": seed,
        "mask_source": "provider" if mask_provider is not None else mask_source,
        "patient_score": f"{settings.aggregation} over {settings.k_slices} slices (flip TTA: {settings.tta}), "
                         f"then {calibration.method} calibration",
        "classifier": "ViT fused with the NCCT markers (MarkerFusion)" if settings.marker_fusion else "ViT",
        "counts": {c: {"cases": len(cohort[c]), "usable": len(datasets[c].cases), "he": int(datasets[c].labels().sum()),
                       "excluded": len(datasets[c].excluded)} for c in cohort},
        "excluded": excluded,
        "split": {"fit_cases": len(fit_rois), "held_out_cases": len(held_rois), "held_out_he": int(y_held.sum())},
        "training": result.metrics,
        "history": result.history,
        "calibration": asdict(calibration),
        "thresholds": thresholds,
        "baselines": {n: b.describe() for n, b in baselines.items()},
        "internal": internal,
        "external": external,
        "comparisons": comparisons,
        "oracle": oracle,
        "files": {"weights": weights.name, "record": "classifier.json", "predictions": "predictions.csv", **plots},
        "seconds": time.perf_counter() - wall,
    }
    config = {"command": sys.argv, "data_root": str(data_root), "train_centers": list(train_centers),
              "test_centers": list(test_centers), "profile": loaded_profile.get("name", profile), "seed": seed,
              "mask_source": metrics["mask_source"], "threads": torch.get_num_threads(),
              "classifier": settings.as_dict(), "architecture": record["architecture"],
              "windows": [list(w) for w in windows], "budget": asdict(budget), "versions": versions()}
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    if not quiet:
        print_summary(metrics)
    return metrics


def _fmt_auc(entry: dict | None) -> str:
    if not entry or entry.get("auc") is None or (isinstance(entry.get("auc"), float) and not math.isfinite(entry["auc"])):
        return "n/a"
    lo, hi = entry["auc_ci_delong"]
    if "auc_ci_bootstrap" not in entry:
        return f"{entry['auc']:.3f} ({lo:.3f}-{hi:.3f})"
    blo, bhi = entry["auc_ci_bootstrap"]
    return f"{entry['auc']:.3f} ({lo:.3f}-{hi:.3f}; boot {blo:.3f}-{bhi:.3f})"


def print_summary(metrics: dict) -> None:
    """The external results as a plain table (stdout)."""
    ext = metrics["external"]
    groups = list(ext["vit"])
    print("\nExternal evaluation (AUC, DeLong 95% CI; bootstrap 95% CI); vit = "
          + metrics.get("classifier", "ViT"))
    print(f"{'':10s} " + " ".join(f"{g:>44s}" for g in groups))
    for name in ("vit", "markers", "volume"):
        print(f"{name:10s} " + " ".join(f"{_fmt_auc(ext[name][g]):>44s}" for g in groups))
    if metrics.get("oracle"):
        og = metrics["oracle"]["groups"]
        print(f"{'oracle':10s} " + " ".join(f"{_fmt_auc(og.get(g)):>44s}" for g in groups))
        print(f"{'phen. LR':10s} " + " ".join(f"{og[g]['phenotype_lr_auc']:>44.3f}" if 'phenotype_lr_auc' in og.get(g, {})
                                               else f"{'n/a':>44s}" for g in groups))
        print(f"{'vit/oracle':10s} " + " ".join(f"{og[g]['vit_ratio']:>44.3f}" if g in og and 'vit_ratio' in og[g]
                                                else f"{'n/a':>44s}" for g in groups))
    for g in groups:
        t = ext["vit"][g].get("at_threshold")
        if t:
            print(f"vit @ {t['threshold']:.3f} ({g}): sens {t['sensitivity']:.2f} spec {t['specificity']:.2f} "
                  f"PPV {t['ppv']:.2f} NPV {t['npv']:.2f}"
                  + (f"  Brier {ext['vit'][g]['brier']:.3f}" if 'brier' in ext['vit'][g] else ""))
    for g, comp in metrics.get("comparisons", {}).items():
        c = comp["vit_vs_volume"]
        print(f"DeLong vit vs volume ({g}): diff {c['diff']:+.3f} p={c['p']:.3f}")
    if metrics["excluded"]:
        print(f"{len(metrics['excluded'])} case(s) excluded (reasons in metrics.json)")
