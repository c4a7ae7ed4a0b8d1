"""Where the HE classifier looked: Grad-CAM over the ViT's patch tokens, one map per ROI slice.

The map of a slice is the ReLU of the patch tokens entering the last transformer block (the
residual stream), weighted by the gradient of the HE logit with respect to them (averaged over the
tokens), as Grad-CAM does for a convolutional feature map (Selvaraju et al., ICCV 2017; the token
layout is the ViT's patch grid). The last block's input rather than its output: the logit is read
from the class token after that block, so the patch tokens reach it only through the block's
attention. On a toy task (a bright square in one of 16 patch cells) this placed the map's peak in
the square for 25 of 29 images (the normalised input of that block's attention: 18 of 29). A marker-fusion
classifier's marker path is added after the ViT and does not change the map. The maps say where
the image path's evidence for HE lies, not that it is right: on the CPU profile that path scores
close to chance on its own (README: Classifier), so a reader should not over-read them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def vit_backbone(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside `model` (itself, or a MarkerFusion's backbone)."""
    backbone = getattr(model, "backbone", model)
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "patch_embed") or not len(backbone.blocks):
        raise ValueError(f"{type(backbone).__name__} is not a timm VisionTransformer: no attention map")
    return backbone


def gradcam_maps(model: nn.Module, x, markers=None) -> np.ndarray:
    """(N, P, P) float32 maps in [0, 1] for ROI inputs `x` (N, C, P, P); `markers` (N, M) for a
    marker-fusion classifier. Each map is scaled to its own maximum (all zero where no token
    raised the logit)."""
    backbone = vit_backbone(model)
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, inputs):
        inputs[0].retain_grad()
        captured["tokens"] = inputs[0]

    handle = backbone.blocks[-1].register_forward_pre_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            inputs = (x,) if markers is None else (x, torch.as_tensor(np.asarray(markers), dtype=torch.float32))
            logits = model(*inputs)
            logits[:, 0].sum().backward()
        tokens, grads = captured["tokens"].detach(), captured["tokens"].grad
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))
    tokens, grads = tokens[:, prefix:], grads[:, prefix:]
    cam = F.relu((grads.mean(dim=1, keepdim=True) * tokens).sum(dim=-1))  # (N, tokens)
    rows, cols = (int(v) for v in backbone.patch_embed.grid_size)
    cam = F.interpolate(cam.reshape(-1, 1, rows, cols), size=tuple(x.shape[-2:]), mode="bilinear",
                        align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    return (cam / peak).numpy().astype(np.float32)
