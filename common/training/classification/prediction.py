"""Scores: one logit per ROI slice (flip TTA), one per case (mean logit or mean probability)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from common.data.roi import CaseROIs
from common.networks.vit import marker_inputs  # cheap: timm is imported only when a model is built
from common.training.classification.rois import roi_array, slice_markers
from common.training.classification.settings import ClassifierSettings

@torch.no_grad()
def slice_logits(model: nn.Module, x: np.ndarray | torch.Tensor, tta: bool = True, device="cpu",
                 batch_size: int = 64, markers: np.ndarray | None = None) -> np.ndarray:
    """One logit per ROI slice (N, C, P, P) -> (N,); with `tta`, the mean over the four flips.
    `markers` (N, M): the slices' marker rows, for a marker-fusion classifier."""
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    f = None if markers is None else torch.as_tensor(markers, dtype=torch.float32)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        fb = None if f is None else f[i:i + batch_size].to(device)
        views = [xb, xb.flip(-1), xb.flip(-2), xb.flip(-1).flip(-2)] if tta else [xb]
        out.append(torch.stack([(model(v) if fb is None else model(v, fb))[:, 0] for v in views]).mean(0).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def case_logits(model: nn.Module, rois: Sequence[CaseROIs], settings: ClassifierSettings, device="cpu") -> np.ndarray:
    """Patient-level score per case: mean of its slice logits (aggregation 'mean_logit'), or the
    logit of its mean slice probability ('mean_prob')."""
    if not rois:
        return np.zeros(0)
    arrays = [roi_array(r, settings.mask_channel) for r in rois]
    z = slice_logits(model, np.concatenate(arrays), tta=settings.tta, device=device,
                     markers=slice_markers(rois, marker_inputs(model)))
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if settings.aggregation == "mean_logit":
            out.append(z[a:b].mean())
        else:
            p = np.clip((1 / (1 + np.exp(-z[a:b]))).mean(), 1e-7, 1 - 1e-7)
            out.append(math.log(p / (1 - p)))
    return np.asarray(out)
