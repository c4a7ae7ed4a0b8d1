"""A training site's classifier training for one message: a federated round (its share of one
learning-rate schedule over the run's rounds) or a whole local run (the local-only and centralized
arms), with or without patient-level DP-SGD. The ClientApp handler only loads and replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from common.data.roi import CaseROIs
from common.training.classification.settings import ClassifierSettings
from common.training.classification.training import Budget, train_classifier
from common.training.privacy import DPSettings, train_classifier_dp


@dataclass(frozen=True)
class Schedule:
    """Epochs of this message and where they sit in the learning-rate schedule."""

    epochs: int
    offset: int = 0
    total: int | None = None  # None: the schedule spans this message's steps


def steps_per_epoch(fit: Sequence[CaseROIs], settings: ClassifierSettings, dp: bool) -> int:
    """Optimizer steps of one epoch: over ROI slices, or over patients under DP-SGD (it samples patients)."""
    if dp:
        return max(1, len(fit) // max(1, min(settings.batch_size, len(fit))))
    return max(1, sum(len(r.images) for r in fit) // settings.batch_size)


def round_schedule(fit: Sequence[CaseROIs], settings: ClassifierSettings, dp: bool, epochs: int, server_round: int,
                   rounds: int) -> Schedule:
    """A federated round's epochs, continuing one schedule across the run's rounds."""
    per_epoch = steps_per_epoch(fit, settings, dp)
    return Schedule(epochs, (server_round - 1) * epochs * per_epoch, rounds * epochs * per_epoch)


def train_at_site(model: nn.Module, fit: Sequence[CaseROIs], schedule: Schedule, *, settings: ClassifierSettings,
                  windows, seed: int, dp: DPSettings | None = None, dp_prior_steps: int = 0, extra_he_rois=None,
                  extra_he_masks=None, proximal_mu: float = 0.0, aux_targets: dict | None = None) -> dict:
    """Train `model` in place; the reply's metrics (kebab-case), plus "dp-steps" under DP-SGD (the
    site's running total, which the caller keeps for the next round's accounting)."""
    if dp is not None:  # patient-level DP-SGD; synthetic ROIs are left out (their generator is not private)
        trained = train_classifier_dp(model, fit, schedule.epochs, dp, settings=settings, seed=seed, windows=windows,
                                      prior_steps=dp_prior_steps, schedule_offset=schedule.offset,
                                      schedule_total=schedule.total)
        return {"train-loss": trained["train_loss"], "num-synthetic": 0, "dp-epsilon": trained["epsilon"],
                "dp-delta": dp.delta, "dp-steps": int(trained["total_steps"]), "seconds": trained["seconds"]}
    result = train_classifier(model, fit, Budget(epochs=schedule.epochs), seed=seed, extra_he_rois=extra_he_rois,
                              extra_he_masks=extra_he_masks, proximal_mu=proximal_mu, settings=settings,
                              windows=windows, aux_targets=aux_targets, schedule_offset=schedule.offset,
                              schedule_total=schedule.total)
    return {"train-loss": result.metrics["train_loss"], "num-synthetic": int(result.metrics.get("num_extra", 0)),
            "seconds": float(result.metrics.get("seconds", 0.0))}
