"""Cheap patch augmentation with MONAI dictionary transforms.

Chosen for what varies between CT scanners and patients while staying cheap on a CPU:
left-right flips (hematomas occur on both sides), small in-plane rotations and zooms (head
pose and size; no through-plane rotation because slices are 5 mm thick), intensity scale and
shift (HU calibration offsets between centres) and Gaussian noise (dose and kernel).
Arrays are channel-first (C, z, y, x): spatial axis 0 is z, 2 is x (left-right).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

KEYS = ("image", "label")


def build_augmentation(seed: int) -> Compose:
    transforms = Compose([
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
        # rotate_range[0] rotates within the (y, x) plane, i.e. about the z axis.
        RandAffined(keys=KEYS, prob=0.3, rotate_range=(math.radians(15), 0.0, 0.0), scale_range=(0.0, 0.1, 0.1),
                    mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.3),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.3),
        RandGaussianNoised(keys="image", prob=0.2, mean=0.0, std=0.02),
    ])
    transforms.set_random_state(seed=seed)
    return transforms


def augment_batch(transforms: Compose, images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment each patch of a batch; returns plain float32 image and int64 label tensors."""
    out_images, out_labels = [], []
    for image, label in zip(images, labels):
        item = transforms({"image": torch.from_numpy(np.ascontiguousarray(image)),
                           "label": torch.from_numpy(np.ascontiguousarray(label))})
        out_images.append(_plain(item["image"]).float())
        out_labels.append(_plain(item["label"]).round().long())
    return torch.stack(out_images), torch.stack(out_labels)


def _plain(x) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (its metadata is not needed for training)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
