"""Name -> 3D segmentation network, timm-style.

Each builder is registered with ``@register_model(name, defaults)``; ``create_model`` merges
keyword overrides into a copy of the defaults and rejects keys the model does not take, so a
typo in a config file fails loudly instead of being ignored.

Output convention (all models): ``(B, C, D, H, W) -> (B, out_channels, D, H, W)`` logits in
eval mode. U-Mamba with ``deep_supervision`` returns a list (full resolution first) in
training mode; MONAI models always return one tensor. ``as_output_list`` makes both a list.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from common.errors import ConfigError
from common.networks.umamba import UMAMBA_PRESETS, UMamba

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {}


def register_model(name: str, defaults: dict | None = None):
    """Decorator registering ``fn(in_channels, out_channels, **cfg) -> nn.Module`` under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = (fn, dict(defaults or {}))
        return fn

    return deco


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str):
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def get_default_config(name: str) -> dict:
    """A copy of the defaults ``create_model(name)`` uses (without in/out channels)."""
    return copy.deepcopy(_lookup(name)[1])


def create_model(name: str, in_channels: int = 3, out_channels: int = 2, **overrides) -> nn.Module:
    """Build model ``name`` from its defaults updated with ``overrides``.

    Raises ConfigError for an unknown name (listing the available ones) or an unknown key.
    """
    fn, defaults = _lookup(name)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(f"model {name!r} has no setting {', '.join(unknown)}; settings: {', '.join(sorted(defaults))}")
    cfg = {**copy.deepcopy(defaults), **overrides}
    return fn(in_channels=in_channels, out_channels=out_channels, **cfg)


def as_output_list(out: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    """Model output as a list, full-resolution logits first (deep-supervision outputs follow)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


def main_output(out: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution logits of any model output."""
    return as_output_list(out)[0]


# --- U-Mamba ---------------------------------------------------------------------------

_UMAMBA_DEFAULTS = dict(
    **copy.deepcopy(UMAMBA_PRESETS["cpu"]),
    kernel_sizes=3,
    deep_supervision=True,
    mamba_backend="auto",
    mamba_pscan=True,
    d_state=16,
    d_conv=4,
    expand=2,
)


@register_model("umamba-bot", _UMAMBA_DEFAULTS)
def umamba_bot(in_channels: int, out_channels: int, **cfg) -> nn.Module:
    return UMamba(in_channels, out_channels, variant="bot", **cfg)


@register_model("umamba-enc", _UMAMBA_DEFAULTS)
def umamba_enc(in_channels: int, out_channels: int, **cfg) -> nn.Module:
    return UMamba(in_channels, out_channels, variant="enc", **cfg)


# --- MONAI baselines -------------------------------------------------------------------
# Subclassed only to add the same clear input check as U-Mamba; state-dict keys are
# MONAI's own, so checkpoints stay loadable into plain MONAI networks.


def _check_5d(model: nn.Module, x: torch.Tensor, multiple: tuple[int, int, int]) -> None:
    name = type(model).__name__
    if x.ndim != 5:
        raise ValueError(f"{name} expects a 5D input (B, C, D, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] != model.in_channels:
        raise ValueError(f"{name} expects {model.in_channels} input channels; got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % m for s, m in zip(spatial, multiple)):
        raise ValueError(
            f"{name} input spatial size (D, H, W) = {spatial} must be a multiple of {multiple}; pad or crop it"
        )


def _total_stride(strides) -> tuple[int, int, int]:
    tot = [1, 1, 1]
    for s in strides:
        s3 = (s,) * 3 if isinstance(s, int) else tuple(s)
        tot = [a * b for a, b in zip(tot, s3)]
    return tuple(tot)  # type: ignore[return-value]


_MONAI_CLASSES: dict[str, type] = {}


def _monai_nets() -> tuple[type, type]:
    """The checked MONAI classes, defined on first use.

    MONAI's import takes several seconds, so it is deferred until a baseline is built; the
    classes are cached under module-level names (see ``__getattr__``) so pickling works.
    """
    if not _MONAI_CLASSES:
        from monai.networks.nets import DynUNet, SegResNet, UNet

        class CheckedUNet(UNet):
            """monai.networks.nets.UNet with an input-shape check."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.deep_supervision = False
                self.required_multiple = _total_stride(self.strides)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                _check_5d(self, x, self.required_multiple)
                return super().forward(x)

        class CheckedSegResNet(SegResNet):
            """monai.networks.nets.SegResNet with an input-shape check."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.deep_supervision = False
                down = 2 ** (len(self.blocks_down) - 1)  # one stride-2 conv per level after the first
                self.required_multiple = (down, down, down)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                _check_5d(self, x, self.required_multiple)
                return super().forward(x)

        class CheckedDynUNet(DynUNet):
            """monai.networks.nets.DynUNet (nnU-Net's network) with an input-shape check; in training
            with deep supervision its stacked outputs become a list, full resolution first."""

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.required_multiple = _total_stride(self.strides)

            def forward(self, x: torch.Tensor):
                _check_5d(self, x, self.required_multiple)
                out = super().forward(x)
                return list(out.unbind(dim=1)) if self.training and self.deep_supervision else out

        for cls in (CheckedUNet, CheckedSegResNet, CheckedDynUNet):
            cls.__qualname__ = cls.__name__
            _MONAI_CLASSES[cls.__name__] = cls
    return _MONAI_CLASSES["CheckedUNet"], _MONAI_CLASSES["CheckedSegResNet"]


def __getattr__(name: str):
    # Lets pickle find the lazily defined classes by their module-level names.
    if name in ("CheckedUNet", "CheckedSegResNet", "CheckedDynUNet"):
        _monai_nets()
        return _MONAI_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@register_model(
    "unet",
    dict(
        channels=(8, 16, 32, 64),
        strides=((1, 2, 2), (2, 2, 2), (2, 2, 2)),
        num_res_units=2,
        norm="INSTANCE",
        dropout=0.0,
    ),
)
def unet(in_channels: int, out_channels: int, **cfg) -> nn.Module:
    CheckedUNet, _ = _monai_nets()
    return CheckedUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **cfg)


@register_model(
    "segresnet",
    dict(init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), norm=("GROUP", {"num_groups": 8}), dropout_prob=None),
)
def segresnet(in_channels: int, out_channels: int, **cfg) -> nn.Module:
    _, CheckedSegResNet = _monai_nets()
    return CheckedSegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, **cfg)


@register_model(
    "dynunet",
    # nnU-Net's network at the CPU profile's size: the U-Mamba's stages, kernels and widths, so the
    # two differ only by the Mamba layer and the residual blocks.
    dict(filters=(8, 16, 32, 64), kernel_size=((1, 3, 3), (1, 3, 3), 3, 3), strides=(1, (1, 2, 2), 2, 2),
         norm_name=("INSTANCE", {"affine": True}), deep_supervision=True, deep_supr_num=2, res_block=True),
)
def dynunet(in_channels: int, out_channels: int, **cfg) -> nn.Module:
    _monai_nets()
    strides = cfg["strides"]
    return _MONAI_CLASSES["CheckedDynUNet"](spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                                            upsample_kernel_size=strides[1:], **cfg)
