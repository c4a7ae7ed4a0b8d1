"""U-Mamba's Mamba layer: a Mamba block run over the flattened voxels of a 3D feature map.

Two interchangeable backends with identical parameter names, so one federated state dict
serves both GPU sites (``mamba_ssm`` CUDA kernels) and CPU sites (``mambapy``, pure PyTorch):

    mamba.in_proj.weight, mamba.conv1d.weight, mamba.conv1d.bias, mamba.x_proj.weight,
    mamba.dt_proj.weight, mamba.dt_proj.bias, mamba.A_log, mamba.D, mamba.out_proj.weight

``mambapy.mamba.MambaBlock`` already uses exactly ``mamba_ssm.Mamba``'s names and shapes
(checked against the installed mambapy 1.2.0), so no key remapping is needed.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError

BACKENDS = ("auto", "mambapy", "mamba_ssm")

# The parameter names of mamba_ssm.Mamba (mamba_simple.py); tests assert both backends match.
MAMBA_PARAM_NAMES = frozenset(
    {
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "out_proj.weight",
    }
)


def _import_mamba_ssm():
    """Return ``mamba_ssm.Mamba`` or the reason it cannot be used."""
    try:
        from mamba_ssm import Mamba
    except Exception as err:  # ImportError, or a missing CUDA extension / library (OSError)
        return None, f"{type(err).__name__}: {err}"
    return Mamba, None


def mamba_ssm_available() -> bool:
    """True when the CUDA kernels can run here: CUDA present and mamba_ssm importable."""
    return torch.cuda.is_available() and _import_mamba_ssm()[0] is not None


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to a concrete backend; raise ConfigError on an unusable request."""
    if backend not in BACKENDS:
        raise ConfigError(f"mamba backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "mamba_ssm" if mamba_ssm_available() else "mambapy"
    if backend == "mamba_ssm":
        if not torch.cuda.is_available():
            raise ConfigError("mamba backend 'mamba_ssm' needs CUDA, which is not available; use 'mambapy' or 'auto'")
        Mamba, reason = _import_mamba_ssm()
        if Mamba is None:
            raise ConfigError(
                f"mamba backend 'mamba_ssm' requested but it cannot be imported ({reason}); "
                "install the 'gpu' extra (mamba-ssm) or use 'mambapy' or 'auto'"
            )
    return backend


def build_mamba_block(
    d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str = "auto", pscan: bool = True
) -> nn.Module:
    """A Mamba block (B, L, d_model) -> (B, L, d_model) from the chosen backend.

    ``pscan`` (mambapy only) selects mambapy's parallel scan; ``False`` uses its sequential
    scan, which is far slower but has no custom autograd Function (Opacus needs that).
    """
    backend = resolve_backend(backend)
    if backend == "mamba_ssm":
        if not pscan:
            raise ConfigError("pscan=False only applies to the 'mambapy' backend")
        Mamba, _ = _import_mamba_ssm()
        return Mamba(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
    from mambapy.mamba import MambaBlock, MambaConfig

    # n_layers is unused by MambaBlock itself; bias/conv_bias defaults match mamba_ssm.Mamba.
    cfg = MambaConfig(
        d_model=d_model, n_layers=1, d_state=d_state, d_conv=d_conv, expand_factor=expand, pscan=pscan
    )
    return MambaBlock(cfg)


class MambaLayer(nn.Module):
    """LayerNorm(C) then Mamba over the D*H*W voxel sequence, reshaped back to (B, C, D, H, W).

    Follows bowang-lab/U-Mamba's ``MambaLayer`` (UMambaBot_3d.py / UMambaEnc_3d.py): the
    published layer returns ``mamba(norm(x))`` with NO residual connection, and so does this
    one; the surrounding residual conv blocks carry the identity path.

    Always computes in fp32 with autocast disabled, as U-Mamba does, because the selective
    scan's exp/cumulative products overflow or lose precision in fp16/bf16 (NaN losses).
    The output is fp32 whatever the input dtype.

    Sequence length: mambapy's parallel scan zero-pads the sequence to the next power of two
    internally (causal scan, so padding at the end does not change the result); any length
    works, but time and memory follow the padded length.
    """

    def __init__(
        self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str = "auto", pscan: bool = True
    ):
        super().__init__()
        self.dim = dim
        self.backend = resolve_backend(backend)
        self.norm = nn.LayerNorm(dim)
        self.mamba = build_mamba_block(dim, d_state, d_conv, expand, self.backend, pscan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] != self.dim:
            raise ValueError(f"MambaLayer(dim={self.dim}) expects (B, {self.dim}, *spatial); got shape {tuple(x.shape)}")
        if self.backend == "mamba_ssm" and not x.is_cuda:
            raise ValueError("MambaLayer with backend 'mamba_ssm' needs CUDA tensors; got a tensor on " + str(x.device))
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            b, c = x.shape[:2]
            spatial = x.shape[2:]
            tokens = x.reshape(b, c, -1).transpose(1, 2)  # (B, L, C)
            out = self.mamba(self.norm(tokens))
            return out.transpose(1, 2).reshape(b, c, *spatial)
