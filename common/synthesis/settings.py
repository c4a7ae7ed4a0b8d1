"""The [synthesis] section of a run profile: generator size, training budget, sampling, audit.

Every key is optional (the defaults below are the CPU-sized ones); an unknown key or a value of
the wrong kind is a ConfigError naming the profile and the key, so a typo never passes silently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from common.errors import ConfigError

GENERATORS = ("ukan", "unet")
OBJECTIVES = ("flow", "epsilon", "v")  # see common/synthesis/diffusion.py


@dataclass(frozen=True)
class SynthesisSettings:
    # ROIs the generator learns from (see common/data/roi.py): k largest hematoma slices per case,
    # a square of size_mm at `pixels` px, one channel per HU window (+ the mask when with_mask).
    pixels: int = 32
    size_mm: float = 80.0
    slices_per_case: int = 3
    with_mask: bool = True  # the classifier takes the hematoma mask as a 4th channel
    # True: the mask is not generated but given: the denoiser learns the HU windows around a mask, and
    # samples around the site's own HE masks, each moved by a random flip, rotation and scale.
    mask_condition: bool = False
    # Generator: "ukan" (UKANDenoiser) or "unet" (MONAI DiffusionModelUNet baseline).
    generator: str = "ukan"
    base_channels: int = 24
    channel_mult: tuple[int, ...] = (1, 2, 4)
    kan_levels: int = 1
    kan_layers: int = 2
    grid_size: int = 5
    spline_order: int = 3
    unet_channels: tuple[int, ...] = (16, 32, 64)  # chosen so both generators have ~0.6 M parameters
    conditional: bool = False  # False: train on HE ROIs only; True: class-conditional on HE and NHE ROIs
    # Training objective: "flow" (rectified flow), "epsilon" or "v" (DDPM, linear betas).
    objective: str = "flow"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    train_steps: int = 400
    max_train_seconds: float = 0.0  # > 0: stop training early when this wall-clock budget is spent
    batch_size: int = 16
    learning_rate: float = 5e-4
    warmup_steps: int = 20
    ema_decay: float = 0.995
    hflip: bool = True  # left-right mirror augmentation (a hematoma in either hemisphere)
    # Sampling: Euler steps (flow) or DDIM steps (epsilon, v); eta > 0 adds DDIM's noise.
    sample_steps: int = 25
    ddim_eta: float = 0.0
    sample_batch: int = 32
    # Class balance and audit.
    ratio: str = "1:2"
    max_synthetic: int = 2000
    audit_percentile: float = 5.0
    audit_max_shift: int = 2
    oversample: float = 1.25  # generate this many times the needed count, so rejections can be replaced
    realism_samples: int = 64  # generate at least this many candidates: the realism gate's sample
    realism_gate: bool = True  # drop every synthetic ROI when the set fails audit.realism_verdict

    def as_dict(self) -> dict:
        record = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}

    def with_overrides(self, **overrides) -> "SynthesisSettings":
        """A copy with the given (non-None) values replaced and validated."""
        values = {k: v for k, v in overrides.items() if v is not None}
        return _validated(replace(self, **_coerce(values, "override")), "override")


def _coerce(values: dict, source: str) -> dict:
    known = {f.name: f for f in fields(SynthesisSettings)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown [synthesis] key {key!r}; known: {', '.join(sorted(known))}")
        default = getattr(SynthesisSettings, key, None)
        try:
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise TypeError("expected true or false")
            elif isinstance(default, int):
                if isinstance(value, bool) or int(value) != value:
                    raise TypeError("expected an integer")
                value = int(value)
            elif isinstance(default, float):
                if isinstance(value, bool):
                    raise TypeError("expected a number")
                value = float(value)
            elif isinstance(default, str):
                value = str(value)
            elif key in ("channel_mult", "unet_channels"):
                value = tuple(int(v) for v in value)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{source}: [synthesis] {key} = {value!r}: {err}") from None
        out[key] = value
    return out


def _validated(settings: SynthesisSettings, source: str) -> SynthesisSettings:
    def bad(key: str, why: str):
        raise ConfigError(f"{source}: [synthesis] {key} = {getattr(settings, key)!r}: {why}")

    if settings.generator not in GENERATORS:
        bad("generator", f"choose one of {', '.join(GENERATORS)}")
    if settings.mask_condition and not settings.with_mask:
        bad("mask_condition", "needs with_mask = true (the mask it generates around is the 4th channel)")
    if settings.objective not in OBJECTIVES:
        bad("objective", f"choose one of {', '.join(OBJECTIVES)}")
    multiple = 2 ** (len(settings.channel_mult) - 1)
    if settings.pixels < 8 or settings.pixels % multiple:
        bad("pixels", f"must be >= 8 and divisible by {multiple} (2 ** (levels - 1) of channel_mult)")
    if 2 ** (len(settings.unet_channels) - 1) > settings.pixels or settings.pixels % 2 ** (len(settings.unet_channels) - 1):
        bad("unet_channels", "too many levels for the ROI size")
    if any(c % 8 for c in settings.unet_channels):
        bad("unet_channels", "every width must be a multiple of 8 (GroupNorm with 8 groups)")
    if not 0 <= settings.kan_levels < len(settings.channel_mult):
        bad("kan_levels", f"must be in 0..{len(settings.channel_mult) - 1}")
    for key in ("size_mm", "learning_rate", "beta_start", "beta_end", "oversample"):
        if getattr(settings, key) <= 0:
            bad(key, "must be > 0")
    for key in ("slices_per_case", "base_channels", "grid_size", "kan_layers", "train_steps", "batch_size",
                "num_train_timesteps", "sample_steps", "sample_batch", "realism_samples"):
        if getattr(settings, key) < 1:
            bad(key, "must be >= 1")
    if settings.beta_end <= settings.beta_start or settings.beta_end >= 1:
        bad("beta_end", "must lie in (beta_start, 1)")
    if settings.sample_steps > settings.num_train_timesteps:
        bad("sample_steps", "cannot exceed num_train_timesteps")
    if not 0 <= settings.ema_decay < 1:
        bad("ema_decay", "must be in [0, 1)")
    if not 0 <= settings.audit_percentile < 50:
        bad("audit_percentile", "must be in [0, 50)")
    if settings.audit_max_shift < 0 or 2 * settings.audit_max_shift >= settings.pixels // 2:
        bad("audit_max_shift", "must be >= 0 and small next to the ROI size")
    if settings.ddim_eta < 0:
        bad("ddim_eta", "must be >= 0")
    from common.synthesis.ratio import parse_ratio

    parse_ratio(settings.ratio)  # raises ConfigError naming the ratio
    return settings


def synthesis_settings(profile: dict | None = None, **overrides) -> SynthesisSettings:
    """Settings from a loaded profile's [synthesis] section (defaults where absent) plus overrides."""
    profile = profile or {}
    source = f"profile {profile.get('name', '?')!r}"
    section = profile.get("synthesis", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [synthesis] must be a table")
    settings = _validated(SynthesisSettings(**_coerce(section, source)), source)
    return settings.with_overrides(**overrides) if overrides else settings
