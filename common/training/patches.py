"""Random training patches with foreground oversampling (nnU-Net style), over numpy arrays.

A hematoma fills well under 1 % of a head CT, so uniformly drawn patches rarely show one;
a set share of patches is therefore centred on a random hematoma voxel (the rest are drawn
uniformly, so the network also sees plenty of normal anatomy and skull). A further share
(`hard_negative_fraction`) is centred on a blood-dense voxel that is not hematoma: the falx and
venous sinuses, muscle, calcifications, bone edges in partial volume. These are where a small
model's false positives sit (on a development cohort the falx and temporal muscle were the largest
false components), and uniform draws show them too rarely to be learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.data.preprocess import AIR_HU, Sample

MIMIC_HU = (50.0, 100.0)  # as dense as acute blood on the working grid, where noise is averaged out
MAX_MIMICS = 20000  # per volume: a random subset keeps the index small


@dataclass
class PaddedVolume:
    """A training volume padded to at least the patch size, with its hematoma voxels listed."""

    hu: np.ndarray  # (z, y, x) float32 HU: augmentation works in HU, windows come after
    label: np.ndarray  # (z, y, x) uint8
    foreground: np.ndarray  # (N, 3) int indices of hematoma voxels
    mimics: np.ndarray  # (M, 3) int indices of blood-dense voxels outside the hematoma


def pad_to_patch(hu: np.ndarray, label: np.ndarray, patch: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad (symmetrically, with air) so each axis is at least the patch size."""
    extra = [max(0, p - s) for p, s in zip(patch, label.shape)]
    if not any(extra):
        return hu, label
    widths = [(e // 2, e - e // 2) for e in extra]
    return np.pad(hu, widths, constant_values=AIR_HU), np.pad(label, widths)


class PatchSampler:
    """Draws (image, label) patches from a fixed list of samples with a seeded generator."""

    def __init__(self, samples: list[Sample], patch_size, foreground_fraction: float, rng: np.random.Generator,
                 hard_negative_fraction: float = 0.0):
        if not samples:
            raise ValueError("no training samples")
        if foreground_fraction + hard_negative_fraction > 1.0:
            raise ValueError("foreground_fraction + hard_negative_fraction must be <= 1")
        self.patch = tuple(int(p) for p in patch_size)
        self.foreground_fraction = float(foreground_fraction)
        self.hard_negative_fraction = float(hard_negative_fraction)
        self.rng = rng
        self.volumes = []
        for sample in samples:
            if sample.mask is None:
                raise ValueError(f"case {sample.case_id} has no mask; filter unlabeled cases before training")
            hu, label = pad_to_patch(sample.hu, sample.mask, self.patch)
            mimics = np.empty((0, 3), dtype=np.int64)
            if self.hard_negative_fraction > 0:
                mimics = np.argwhere((hu >= MIMIC_HU[0]) & (hu <= MIMIC_HU[1]) & (label == 0))
                if len(mimics) > MAX_MIMICS:
                    mimics = mimics[rng.choice(len(mimics), MAX_MIMICS, replace=False)]
            self.volumes.append(PaddedVolume(hu, label, np.argwhere(label > 0), mimics))

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """One patch: HU (1, pz, py, px) float32 and label (1, pz, py, px) uint8."""
        volume = self.volumes[self.rng.integers(len(self.volumes))]
        shape = volume.label.shape
        draw = self.rng.random()
        centres = None
        if draw < self.foreground_fraction:
            centres = volume.foreground
        elif draw < self.foreground_fraction + self.hard_negative_fraction:
            centres = volume.mimics
        if centres is not None and len(centres):
            centre = centres[self.rng.integers(len(centres))]
            # Centre the patch on the voxel, clamped inside the volume.
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, self.patch, shape)]
        else:
            start = [int(self.rng.integers(s - p + 1)) for p, s in zip(self.patch, shape)]
        region = tuple(slice(b, b + p) for b, p in zip(start, self.patch))
        return volume.hu[region][None], volume.label[region][None]

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        patches = [self.draw() for _ in range(size)]
        return np.stack([p[0] for p in patches]), np.stack([p[1] for p in patches])
