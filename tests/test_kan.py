"""KANLinear: B-spline basis, shapes, gradients, and fitting a 1-D nonlinear function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.kan import KANLinear, bspline_basis, uniform_knots


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra threads only contend for the shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("grid_size,order", [(5, 3), (3, 1), (8, 2), (4, 0)])
def test_bspline_basis_is_a_partition_of_unity_inside_the_grid(grid_size, order):
    knots = uniform_knots(grid_size, order, (-1.5, 2.0))
    x = torch.linspace(-1.5, 2.0 - 1e-4, 301).unsqueeze(-1)  # (301, 1): one input feature, in [low, high)
    basis = bspline_basis(x, knots, order)
    assert basis.shape == (301, 1, grid_size + order)
    torch.testing.assert_close(basis.sum(-1), torch.ones(301, 1), atol=1e-5, rtol=0)
    assert (basis >= -1e-7).all()
    # Outside the extended grid every basis function vanishes (only the base branch acts there).
    far = bspline_basis(torch.tensor([[-10.0], [10.0]]), knots, order)
    assert far.abs().max() == 0


def test_cubic_basis_matches_the_closed_form_at_a_knot():
    # A uniform cubic B-spline takes the values 1/6, 2/3, 1/6 at the knots of its support.
    knots = uniform_knots(5, 3, (-1.0, 1.0))
    basis = bspline_basis(torch.tensor([[0.2]]), knots, 3)[0, 0]  # 0.2 is an interior knot
    nonzero = basis[basis > 1e-6]
    torch.testing.assert_close(nonzero, torch.tensor([1 / 6, 2 / 3, 1 / 6]), atol=1e-5, rtol=0)


def test_shapes_for_any_leading_dimensions():
    layer = KANLinear(6, 4, grid_size=5, spline_order=3)
    assert layer(torch.randn(10, 6)).shape == (10, 4)
    assert layer(torch.randn(2, 7, 6)).shape == (2, 7, 4)
    assert layer.spline_weight.shape == (4, 6, 8)
    with pytest.raises(ValueError, match="expects 6 input features"):
        layer(torch.randn(3, 5))


def test_gradients_reach_every_parameter_and_the_input():
    torch.manual_seed(0)
    layer = KANLinear(3, 2, grid_size=4, spline_order=2, bias=True)
    x = (torch.rand(16, 3) * 1.8 - 0.9).requires_grad_(True)
    layer(x).pow(2).sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Double precision gradient check of the whole layer (basis recursion included).
    small = KANLinear(2, 2, grid_size=3, spline_order=3).double()
    assert torch.autograd.gradcheck(small, (torch.rand(4, 2, dtype=torch.double) * 1.6 - 0.8).requires_grad_(True))


def _fit(model: nn.Module, steps: int = 300, lr: float = 1e-2) -> float:
    x = torch.linspace(-1, 1, 128).unsqueeze(-1)
    y = torch.sin(3 * x)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((model(x) - y) ** 2).mean())


def test_kan_fits_sin_better_than_linear_and_mlp_of_the_same_width():
    torch.manual_seed(0)
    kan = nn.Sequential(KANLinear(1, 8), KANLinear(8, 1, grid_range=(-2, 2)))
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(1, 8), nn.Linear(8, 1))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 1))
    mse_kan, mse_linear, mse_mlp = _fit(kan), _fit(linear), _fit(mlp)
    # sin(3x) on [-1, 1]: the best linear fit leaves MSE ~0.17; a KAN should get far below that.
    assert mse_kan < 1e-3 < 0.1 < mse_linear
    assert mse_kan < mse_mlp / 10
