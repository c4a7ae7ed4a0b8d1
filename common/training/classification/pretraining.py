"""Self-supervised pretraining of the classifier's ViT encoder by masked image modelling.

SimMIM (Xie et al., CVPR 2022) adapted to the convolutional stem: random patches of each ROI
slice are blanked in pixel space (so the stem's overlapping 3x3 convolutions cannot see through
the mask), the whole encoder runs on the blanked image, and a linear layer predicts every
blanked patch's pixels from its token (L1 loss on blanked patches only). No labels are needed:
every ROI slice of every case with a hematoma mask is an input, labelled or not.

    mim = MaskedImageModel(create_model(settings, windows), in_chans=len(windows) + settings.mask_channel)
    pretrain(mim, slices, PretrainingSettings(), seed=0)       # slices: (N, C, P, P) float32
    classifier = mim.classifier                               # the encoder, pretrained

In the federation (`ssl-rounds` > 0) each training site runs `steps_per_round` steps per round on
its own slices and the masked-image model's weights (encoder and decoder) are averaged like any
other model's; the classifier arms then start from the pretrained encoder. Measured on the
development cohorts (README: "The classifier's image path"), it does not yet improve the HE
classifier, so the built-in profiles leave it off.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError
from common.files import seed_everything


@dataclass(frozen=True)
class PretrainingSettings:
    """The profile's [pretraining] section."""

    slices_per_case: int = 8  # ROI slices per case (the k largest hematoma slices)
    mask_ratio: float = 0.5  # share of the 8 x 8 px patches blanked in each slice
    steps_per_round: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"pretraining mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if min(self.slices_per_case, self.steps_per_round, self.batch_size) < 1 or self.lr <= 0:
            raise ConfigError("pretraining slices_per_case, steps_per_round and batch_size must be >= 1, lr > 0")

    @classmethod
    def from_profile(cls, profile: dict) -> "PretrainingSettings":
        section = dict(profile.get("pretraining", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"profile [pretraining]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**section)

    def as_dict(self) -> dict:
        return asdict(self)


class MaskedImageModel(nn.Module):
    """A classifier (plain ViT or MarkerFusion) and the linear decoder that predicts a blanked
    patch's pixels from its token; `forward(x, mask)` returns the reconstruction loss."""

    def __init__(self, classifier: nn.Module, in_chans: int):
        super().__init__()
        self.classifier = classifier
        self.patch = int(self.encoder.patch_embed.patch_size[0])
        self.decoder = nn.Linear(self.encoder.embed_dim, self.patch * self.patch * int(in_chans))

    @property
    def encoder(self) -> nn.Module:
        return getattr(self.classifier, "backbone", self.classifier)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W); mask (B, L) with 1 for each blanked patch (row-major patch grid)."""
        b, c, h, w = x.shape
        p = self.patch
        grid_h, grid_w = h // p, w // p
        pixels = mask.view(b, 1, grid_h, grid_w).repeat_interleave(p, 2).repeat_interleave(p, 3)
        encoder = self.encoder
        tokens = encoder.forward_features(x * (1 - pixels))[:, encoder.num_prefix_tokens:]
        target = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(b, grid_h * grid_w, p * p * c)
        error = (self.decoder(tokens) - target).abs().mean(-1)
        return (error * mask).sum() / mask.sum().clamp(min=1.0)


def patch_mask(n: int, patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n, patches) 0/1: exactly round(ratio x patches) blanked patches per image."""
    k = max(1, int(round(ratio * patches)))
    order = torch.rand(n, patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(n, patches)
    mask.scatter_(1, order[:, :k], 1.0)
    return mask


def n_patches(mim: MaskedImageModel, pixels: int) -> int:
    return (pixels // mim.patch) ** 2


def pretrain(mim: MaskedImageModel, slices: np.ndarray, settings: PretrainingSettings, *, seed: int = 0,
             steps: int | None = None, schedule_offset: int = 0, schedule_total: int | None = None,
             augment=None) -> dict:
    """Train `mim` in place for `steps` (default settings.steps_per_round) on (N, C, P, P) slices;
    warmup then cosine decay over `schedule_total` steps starting at `schedule_offset` (federated
    rounds continue one schedule). `augment(batch, generator)` transforms each batch (the
    classifier's own augmentation). Returns {"loss", "first-loss", "steps", "seconds"}."""
    seed_everything(seed)
    steps = settings.steps_per_round if steps is None else int(steps)
    total = schedule_total or steps
    x_all = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(mim.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    batch = min(settings.batch_size, len(x_all))
    patches = n_patches(mim, x_all.shape[-1])
    losses, started = [], time.perf_counter()
    mim.train()
    for step in range(steps):
        position = schedule_offset + step
        scale = min(1.0, (position + 1) / max(settings.warmup_steps, 1))
        scale *= 0.5 * (1 + math.cos(math.pi * min(position / max(total, 1), 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * scale
        xb = x_all[torch.randint(0, len(x_all), (batch,), generator=generator)]
        if augment is not None:
            xb = augment(xb, generator)
        loss = mim(xb, patch_mask(batch, patches, settings.mask_ratio, generator))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    mim.eval()
    window = max(1, min(20, len(losses) // 4))
    return {"loss": float(np.mean(losses[-window:])) if losses else float("nan"),
            "first-loss": float(np.mean(losses[:window])) if losses else float("nan"),
            "steps": steps, "seconds": time.perf_counter() - started}


@torch.no_grad()
def reconstruction_loss(mim: MaskedImageModel, slices: np.ndarray, settings: PretrainingSettings,
                        seed: int = 0) -> float:
    """Mean loss on `slices` under a fixed draw of masks (comparable across rounds and models)."""
    if len(slices) == 0:
        return float("nan")
    mim.eval()
    x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))
    generator = torch.Generator().manual_seed(seed)
    mask = patch_mask(len(x), n_patches(mim, x.shape[-1]), settings.mask_ratio, generator)
    losses = [mim(x[i:i + 128], mask[i:i + 128]).item() * len(x[i:i + 128]) for i in range(0, len(x), 128)]
    return float(sum(losses) / len(x))


@torch.no_grad()
def encoder_features(classifier: nn.Module, rois: Sequence[np.ndarray]) -> np.ndarray:
    """One feature vector per case: the class token and the mean patch token of the encoder's
    output, averaged over the case's slices ((k, C, P, P) each). What the linear probes read."""
    encoder = getattr(classifier, "backbone", classifier)
    encoder.eval()
    out = []
    for slices in rois:
        tokens = encoder.forward_features(torch.from_numpy(np.asarray(slices, np.float32)))
        prefix = encoder.num_prefix_tokens
        out.append(torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1).mean(0).numpy())
    return np.stack(out) if out else np.zeros((0, 0))

