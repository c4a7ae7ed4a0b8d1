"""Segmentation training settings: the profile's [segmentation] section, validated once.

A profile (configs/profiles/<name>.toml) sizes the run for the hardware; command-line flags
override single values. Every value is checked here so a typo fails before any data is read.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields

from common.errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "auto")


@dataclass(frozen=True)
class SegmentationSettings:
    model: str = "umamba-bot"
    # Per-architecture overrides of the network defaults, e.g. anisotropic kernels for U-Mamba.
    model_overrides: dict = field(default_factory=dict)
    patch_size: tuple[int, int, int] = (16, 64, 64)  # (z, y, x) voxels on the working grid
    batch_size: int = 2
    epochs: int = 10
    steps_per_epoch: int = 25  # patch-based training has no natural epoch: one epoch = this many batches
    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.99  # SGD only
    schedule: str = "poly"
    grad_clip: float = 12.0
    foreground_fraction: float = 1 / 3  # share of patches centred on a hematoma voxel
    hard_negative_fraction: float = 0.0  # share centred on a blood-dense non-hematoma voxel (patches.py)
    precision: str = "fp32"  # training forward pass: fp32, bf16 autocast, or auto (segmentation.uses_bf16)
    augment: bool = True
    val_fraction: float = 0.1  # of each training centre, held out to pick the best checkpoint
    val_every: int = 1  # epochs between validations
    max_val_cases: int = 0  # 0 = all held-out cases; a cap keeps validation cheap on CPUs
    sw_overlap: float = 0.25  # sliding-window overlap at inference
    sw_batch_size: int = 4
    roi_size: tuple[int, int, int] | None = None  # inference window; None = patch_size
    satellite_mm: float = 0.0  # > 0: keep the main lesion and components this close to it (postprocess.py)

    def __post_init__(self):
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(f"segmentation.patch_size must be three positive ints (z, y, x), got {self.patch_size}")
        if self.roi_size is not None and (len(self.roi_size) != 3 or min(self.roi_size) < 1):
            raise ConfigError(f"segmentation.roi_size must be three positive ints (z, y, x), got {self.roi_size}")
        positive = ("batch_size", "epochs", "steps_per_epoch", "val_every", "sw_batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"segmentation.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip <= 0:
            raise ConfigError("segmentation.lr and grad_clip must be > 0 and weight_decay >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"segmentation.optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"segmentation.precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"segmentation.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ConfigError(f"segmentation.foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if not 0.0 <= self.hard_negative_fraction <= 1.0 - self.foreground_fraction:
            raise ConfigError("segmentation.hard_negative_fraction must be in [0, 1 - foreground_fraction], "
                              f"got {self.hard_negative_fraction}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"segmentation.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ConfigError(f"segmentation.sw_overlap must be in [0, 1), got {self.sw_overlap}")
        if self.satellite_mm < 0:
            raise ConfigError(f"segmentation.satellite_mm must be >= 0, got {self.satellite_mm}")
        if self.max_val_cases < 0:
            raise ConfigError(f"segmentation.max_val_cases must be >= 0, got {self.max_val_cases}")

    @classmethod
    def from_profile(cls, profile: dict, **overrides) -> "SegmentationSettings":
        """Settings from a loaded profile's [segmentation] table, then `overrides` (None = keep)."""
        section = copy.deepcopy(profile.get("segmentation", {}))
        model_tables = section.pop("models", {})
        known = {f.name for f in fields(cls)} - {"model_overrides"}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"profile {profile.get('name', '?')!r}: unknown [segmentation] key(s) "
                              f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
        section.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("patch_size", "roi_size"):
            if section.get(key) is not None:
                section[key] = tuple(int(v) for v in section[key])
        model = section.get("model", cls.model)
        try:
            return cls(model_overrides=dict(model_tables.get(model, {})), **section)
        except TypeError as err:  # a value of the wrong type in the TOML
            raise ConfigError(f"profile {profile.get('name', '?')!r}: invalid [segmentation] value: {err}") from err

    @property
    def inference_roi(self) -> tuple[int, int, int]:
        return tuple(self.roi_size or self.patch_size)  # type: ignore[return-value]

    def as_dict(self) -> dict:
        return asdict(self)
