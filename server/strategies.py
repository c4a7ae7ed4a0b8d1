"""The aggregation strategy named in the run config, built from Flower's own implementations."""

from __future__ import annotations

from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedMedian, FedProx,
                                     FedTrimmedAvg, Krum)

from common.federation.settings import FederationSettings


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
    if name == "fedadam":
        return FedAdam(eta=1e-2, eta_l=1e-2, **common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=0.2, **common)
    if name == "krum":
        return Krum(num_malicious_nodes=0, **common)
    return FedAvg(**common)
