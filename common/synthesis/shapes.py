"""Hematoma shapes for a mask-conditioned generator: the site's own HE masks, moved at random.

A mask-conditioned generator (settings.mask_condition) draws the HU windows around a given mask.
At sampling time the masks come from the site's real HE ROIs, each flipped left-right at random,
rotated about the ROI centre (where the ROI centres its hematoma) and scaled, so that the shapes
are the site's kind of hematoma without being one patient's outline. The masks stay on the site
with everything else synthesis makes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ROTATE_DEG = 30.0  # head pose and hematoma orientation vary more than this between patients
SCALE = 0.15  # +-15 % in each direction: about +-30 % in area, within one volume class


def sampling_masks(masks: np.ndarray, n: int, seed: int, rotate_deg: float = ROTATE_DEG,
                   scale: float = SCALE) -> np.ndarray:
    """`n` masks (n, P, P) uint8 drawn with replacement from `masks` (m, P, P), each randomly
    mirrored, rotated by up to `rotate_deg` and scaled by up to +-`scale` (bilinear, then > 0.5)."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) == 0:
        raise ValueError(f"masks must be (m, P, P) with m >= 1, got {masks.shape}")
    if n <= 0:
        return np.zeros((0, *masks.shape[1:]), np.uint8)
    rng = np.random.default_rng(seed)
    chosen = torch.from_numpy(masks[rng.integers(0, len(masks), n)].astype(np.float32))[:, None]
    angle = np.radians(rng.uniform(-rotate_deg, rotate_deg, n))
    zoom = rng.uniform(1.0 - scale, 1.0 + scale, n)
    mirror = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    # affine_grid maps output to input coordinates: the inverse zoom makes the shape `zoom` times larger.
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    theta = np.stack([np.stack([cos * mirror, -sin, np.zeros(n)], 1),
                      np.stack([sin * mirror, cos, np.zeros(n)], 1)], 1)
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(chosen.shape), align_corners=False)
    moved = F.grid_sample(chosen, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = (moved[:, 0] > 0.5).numpy().astype(np.uint8)
    # A shape shrunk below one pixel would leave an empty mask: keep the drawn mask as it was then.
    empty = out.reshape(n, -1).sum(1) == 0
    out[empty] = chosen[empty, 0].numpy() > 0.5
    return out
