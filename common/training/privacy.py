"""Client-side differential privacy for the HE classifier: DP-SGD with Opacus, patient-level.

The privacy unit is the patient. Each Poisson-sampled example is one patient, represented by
one of its ROI slices drawn at random (and augmented): the example is a randomized function of
that patient's record alone, its gradient is clipped to `max_grad_norm`, and Gaussian noise of
`noise_multiplier x max_grad_norm` is added to every step's sum, so the RDP accountant's
(epsilon, delta) holds per patient. Rounds compose: the site keeps its step count across
rounds and reports the epsilon of all its steps so far.

Not covered by the guarantee, by design of the rest of the pipeline (documented in the
README): synthetic ROIs (the site's generator is not trained privately, so DP-SGD training
uses real ROIs only), the validation histograms behind the operating point, and the
segmentation model.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.data.preprocess import DEFAULT_WINDOWS
from common.data.roi import CaseROIs
from common.errors import DataError
from common.files import seed_everything
from common.networks.vit import marker_inputs
from common.training.classification.rois import case_markers, roi_array
from common.training.classification.settings import ClassifierSettings
from common.training.classification.training import classifier_step, make_optimizer


@dataclass(frozen=True)
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5


class PatientSlices(Dataset):
    """One example per patient: a random one of its ROI slices (drawn anew at every access), its
    marker vector (zero-width for a classifier without marker input) and its label."""

    def __init__(self, rois: Sequence[CaseROIs], mask_channel: bool, generator: torch.Generator, n_markers: int = 0):
        self.arrays = [torch.from_numpy(roi_array(r, mask_channel)) for r in rois]
        self.markers = [torch.from_numpy(case_markers(r, n_markers)) if n_markers else torch.zeros(0) for r in rois]
        self.labels = torch.tensor([float(r.he) for r in rois])
        self.generator = generator

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int):
        slices = self.arrays[index]
        pick = int(torch.randint(len(slices), (1,), generator=self.generator))
        return slices[pick], self.markers[index], self.labels[index]


def epsilon(dp: DPSettings, sample_rate: float, steps: int) -> float:
    """Epsilon (RDP accountant) of `steps` DP-SGD steps at this sample rate, for dp.delta."""
    if steps <= 0:
        return 0.0
    from opacus.accountants import RDPAccountant  # Opacus is loaded only where DP-SGD runs

    accountant = RDPAccountant()
    accountant.history = [(dp.noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(dp.delta))


def train_classifier_dp(model: nn.Module, train_rois: Sequence[CaseROIs], epochs: int, dp: DPSettings, *,
                        settings: ClassifierSettings, seed: int = 0, windows=DEFAULT_WINDOWS,
                        prior_steps: int = 0, schedule_offset: int = 0, schedule_total: int | None = None) -> dict:
    """Train `model` in place for `epochs` passes of Poisson-sampled patients with DP-SGD.

    `prior_steps`: DP-SGD steps this site already took on the same data in earlier rounds
    (the returned epsilon covers them too). Returns metrics: train_loss, steps, total_steps,
    sample_rate, epsilon, delta, seconds.
    """
    if dp.noise_multiplier <= 0 or dp.max_grad_norm <= 0 or not 0 < dp.delta < 1:
        raise ValueError("DP-SGD needs noise_multiplier > 0, max_grad_norm > 0 and 0 < delta < 1")
    labels = [r.he for r in train_rois]
    if 0 in (sum(labels), len(labels) - sum(labels)):
        raise DataError("training set", "DP-SGD needs both HE and non-HE patients")
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    n_markers = marker_inputs(model)
    dataset = PatientSlices(train_rois, settings.mask_channel, generator, n_markers)
    batch = min(settings.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch, generator=torch.Generator().manual_seed(seed + 1))
    pos_weight = torch.tensor((len(labels) - sum(labels)) / sum(labels) if settings.balance == "weighted_loss" else 1.0)
    optimizer = make_optimizer(model, settings)
    model.train()  # Opacus validates the module in training mode
    # Per-sample gradients (functorch vmap, set up now) cannot run random layers: stochastic depth
    # and dropout stay off under DP-SGD, whose noise already regularizes.
    for module in model.modules():
        if isinstance(module, (DropPath, nn.Dropout)):
            module.eval()
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and functorch fallbacks
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=True)
    sample_rate = batch / len(dataset)
    steps_per_epoch = max(1, len(dataset) // batch)
    total = schedule_total or epochs * steps_per_epoch
    widths = [float(w) for _, w in windows]
    losses, step, start = [], 0, time.perf_counter()
    try:
        with warnings.catch_warnings():
            # functorch's fallback for CPU attention is slower but exact
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for _ in range(epochs):
                for xb, fb, yb in loader:
                    if len(xb) == 0:  # Poisson sampling drew nobody: the step still releases noise
                        noise_only_step(optimizer, dp, batch)
                        step += 1
                        continue
                    # Opacus clips per patient and adds the noise inside optimizer.step: no norm clip here.
                    losses.append(classifier_step(private, optimizer, (xb, fb if n_markers else None, yb), step,
                                                  (schedule_offset, total), settings=settings, generator=generator,
                                                  widths=widths, pos_weight=pos_weight))
                    step += 1
    finally:
        private._close()  # detach Opacus' hooks: `model` is a plain module again
    model.eval()
    all_steps = prior_steps + step
    return {"train_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else float("nan"), "steps": step,
            "total_steps": all_steps, "sample_rate": sample_rate, "epsilon": epsilon(dp, sample_rate, all_steps),
            "delta": dp.delta, "seconds": time.perf_counter() - start}


def noise_only_step(optimizer, dp: DPSettings, expected_batch: int) -> None:
    """DP-SGD on an empty batch: zero clipped gradients plus the same Gaussian noise, scaled
    as Opacus scales it (by the expected batch size). Skipping the step would reveal that the
    batch was empty, which depends on who was sampled."""
    for group in optimizer.original_optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad = torch.normal(0.0, dp.noise_multiplier * dp.max_grad_norm, param.shape) / expected_batch
    optimizer.original_optimizer.step()
    optimizer.original_optimizer.zero_grad(set_to_none=True)

