"""U-Mamba (Ma, Li & Wang 2024; bowang-lab/U-Mamba) for 3D segmentation, without nnU-Net.

Architecture as in the published ``UMambaBot_3d.py`` / ``UMambaEnc_3d.py``:

* encoder: a stem residual block at full resolution, then per stage a (possibly strided)
  residual block with a 1x1x1 projection shortcut followed by ``n - 1`` identity-shortcut
  residual blocks; every conv is Conv3d + InstanceNorm3d(affine=True) + LeakyReLU(0.01);
* variant ``"bot"``: one :class:`MambaLayer` on the bottleneck features;
  variant ``"enc"``: a :class:`MambaLayer` on the output of every encoder stage (the
  published UMambaEnc switches to channel tokens on tiny maps, which ties the network to one
  patch size; here the tokens are always voxels, so any divisible input size works);
* decoder: nearest upsampling + 1x1x1 conv, concatenation with the skip, residual blocks,
  and a 1x1x1 segmentation head per decoder stage.

Deep supervision: with ``deep_supervision=True`` and the module in training mode,
``forward`` returns a list ``[full-res, 1/stride, ...]`` (highest resolution first, one per
decoder stage); otherwise it returns the full-resolution logits tensor. All heads always
exist, so state dicts do not depend on this flag.

Cost of ``"enc"``: the first stage's Mamba runs over all D*H*W voxels at full resolution
(padded to the next power of two by mambapy), e.g. 32*96*96 = 294,912 tokens; on CPU this
dominates time and memory. ``"bot"`` only sees the bottleneck (e.g. 8*12*12 = 1,152 tokens).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.networks.mamba_layer import MambaLayer

Triple = tuple[int, int, int]

# Ready-made sizes; pass as create_model("umamba-bot", **UMAMBA_PRESETS["paper"]).
# Strides are (D, H, W): CT has ~5 mm slices, so the first stages only downsample in-plane.
UMAMBA_PRESETS: dict[str, dict] = {
    "cpu": dict(
        features=(8, 16, 32, 64),
        strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
        n_blocks_per_stage=(2, 2, 1, 1),
        n_blocks_decoder=(2, 2, 1),
    ),
    # nnU-Net-sized, as trained in the paper (features 32..320); for GPU sites.
    "paper": dict(
        features=(32, 64, 128, 256, 320),
        strides=((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
        n_blocks_per_stage=(2, 2, 2, 1, 1),
        n_blocks_decoder=(2, 2, 2, 1),
    ),
}


def _triple(v, what: str) -> Triple:
    t = (v,) * 3 if isinstance(v, int) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and i >= 1 for i in t):
        raise ConfigError(f"U-Mamba {what} must be a positive int or three positive ints (D, H, W); got {v!r}")
    return t  # type: ignore[return-value]


def _per_stage(v, n: int, what: str) -> list:
    items = [v] * n if isinstance(v, int) else list(v)
    if len(items) != n:
        raise ConfigError(f"U-Mamba {what} needs {n} entries (one per stage); got {v!r}")
    return items


class ResBlock(nn.Module):
    """conv-norm-act, conv-norm, + shortcut, act (U-Mamba's BasicResBlock / nnU-Net BasicBlockD).

    The shortcut is a strided 1x1x1 conv when ``project`` (needed when channels or stride
    change; U-Mamba uses it for every stage's first block), otherwise the identity.
    """

    def __init__(self, c_in: int, c_out: int, kernel: Triple, stride: Triple = (1, 1, 1), project: bool = False):
        super().__init__()
        if not project and (c_in != c_out or stride != (1, 1, 1)):
            raise ConfigError("an identity-shortcut block cannot change channels or stride")
        pad = tuple(k // 2 for k in kernel)
        self.conv1 = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=pad)
        self.norm1 = nn.InstanceNorm3d(c_out, eps=1e-5, affine=True)
        self.conv2 = nn.Conv3d(c_out, c_out, kernel, padding=pad)
        self.norm2 = nn.InstanceNorm3d(c_out, eps=1e-5, affine=True)
        self.shortcut = nn.Conv3d(c_in, c_out, 1, stride=stride) if project else None
        # Not in-place (unlike nnU-Net): keeps module inputs intact for Opacus' activation hooks.
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.act(y + skip)


def _stage(c_in: int, c_out: int, kernel: Triple, stride: Triple, n_blocks: int) -> nn.Sequential:
    return nn.Sequential(
        ResBlock(c_in, c_out, kernel, stride, project=True),
        *[ResBlock(c_out, c_out, kernel) for _ in range(n_blocks - 1)],
    )


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling to the skip's size, then a 1x1x1 conv (as in U-Mamba)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # Size instead of scale_factor: identical for divisible inputs, no float rounding.
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class UMamba(nn.Module):
    """3D U-Mamba mapping (B, in_channels, D, H, W) to logits (B, out_channels, D, H, W).

    Args:
        in_channels, out_channels: input channels (e.g. CT windows) and classes.
        variant: ``"bot"`` (Mamba at the bottleneck) or ``"enc"`` (Mamba after each stage).
        features: channels per stage; its length sets the number of stages.
        strides: per stage, an int or (D, H, W); the first is usually (1, 1, 1).
        kernel_sizes: per stage (or one value), an int or (D, H, W); odd sizes.
        n_blocks_per_stage: residual blocks per encoder stage (the stem uses the first).
        n_blocks_decoder: residual blocks per decoder stage, deepest first (stages - 1).
        deep_supervision: return per-decoder-stage logits in training mode (see module doc).
        mamba_backend: ``"auto"`` | ``"mambapy"`` | ``"mamba_ssm"``.
        mamba_pscan: mambapy's parallel scan (False: sequential, Opacus-compatible, slow).
        d_state, d_conv, expand: Mamba hyper-parameters (U-Mamba: 16, 4, 2).

    Input spatial sizes must be multiples of :attr:`required_multiple` (the product of
    the strides per axis), else ``forward`` raises ``ValueError``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        variant: str = "bot",
        features: Sequence[int] = UMAMBA_PRESETS["cpu"]["features"],
        strides: Sequence = UMAMBA_PRESETS["cpu"]["strides"],
        kernel_sizes=3,
        n_blocks_per_stage=UMAMBA_PRESETS["cpu"]["n_blocks_per_stage"],
        n_blocks_decoder=UMAMBA_PRESETS["cpu"]["n_blocks_decoder"],
        deep_supervision: bool = True,
        mamba_backend: str = "auto",
        mamba_pscan: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ):
        super().__init__()
        if variant not in ("bot", "enc"):
            raise ConfigError(f"U-Mamba variant must be 'bot' or 'enc'; got {variant!r}")
        features = [int(f) for f in features]
        n = len(features)
        if n < 2 or any(f < 1 for f in features):
            raise ConfigError(f"U-Mamba features need at least 2 positive entries; got {features!r}")
        strides_t = [_triple(s, "stride") for s in _per_stage(strides, n, "strides")]
        kernels = [_triple(k, "kernel size") for k in _per_stage(kernel_sizes, n, "kernel_sizes")]
        if any(k % 2 == 0 for kern in kernels for k in kern):
            raise ConfigError(f"U-Mamba kernel sizes must be odd (same padding); got {kernel_sizes!r}")
        enc_blocks = _per_stage(n_blocks_per_stage, n, "n_blocks_per_stage")
        dec_blocks = _per_stage(n_blocks_decoder, n - 1, "n_blocks_decoder")
        if any(int(b) < 1 for b in enc_blocks + dec_blocks):
            raise ConfigError("U-Mamba block counts must be >= 1")

        self.variant = variant
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = bool(deep_supervision)
        self.strides = strides_t
        self.required_multiple: Triple = tuple(math.prod(s[a] for s in strides_t) for a in range(3))  # type: ignore

        def mamba(dim: int) -> MambaLayer:
            return MambaLayer(dim, d_state, d_conv, expand, backend=mamba_backend, pscan=mamba_pscan)

        # Stem: full-resolution residual block(s), as U-Mamba's encoder.stem.
        self.stem = _stage(in_channels, features[0], kernels[0], (1, 1, 1), enc_blocks[0])
        self.encoder = nn.ModuleList(
            _stage(features[s - 1] if s else features[0], features[s], kernels[s], strides_t[s], enc_blocks[s])
            for s in range(n)
        )
        if variant == "enc":
            self.mamba_layers = nn.ModuleList(mamba(f) for f in features)
        else:
            self.mamba_layer = mamba(features[-1])

        # Decoder stage i goes from encoder stage n-1-i up to stage n-2-i (deepest first).
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.seg_heads = nn.ModuleList()
        for i in range(n - 1):
            below, skip = features[n - 1 - i], features[n - 2 - i]
            self.upsample.append(UpsampleLayer(below, skip))
            self.decoder.append(_stage(2 * skip, skip, kernels[n - 2 - i], (1, 1, 1), dec_blocks[i]))
            self.seg_heads.append(nn.Conv3d(skip, out_channels, 1))

        self.apply(_init_he)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming the shape when ``x`` cannot go through the network."""
        if x.ndim != 5:
            raise ValueError(f"U-Mamba expects a 5D input (B, C, D, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"U-Mamba expects {self.in_channels} input channels; got shape {tuple(x.shape)}")
        spatial = tuple(x.shape[2:])
        if any(s % m for s, m in zip(spatial, self.required_multiple)):
            raise ValueError(
                f"U-Mamba input spatial size (D, H, W) = {spatial} must be a multiple of {self.required_multiple} "
                "(the product of the strides per axis); pad or crop it"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.encoder):
            x = stage(x)
            if self.variant == "enc":
                x = self.mamba_layers[s](x)
            skips.append(x)
        if self.variant == "bot":
            skips[-1] = self.mamba_layer(skips[-1])

        want_all = self.deep_supervision and self.training
        x = skips[-1]
        outputs = []
        last = len(self.decoder) - 1
        for i, (up, stage, head) in enumerate(zip(self.upsample, self.decoder, self.seg_heads)):
            skip = skips[-(i + 2)]
            x = stage(torch.cat((up(x, skip.shape[2:]), skip), dim=1))
            if want_all or i == last:
                outputs.append(head(x))
        return outputs[::-1] if want_all else outputs[0]


def _init_he(module: nn.Module) -> None:
    """nnU-Net's InitWeights_He(1e-2) on the 3D convs; Mamba keeps its own init."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
