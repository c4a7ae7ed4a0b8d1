"""Random training patches with foreground oversampling (nnU-Net style), over numpy arrays.

A hematoma fills well under 1 % of a head CT, so uniformly drawn patches rarely show one;
a set share of patches is therefore centred on a random hematoma voxel (the rest are drawn
uniformly, so the network also sees plenty of normal anatomy and skull).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.preprocess import AIR_HU, Sample


@dataclass
class PaddedVolume:
    """A training volume padded to at least the patch size, with its hematoma voxels listed."""

    hu: np.ndarray  # (z, y, x) float32 HU: augmentation works in HU, windows come after
    label: np.ndarray  # (z, y, x) uint8
    foreground: np.ndarray  # (N, 3) int indices of hematoma voxels


def pad_to_patch(hu: np.ndarray, label: np.ndarray, patch: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad (symmetrically, with air) so each axis is at least the patch size."""
    extra = [max(0, p - s) for p, s in zip(patch, label.shape)]
    if not any(extra):
        return hu, label
    widths = [(e // 2, e - e // 2) for e in extra]
    return np.pad(hu, widths, constant_values=AIR_HU), np.pad(label, widths)


class PatchSampler:
    """Draws (image, label) patches from a fixed list of samples with a seeded generator."""

    def __init__(self, samples: list[Sample], patch_size, foreground_fraction: float, rng: np.random.Generator):
        if not samples:
            raise ValueError("no training samples")
        self.patch = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.rng = rng
        self.volumes = []
        for sample in samples:
            if sample.mask is None:
                raise ValueError(f"case {sample.case_id} has no mask; filter unlabeled cases before training")
            hu, label = pad_to_patch(sample.hu, sample.mask, self.patch)
            self.volumes.append(PaddedVolume(hu, label, np.argwhere(label > 0)))

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """One patch: HU (1, pz, py, px) float32 and label (1, pz, py, px) uint8."""
        volume = self.volumes[self.rng.integers(len(self.volumes))]
        shape = volume.label.shape
        wants_foreground = self.rng.random() < self.foreground_fraction and len(volume.foreground)
        if wants_foreground:
            centre = volume.foreground[self.rng.integers(len(volume.foreground))]
            # Centre the patch on the voxel, clamped inside the volume.
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape)]
        else:
            start = [int(self.rng.integers(s - p + 1)) for p, s in zip(self.patch, shape)]
        region = tuple(slice(b, b + p) for b, p in zip(start, self.patch))
        return volume.hu[region][None], volume.label[region][None]

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        patches = [self.draw() for _ in range(size)]
        return np.stack([p[0] for p in patches]), np.stack([p[1] for p in patches])
