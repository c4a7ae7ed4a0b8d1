"""U-KAN denoiser for DDPM (after Diffusion-UKAN, Li et al. 2024): epsilon prediction on 2D ROIs.

Layout (levels l = 0 .. L-1, resolution P / 2**l, width base_channels * channel_mult[l]):

    stem conv 3x3
    encoder  level l < L - kan_levels :  ResBlock(s)  (GroupNorm, SiLU, conv, + time projection)
             level l >= L - kan_levels:  PatchEmbed (overlapping 3x3 conv, stride 2) then
                                         tokenized KAN block(s) on the (H*W, C) token grid
    decoder  mirror of the encoder with skip concatenation at every level above the bottleneck,
             nearest upsampling + conv between levels
    out      GroupNorm, SiLU, conv 3x3 (zero-initialised, so training starts from eps = 0)

Tokenized KAN block (residual):  LayerNorm -> KANLinear -> + time projection -> depthwise 3x3 conv
on the token grid -> LayerNorm -> SiLU, repeated `kan_layers` times inside the block, added to its
input. This is the U-KAN "KANLayer" (KAN -> DWConv -> norm -> act) with the DDPM time projection
of Diffusion-UKAN; the normalisations keep tokens on the KAN spline grid (-2, 2).

Time is a sinusoidal embedding of the integer timestep -> MLP. Optional class conditioning adds
a learned class embedding to the time embedding; calling a class-conditional model without
labels leaves the embedding out (the unconditional model of classifier-free guidance).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.kan import KANLinear


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim) of (possibly fractional) timesteps."""
    timesteps = timesteps.reshape(-1).float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def norm_groups(channels: int, max_groups: int = 8) -> int:
    """The largest group count <= max_groups that divides `channels`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time projection, GroupNorm-SiLU-dropout-conv, residual (1x1 if widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(norm_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: 3x3 conv with stride 2, then LayerNorm over channels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class KANBlock(nn.Module):
    """Tokenized KAN block on a (B, C, H, W) feature map, residual, with a time projection."""

    def __init__(self, channels: int, temb_dim: int, kan_layers: int = 2, grid_size: int = 5, spline_order: int = 3,
                 grid_range=(-2.0, 2.0), dropout: float = 0.0):
        super().__init__()
        self.pre_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(kan_layers))
        self.kans = nn.ModuleList(KANLinear(channels, channels, grid_size, spline_order, grid_range)
                                  for _ in range(kan_layers))
        self.times = nn.ModuleList(nn.Linear(temb_dim, channels) for _ in range(kan_layers))
        self.dwconvs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
                                     for _ in range(kan_layers))
        self.post_norms = nn.ModuleList(nn.LayerNorm(channels) for _ in range(kan_layers))
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.full((channels,), 0.1))  # layer scale: a small residual branch at first

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        h = tokens
        act_t = F.silu(temb)
        for pre, kan, time, dw, post in zip(self.pre_norms, self.kans, self.times, self.dwconvs, self.post_norms):
            h = kan(pre(h)) + time(act_t)[:, None, :]
            h = dw(h.transpose(1, 2).reshape(b, c, hgt, wid)).flatten(2).transpose(1, 2)
            h = F.silu(post(h))
        tokens = tokens + self.gate * self.dropout(h)
        return tokens.transpose(1, 2).reshape(b, c, hgt, wid)


class Upsample(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UKANDenoiser(nn.Module):
    """Noise predictor eps(x_t, t[, class]) with convolutional shallow stages and KAN deep stages.

    Args:
        in_channels / out_channels: ROI channels (3 HU windows); out defaults to in.
        base_channels: width of level 0 (16-32 on CPU, 64 on GPU).
        channel_mult: width multipliers per level; the input size must be divisible by
            2 ** (len(channel_mult) - 1).
        kan_levels: how many of the deepest levels are tokenized KAN stages (the rest are ResBlocks).
        blocks_per_level: ResBlocks / KAN blocks per level in the encoder (decoder: the same).
        num_classes: None for an unconditional model, else the number of class labels.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 4), kan_levels: int = 1, blocks_per_level: int = 1,
                 kan_layers: int = 2, grid_size: int = 5, spline_order: int = 3, num_classes: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not 0 <= kan_levels <= len(channel_mult) - 1:
            raise ValueError(f"kan_levels must be in 0..{len(channel_mult) - 1} (level 0 stays convolutional), got {kan_levels}")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.base_channels = base_channels
        self.channel_mult = channel_mult
        self.kan_levels = kan_levels
        self.num_classes = num_classes
        temb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_embed = nn.Embedding(num_classes, temb_dim) if num_classes else None
        widths = [base_channels * m for m in channel_mult]
        n_levels = len(widths)
        self.is_kan = [level >= n_levels - kan_levels for level in range(n_levels)]
        kan_kw = dict(kan_layers=kan_layers, grid_size=grid_size, spline_order=spline_order, dropout=dropout)

        def block(ch_in: int, ch_out: int, level: int) -> nn.Module:
            if self.is_kan[level]:
                if ch_in != ch_out:
                    raise ValueError("a KAN block keeps its width")
                return KANBlock(ch_out, temb_dim, **kan_kw)
            return ResBlock(ch_in, ch_out, temb_dim, dropout)

        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()  # per level: transition into the level (None at level 0)
        self.enc = nn.ModuleList()
        for level, width in enumerate(widths):
            if level == 0:
                self.down.append(nn.Identity())
            elif self.is_kan[level]:
                self.down.append(PatchEmbed(widths[level - 1], width))
            else:
                self.down.append(nn.Conv2d(widths[level - 1], width, 3, stride=2, padding=1))
            self.enc.append(nn.ModuleList(block(width, width, level) for _ in range(blocks_per_level)))
        self.dec_fuse = nn.ModuleList()
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(n_levels)):
            width = widths[level]
            # Skip concatenation (decoder features, encoder skip) -> width; the deepest level is the
            # bottleneck and continues from its own encoder output.
            self.dec_fuse.append(nn.Conv2d(2 * width, width, 1) if level < n_levels - 1 else nn.Identity())
            self.dec.append(nn.ModuleList(block(width, width, level) for _ in range(blocks_per_level)))
            self.up.append(Upsample(width, widths[level - 1]) if level > 0 else nn.Identity())
        self.out_norm = nn.GroupNorm(norm_groups(widths[0]), widths[0])
        self.out_conv = nn.Conv2d(widths[0], self.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {self.size_multiple}")
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1 and x.shape[0] > 1:
            timesteps = timesteps.expand(x.shape[0])
        temb = self.time_embed(timestep_embedding(timesteps, self.base_channels).to(x.dtype))
        if class_labels is not None:
            if self.class_embed is None:
                raise ValueError("this denoiser is unconditional (num_classes=None): pass class_labels=None")
            temb = temb + self.class_embed(torch.as_tensor(class_labels, device=x.device).long().reshape(-1))
        h = self.stem(x)
        skips = []
        for down, blocks in zip(self.down, self.enc):
            h = down(h)
            for blk in blocks:
                h = blk(h, temb)
            skips.append(h)
        skips.pop()  # the bottleneck's own output
        for fuse, blocks, up in zip(self.dec_fuse, self.dec, self.up):
            if not isinstance(fuse, nn.Identity):
                h = fuse(torch.cat([h, skips.pop()], dim=1))
            for blk in blocks:
                h = blk(h, temb)
            h = up(h)
        return self.out_conv(F.silu(self.out_norm(h)))
