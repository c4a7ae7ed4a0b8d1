"""Dice + cross-entropy with nnU-Net-style deep supervision, and the FedProx proximal term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn


def deep_supervision_weights(levels: int) -> list[float]:
    """Weights halving per level (full resolution first), normalised to sum to 1."""
    raw = [0.5**i for i in range(levels)]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionDiceCE(nn.Module):
    """Weighted DiceCE over every output level; targets are downsampled with nearest.

    Dice is computed over the whole batch (``batch=True``) and on the hematoma channel only:
    many patches hold no hematoma, and a per-patch Dice on an empty target would dominate.
    """

    def __init__(self):
        super().__init__()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)

    def forward(self, outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """outputs: logits per level, full resolution first; target: (B, 1, D, H, W) class indices."""
        weights = deep_supervision_weights(len(outputs))
        loss = outputs[0].new_zeros(())
        for weight, logits in zip(weights, outputs):
            level_target = target
            if logits.shape[2:] != target.shape[2:]:
                level_target = F.interpolate(target.float(), size=logits.shape[2:], mode="nearest").long()
            loss = loss + weight * self.dice_ce(logits, level_target)
        return loss


def proximal_term(model: nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: mu/2 * ||w - w_global||^2 over the trainable parameters."""
    total = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        diff = (param - global_params[name]).pow(2).sum()
        total = diff if total is None else total + diff
    if total is None:
        raise ValueError("the model has no trainable parameters")
    return 0.5 * mu * total
