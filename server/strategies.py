"""The aggregation strategy named in the run config, built from Flower's own implementations.

Flower's robust aggregators are tuned for many clients; at hemex's 3-5 sites they protect
nothing as configured by default (FedTrimmedAvg(beta=0.2) trims no site below 5, Krum assumes no
attacker, FedMedian lets NaN through). The subclasses here keep Flower's classes and fix that:
the trimmed mean trims at least one site per side from 3 sites up, Krum/Multi-Krum assume at
least one attacker, and median and trimmed mean ignore non-finite values. Every strategy is
wrapped by server/guard.py, which validates replies and caps example-count weights first.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian, FedProx,
                                     FedTrimmedAvg, Krum, MultiKrum)

from common.federation.settings import FederationSettings

TRIM_FRACTION = 0.2  # of the sites, per side; at least one from 3 sites up


def trim_count(n: int, fraction: float = TRIM_FRACTION) -> int:
    """Sites trimmed per side: at least one from 3 sites up (none below: nothing would remain)."""
    return max(1, int(fraction * n)) if n >= 3 else 0


def assumed_attackers(n: int, configured: int = 0) -> int:
    """Krum's f: `configured` when set (> 0), else at least one and at most what its n >= 2f + 3
    condition allows."""
    return configured if configured > 0 else max(1, (n - 3) // 2)


def _finite_stack(layers: list[np.ndarray]) -> np.ndarray:
    stack = np.stack([np.asarray(layer, dtype=np.float64) for layer in layers])
    stack[~np.isfinite(stack)] = np.nan
    return stack


def robust_median(layers: list[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median of the finite values (NaN where no site has one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN coordinates
        return np.nanmedian(_finite_stack(layers), axis=0)


def robust_trimmed_mean(layers: list[np.ndarray], fraction: float = TRIM_FRACTION) -> np.ndarray:
    """Coordinate-wise mean of the finite values after trimming `trim_count` per side (the
    median where too few finite values remain to trim)."""
    stack = _finite_stack(layers)
    k = trim_count(len(layers), fraction)
    ordered = np.sort(stack, axis=0)  # NaN last
    finite = np.isfinite(stack).sum(axis=0)
    rank = np.arange(len(layers)).reshape((-1,) + (1,) * (stack.ndim - 1))
    keep = (rank >= k) & (rank < finite - k)
    kept = keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(keep, ordered, 0.0).sum(axis=0) / kept
    return np.where(kept > 0, mean, robust_median(layers))


class _CoordinateWise:
    """aggregate_train of a Flower strategy replaced by a coordinate-wise statistic of the
    replies' arrays (unweighted); metrics stay Flower's weighted mean."""

    statistic: Callable[[list[np.ndarray]], np.ndarray]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        records = [next(iter(m.content.array_records.values())) for m in valid]
        arrays = ArrayRecord()
        for key in records[0]:
            layers = [r[key].numpy() for r in records]
            dtype = layers[0].dtype if np.issubdtype(layers[0].dtype, np.floating) else np.float64  # guard casts ints
            arrays[key] = Array(np.asarray(self.statistic(layers), dtype=dtype))
        return arrays, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


class RobustMedian(_CoordinateWise, FedMedian):
    def statistic(self, layers):
        return robust_median(layers)


class RobustTrimmedAvg(_CoordinateWise, FedTrimmedAvg):
    def statistic(self, layers):
        return robust_trimmed_mean(layers, self.beta)


class _AtLeastOneAttacker:
    """Krum's number of malicious nodes set from the round's replies: at least one."""

    select_all_but_attackers = False
    configured_attackers = 0  # krum-attackers; 0: from the round's reply count

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        n = sum(1 for r in replies if not r.has_error())
        self.num_malicious_nodes = assumed_attackers(n, self.configured_attackers)
        if self.select_all_but_attackers:
            self.num_nodes_to_select = max(1, n - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


class RobustKrum(_AtLeastOneAttacker, Krum):
    pass


class RobustMultiKrum(_AtLeastOneAttacker, MultiKrum):
    select_all_but_attackers = True  # average the n - f most central replies


def build_strategy(settings: FederationSettings, n_nodes: int):
    strategy = base_strategy(settings, n_nodes)
    if settings.dp_noise_multiplier > 0:
        # Central DP: each site's update is clipped to dp-clipping-norm and Gaussian noise is
        # added to the aggregate. Flower skips aggregation in a round with any failed reply.
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=settings.dp_noise_multiplier, clipping_norm=settings.dp_clipping_norm,
            num_sampled_clients=n_nodes)
    return strategy


def base_strategy(settings: FederationSettings, n_nodes: int):
    """Every training centre takes part in every round (cross-silo: few, reliable sites), and
    a round waits for no more nodes than the run has."""
    common = dict(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n_nodes,
                  min_evaluate_nodes=n_nodes, min_available_nodes=n_nodes)
    name = settings.strategy
    if name == "fedprox":
        # Flower's FedProx only forwards mu; the client adds the proximal term to its loss.
        return FedProx(proximal_mu=settings.proximal_mu, **common)
    if name == "fedadam":  # eta_l is only recorded by Flower; the sites use the profile's learning rates
        return FedAdam(eta=settings.server_lr, eta_l=settings.server_lr, **common)
    if name == "fedmedian":
        return RobustMedian(**common)
    if name == "fedtrimmedavg":
        return RobustTrimmedAvg(beta=settings.trim_fraction, **common)
    if name in ("krum", "multikrum"):
        f = assumed_attackers(n_nodes, settings.krum_attackers)
        if name == "krum":
            strategy = RobustKrum(num_malicious_nodes=f, **common)
        else:
            strategy = RobustMultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, n_nodes - f), **common)
        strategy.configured_attackers = settings.krum_attackers
        return strategy
    return FedAvg(**common)
