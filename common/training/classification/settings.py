"""The profile's [classifier] section (ClassifierSettings) and the classifier it builds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from torch import nn

from common.data.preprocess import DEFAULT_WINDOWS
from common.errors import ConfigError
from common.metrics.markers import MARKER_NAMES

AGGREGATIONS = ("mean_logit", "mean_prob")
CALIBRATIONS = ("platt", "temperature", "none")
BALANCING = ("weighted_loss", "sampler", "none")


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
