"""Federation run settings: the kebab-case keys of `[tool.flwr.app.config]`, parsed and checked once.

The same keys come from pyproject.toml defaults, `flwr run --run-config` overrides, or the
`hemex federate` command; every value is validated before any message is sent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
RATIOS = ("none", "1:1", "1:2")
# Where the classifier's training and calibration ROIs (and fused markers) are cut: on the
# reference masks (default; the segmentation's errors are then seen only at test time) or on the
# federated segmentation model's masks, as at inference. "segmentation" costs each training site
# one segmentation inference per case (the main job: +280 s on 2 cores, over its 15-minute
# budget) and, with the CPU profile's short segmentation training, it lowered the paper cohort's
# pooled external AUC (0.690 -> 0.588) while it raised a central experiment on the development
# cohort (0.73 -> 0.79); see README.
CLS_MASKS = ("reference", "segmentation")
# Classifier arms compared on the held-out centres (all share the federated segmentation model):
#   federated     FedAvg-style rounds over the training centres (with on-site synthesis if enabled)
#   no-synthesis  the same rounds, seeds and budget without synthetic ROIs (ablation)
#   local         each training centre alone, same total epochs (one model per centre)
#   centralized   one virtual node holding every training centre's cases (simulation only)
#   baselines     the volume-only and markers-only logistic regressions on the NCCT markers,
#                 fitted over the training centres from aggregates (server/baselines.py)
ARMS = ("federated", "no-synthesis", "local", "centralized", "baselines")
POOLED = "pooled"  # the centralized arm's virtual node


def split_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


@dataclass(frozen=True)
class FederationSettings:
    data_root: str = ""  # simulation: DATA_ROOT of every centre; deployment: unused (node-config data-path)
    centers: tuple[str, ...] = ()  # simulation: partition-id -> centre; deployment: expected centres
    test_centers: tuple[str, ...] = ()  # held out: evaluation messages only, never training
    profile: str = "cpu"
    seed: int = 0
    strategy: str = "fedavg"
    # Strategy hyperparameters. proximal-mu reaches the sites only through FedProx's train
    # messages (their config's "proximal-mu"), as Flower sends it; the others stay on the server.
    proximal_mu: float = 0.0
    server_lr: float = 0.01  # FedAdam's server learning rate (eta)
    trim_fraction: float = 0.2  # FedTrimmedAvg: share of the sites trimmed per side (at least one from 3 sites)
    krum_attackers: int = 0  # Krum / Multi-Krum's f; 0: as many as n >= 2f + 3 allows, at least one
    fedbn: bool = False
    dp_noise_multiplier: float = 0.0  # > 0: Flower's server-side DP (fixed clipping + Gaussian noise)
    dp_clipping_norm: float = 1.0
    dp_sgd_noise_multiplier: float = 0.0  # > 0: client-side DP-SGD (Opacus) for the classifier, per patient
    dp_sgd_max_grad_norm: float = 1.0
    dp_sgd_delta: float = 1e-5
    seg_model: str = ""  # empty: the profile's segmentation model
    seg_rounds: int = 3
    seg_epochs: int = 2  # local epochs per round
    # Federated self-supervised pretraining of the classifier's encoder before its arms train
    # (masked image modelling on every ROI slice, labelled or not); 0 = off (measured: no gain yet).
    ssl_rounds: int = 0
    cls_rounds: int = 3
    cls_epochs: int = 4  # x cls-rounds = the profile's 12 classifier epochs
    cls_masks: str = "reference"  # see CLS_MASKS
    synthesis: str = "1:2"
    arms: tuple[str, ...] = ("federated",)
    round_timeout_s: float = 3600.0
    # A connected but silent site (hung, stopped) is dropped from a round once half of the sites have
    # answered in t seconds and straggler-factor x t + straggler-grace-s have passed (server/grid.py);
    # 0 waits for round-timeout-s. Generous: a site with a slower CPU or more cases is not a straggler.
    straggler_factor: float = 4.0
    straggler_grace_s: float = 120.0
    # Reply validation (server/guard.py): a round needs this many valid training replies (capped
    # at the number of training centres), the run stops after more failed rounds than allowed,
    # and a site's example-count weight is capped at this multiple of the median site's.
    min_valid_replies: int = 2
    max_failed_rounds: int = 1
    max_weight_ratio: float = 2.0
    # Small groups (client/app.py): a site withholds every aggregate of fewer cases (it sends the
    # counts and withheld = 1), and scores at most this many classifier models (round
    # evaluations and final arms) per run. A site's node-config may tighten both, never loosen.
    min_aggregate_cases: int = 5
    max_cls_scorings: int = 32
    bundle_key: str = ""  # the coordinator's Ed25519 key (hemex certs: bundle.key) signing the model bundle
    node_wait_s: float = 120.0
    out_dir: str = "runs/federation"
    # Simulation: each virtual site keeps reusable work (trained generators) in <cache-dir>/<centre>;
    # empty: <out-dir>/site-cache. A study shares one across its folds. Deployed sites choose their
    # own (node-config cache-dir, default <work-dir>/cache); the coordinator never names site paths.
    cache_dir: str = ""
    resume: bool = True

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} unknown; use one of {', '.join(STRATEGIES)}")
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ConfigError("strategy 'fedprox' needs proximal-mu > 0")
        if self.server_lr <= 0 or not 0 <= self.trim_fraction < 0.5 or self.krum_attackers < 0:
            raise ConfigError("server-lr must be > 0, trim-fraction in [0, 0.5) and krum-attackers >= 0")
        if self.cls_masks not in CLS_MASKS:
            raise ConfigError(f"cls-masks {self.cls_masks!r} unknown; use one of {', '.join(CLS_MASKS)}")
        if self.synthesis not in RATIOS:
            raise ConfigError(f"synthesis {self.synthesis!r} unknown; use one of {', '.join(RATIOS)}")
        unknown_arms = set(self.arms) - set(ARMS)
        if unknown_arms or "federated" not in self.arms:
            raise ConfigError(f"arms {','.join(self.arms)!r}: must include 'federated', from {', '.join(ARMS)}")
        if POOLED in self.centers:
            raise ConfigError(f"centre id {POOLED!r} is reserved for the centralized arm's pooled node")
        for name in ("seg_rounds", "cls_rounds", "ssl_rounds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 0")
        for name in ("seg_epochs", "cls_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1")
        if self.dp_noise_multiplier < 0 or self.dp_clipping_norm <= 0:
            raise ConfigError("dp-noise-multiplier must be >= 0 and dp-clipping-norm > 0")
        if self.dp_sgd_noise_multiplier < 0 or self.dp_sgd_max_grad_norm <= 0 or not 0 < self.dp_sgd_delta < 1:
            raise ConfigError("dp-sgd-noise-multiplier must be >= 0, dp-sgd-max-grad-norm > 0 and 0 < dp-sgd-delta < 1")
        if self.dp_sgd_noise_multiplier > 0 and self.proximal_mu > 0:
            raise ConfigError("dp-sgd-noise-multiplier with proximal-mu: DP-SGD has no proximal term; use fedavg")
        if self.round_timeout_s <= 0 or self.node_wait_s <= 0:
            raise ConfigError("round-timeout-s and node-wait-s must be > 0")
        if self.straggler_factor != 0 and self.straggler_factor < 1 or self.straggler_grace_s < 0:
            raise ConfigError("straggler-factor must be 0 (off) or >= 1, and straggler-grace-s >= 0")
        if self.min_valid_replies < 1 or self.max_failed_rounds < 0 or self.max_weight_ratio < 1:
            raise ConfigError("min-valid-replies must be >= 1, max-failed-rounds >= 0 and max-weight-ratio >= 1")
        if self.min_aggregate_cases < 1 or self.max_cls_scorings < 1:
            raise ConfigError("min-aggregate-cases and max-cls-scorings must be >= 1")
        if self.cls_scorings_needed > self.max_cls_scorings:
            raise ConfigError(f"cls-rounds {self.cls_rounds} with arms {','.join(self.arms)} ask each training site to "
                              f"score {self.cls_scorings_needed} classifier models, over max-cls-scorings "
                              f"{self.max_cls_scorings}")
        unknown = set(self.test_centers) - set(self.centers) if self.centers else set()
        if unknown:
            raise ConfigError(f"test-centers {', '.join(sorted(unknown))} not among centers {', '.join(self.centers)}")
        if self.centers and not self.train_centers:
            raise ConfigError("every centre is held out: at least one centre must train")

    @property
    def train_centers(self) -> tuple[str, ...]:
        return tuple(c for c in self.centers if c not in self.test_centers)

    @property
    def cls_scorings_needed(self) -> int:
        """Classifier models a training site scores in a run: one per round of each arm trained in
        rounds, then every arm once on its validation cases (held-out sites score only the arms).
        The two baseline arms are fitted without scoring (aggregate Newton terms) and scored once."""
        if self.cls_rounds == 0:
            return 0
        no_synthesis = "no-synthesis" in self.arms and self.synthesis != "none"
        n_train = len(self.train_centers) if self.centers else 1
        arms = (1 + no_synthesis + ("local" in self.arms) * n_train + ("centralized" in self.arms)
                + 2 * ("baselines" in self.arms))
        return self.cls_rounds * (1 + no_synthesis) + arms

    @property
    def node_centers(self) -> tuple[str, ...]:
        """Centres with a node, in partition-id order; the pooled node last when it is needed."""
        return self.centers + ((POOLED,) if "centralized" in self.arms else ())

    @classmethod
    def from_run_config(cls, run_config: dict) -> "FederationSettings":
        known = {f.replace("_", "-") for f in cls.__dataclass_fields__}
        unknown = sorted(set(run_config) - known)
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = {}
        for key, value in run_config.items():
            field = key.replace("-", "_")
            default = cls.__dataclass_fields__[field].default
            try:
                if isinstance(default, tuple):
                    values[field] = split_list(value)
                elif isinstance(default, bool):
                    values[field] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                else:
                    values[field] = type(default)(value)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"run-config {key} = {value!r}: {err}") from err
        return cls(**values)

    def to_run_config(self) -> dict:
        """Flat kebab-case dict (lists joined by commas), as Flower's run config holds it."""
        out = {}
        for field, value in asdict(self).items():
            out[field.replace("_", "-")] = ",".join(value) if isinstance(value, tuple) else value
        return out
