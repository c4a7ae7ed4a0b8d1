"""Patch augmentation with MONAI dictionary transforms, HU-level first, then spatial.

What varies between centres is simulated where it happens, in Hounsfield units, before the
HU windows: calibration offsets (a few HU), noise level (dose) and reconstruction kernel
(soft kernels blur, sharp kernels enhance edges and noise). A held-out centre with a sharp
kernel otherwise shows speckle at blood density that the network has never seen. Then, on
the windowed channels: left-right flips (hematomas occur on both sides) and small in-plane
rotations and zooms (head pose and size; none through-plane, slices are 5 mm thick).
Arrays are channel-first (C, z, y, x): MONAI's first spatial axis ("x" in its sigma names)
is z here, spatial axis 2 is x (left-right).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandShiftIntensityd,
)

SPATIAL_KEYS = ("image", "label")
HU_OFFSET = 6.0  # HU; calibration differences between scanners are a few HU
HU_NOISE_STD = 5.0  # HU; upper bound of the added noise SD (brain noise is ~3-6 HU at 5 mm)


def window_tensor(hu: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """HU (1, ...) or (B, 1, ...) -> one [0, 1] channel per (level, width) window, on the channel axis.

    The same mapping as `common.data.preprocess.window_channels`, in torch so it can follow
    HU-level augmentation.
    """
    channels = [((hu - (level - width / 2)) / width).clamp(0.0, 1.0) for level, width in windows]
    return torch.cat(channels, dim=-4).float()


class WindowChannelsd:
    """Dictionary transform: d["image"] = the HU windows of d["hu"] (then "hu" is dropped)."""

    def __init__(self, windows):
        self.windows = tuple(tuple(float(v) for v in w) for w in windows)

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        data["image"] = window_tensor(_plain(data.pop("hu")), self.windows)
        return data


def build_augmentation(seed: int, windows) -> Compose:
    """Augmentation of {"hu": (1, z, y, x) HU, "label": (1, z, y, x)} into {"image", "label"}."""
    in_plane = dict(sigma_x=(0.0, 0.0), sigma_y=(0.4, 1.0), sigma_z=(0.4, 1.0))
    transforms = Compose([
        RandShiftIntensityd(keys="hu", offsets=HU_OFFSET, prob=0.5),
        RandGaussianNoised(keys="hu", prob=0.5, mean=0.0, std=HU_NOISE_STD, sample_std=True),
        RandGaussianSmoothd(keys="hu", prob=0.15, **in_plane),  # softer kernel
        RandGaussianSharpend(keys="hu", prob=0.25, sigma1_x=(0.0, 0.0), sigma1_y=(0.2, 0.5), sigma1_z=(0.2, 0.5),
                             sigma2_x=0.0, sigma2_y=(0.5, 1.0), sigma2_z=(0.5, 1.0), alpha=(0.5, 2.0)),  # sharper
        WindowChannelsd(windows),
        RandFlipd(keys=SPATIAL_KEYS, prob=0.5, spatial_axis=2),
        # rotate_range[0] rotates within the (y, x) plane, i.e. about the z axis; 0 pads = air.
        RandAffined(keys=SPATIAL_KEYS, prob=0.3, rotate_range=(math.radians(15), 0.0, 0.0),
                    scale_range=(0.0, 0.1, 0.1), mode=("bilinear", "nearest"), padding_mode="zeros"),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


def augment_batch(transforms: Compose, hu: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each (1, z, y, x) HU patch of a batch; returns float32 images (B, C, ...) and int64 labels."""
    out_images, out_labels = [], []
    for patch, label in zip(hu, labels):
        item = transforms({"hu": torch.from_numpy(np.ascontiguousarray(patch)),
                           "label": torch.from_numpy(np.ascontiguousarray(label))})
        out_images.append(_plain(item["image"]).float())
        out_labels.append(_plain(item["label"]).round().long())
    return torch.stack(out_images), torch.stack(out_labels)


def _plain(x) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (its metadata is not needed for training)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
