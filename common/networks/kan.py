"""Kolmogorov-Arnold layer with B-spline edge functions (`KANLinear`).

A KAN layer replaces the fixed activation + weight matrix of an MLP layer with a learnable
univariate function on every edge (input i -> output j):

    y_j = sum_i  w_base[j, i] * silu(x_i)  +  sum_i  sum_m  c[j, i, m] * B_m(x_i)

The first term (the "base" branch) is an ordinary linear layer on SiLU(x): it keeps the layer
useful outside the spline grid and gives a good starting point. The second term is a spline of
order `spline_order` on a uniform grid of `grid_size` intervals over `grid_range`, with learnable
coefficients `c`. The grid is extended by `spline_order` knots on each side so that the
`grid_size + spline_order` basis functions sum to one everywhere inside `grid_range` (partition
of unity); outside the range every basis function is zero and only the base branch acts.

The B-spline basis is evaluated with the Cox-de Boor recursion. Inputs of any shape (..., in)
are accepted; the spline branch is one einsum over (input, basis) pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def uniform_knots(grid_size: int, spline_order: int, grid_range=(-1.0, 1.0)) -> torch.Tensor:
    """The `grid_size + 2 * spline_order + 1` knots of a uniform grid over `grid_range`,
    extended by `spline_order` intervals on each side."""
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    if spline_order < 0:
        raise ValueError(f"spline_order must be >= 0, got {spline_order}")
    low, high = float(grid_range[0]), float(grid_range[1])
    if not high > low:
        raise ValueError(f"grid_range must be increasing, got {grid_range}")
    step = (high - low) / grid_size
    return low + step * torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32)


def bspline_basis(x: torch.Tensor, knots: torch.Tensor, spline_order: int) -> torch.Tensor:
    """B-spline basis functions of order `spline_order` at `x`.

    x: (..., in); knots: (K,) shared or (in, K) per input feature.
    Returns (..., in, K - 1 - spline_order).
    """
    x = x.unsqueeze(-1)
    knots = knots.to(dtype=x.dtype, device=x.device)
    # Order 0: indicator of the half-open knot interval holding x.
    basis = ((x >= knots[..., :-1]) & (x < knots[..., 1:])).to(x.dtype)
    for p in range(1, spline_order + 1):
        left = (x - knots[..., : -(p + 1)]) / (knots[..., p:-1] - knots[..., : -(p + 1)])
        right = (knots[..., p + 1:] - x) / (knots[..., p + 1:] - knots[..., 1:-p])
        basis = left * basis[..., :-1] + right * basis[..., 1:]
    return basis


class KANLinear(nn.Module):
    """B-spline KAN layer: (..., in_features) -> (..., out_features).

    Args:
        grid_size: number of spline intervals inside `grid_range`.
        spline_order: polynomial order of the splines (3 = cubic).
        grid_range: interval where the spline branch is active; the layer expects inputs of
            roughly this scale (normalise before it, e.g. LayerNorm with grid_range (-2, 2)).
        base_activation: the activation of the base branch (SiLU by default).
        scale_base: gain of the base-branch weight initialisation.
        scale_spline: standard deviation of the summed spline branch output at initialisation
            (coefficients start as small Gaussian noise, so the layer starts close to its base
            branch and learns the spline shapes).
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range=(-1.0, 1.0), base_activation: type[nn.Module] = nn.SiLU, scale_base: float = 1.0,
                 scale_spline: float = 0.1, bias: bool = False):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.grid_size = int(grid_size)
        self.spline_order = int(spline_order)
        self.grid_range = (float(grid_range[0]), float(grid_range[1]))
        knots = uniform_knots(self.grid_size, self.spline_order, self.grid_range)
        # One knot vector per input feature, so a data-adaptive grid could replace it later.
        self.register_buffer("knots", knots.expand(self.in_features, -1).contiguous())
        self.num_basis = self.grid_size + self.spline_order
        self.base_activation = base_activation()
        self.base_weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.spline_weight = nn.Parameter(torch.empty(self.out_features, self.in_features, self.num_basis))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.scale_base = float(scale_base)
        self.scale_spline = float(scale_spline)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5))
        self.base_weight.data.mul_(self.scale_base)
        # The basis values at a point sum to one over ~spline_order + 1 nonzero terms, so a sum over
        # in_features inputs of N(0, s^2) coefficients has std ~ s * sqrt(in_features * 0.5).
        std = self.scale_spline / math.sqrt(max(1, self.in_features) * 0.5)
        nn.init.normal_(self.spline_weight, mean=0.0, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., in, grid_size + spline_order) B-spline basis values."""
        return bspline_basis(x, self.knots, self.spline_order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"KANLinear expects {self.in_features} input features, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        out = F.linear(self.base_activation(flat), self.base_weight, self.bias)
        out = out + torch.einsum("nim,oim->no", self.basis(flat), self.spline_weight)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}, "
                f"spline_order={self.spline_order}, grid_range={self.grid_range}")
