"""Whole-volume prediction by Gaussian-weighted sliding windows (MONAI).

Windows are the model's patch size rounded up to the network's required multiple (the
product of its strides per axis), so any volume size works: MONAI pads volumes smaller than
a window with 0, which is air in every HU window.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage
from torch import nn

from common.data.preprocess import Geometry, to_original_grid
from common.errors import DataError
from common.networks import main_output
from common.inference.postprocess import keep_blood_density, keep_intracranial, keep_main_lesion


def required_multiple(model: nn.Module) -> tuple[int, int, int]:
    return tuple(getattr(model, "required_multiple", (1, 1, 1)))  # type: ignore[return-value]


def fit_roi(roi_size, model: nn.Module) -> tuple[int, int, int]:
    """`roi_size` (z, y, x) rounded up to the model's required multiple per axis."""
    return tuple(int(math.ceil(r / m) * m) for r, m in zip(roi_size, required_multiple(model)))  # type: ignore


def check_volume(image, in_channels: int, name: str = "image") -> None:
    """Raise DataError naming `name` unless `image` is a finite, non-empty (C, z, y, x) volume."""
    shape = tuple(image.shape)
    if len(shape) != 4:
        raise DataError(name, f"expected a (channels, z, y, x) volume, got an array of shape {shape}")
    if shape[0] != in_channels:
        raise DataError(name, f"expected {in_channels} channels (one per HU window), got shape {shape}")
    if min(shape[1:]) == 0:
        raise DataError(name, f"empty volume (shape {shape})")
    values = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if not torch.isfinite(values).all():
        raise DataError(name, "volume holds NaN or infinite values")


@torch.no_grad()
def predict_probabilities(model: nn.Module, image, roi_size, *, overlap: float = 0.25, sw_batch_size: int = 4,
                          device="cpu", name: str = "image") -> np.ndarray:
    """Foreground (hematoma) probability (z, y, x) float32 for one (C, z, y, x) volume."""
    in_channels = getattr(model, "in_channels", image.shape[0] if getattr(image, "ndim", 0) == 4 else 0)
    check_volume(image, in_channels, name)
    was_training = model.training
    model.eval()
    try:
        volume = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
        logits = sliding_window_inference(
            volume, fit_roi(roi_size, model), sw_batch_size, lambda x: main_output(model(x)),
            overlap=overlap, mode="gaussian", padding_mode="constant", cval=0.0,
        )
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)[0, 1]
        return probs.cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)


def segment(model: nn.Module, image, roi_size, *, spacing=None, satellite_mm: float = 0.0, hu=None,
            **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(mask, probabilities) on the working grid: the mask (z, y, x) uint8 holds the voxels where
    the hematoma class wins, the foreground probability float32 is kept for mapping the mask
    onto another grid (`mask_on_grid`).

    With the volume's `hu` (z, y, x), components that cannot be acute blood (mean outside
    `postprocess.MIN_LESION_HU`-`MAX_LESION_HU`) are dropped first. With `satellite_mm` > 0 (and the volume's
    `spacing` (x, y, z) mm), only the main lesion and components within that distance of it
    are kept (see `postprocess.keep_main_lesion`).
    """
    probabilities = predict_probabilities(model, image, roi_size, **kwargs)
    mask = (probabilities > 0.5).astype(np.uint8)
    if hu is not None:
        mask = keep_blood_density(mask, hu)
        if spacing is not None:
            mask = keep_intracranial(mask, hu, spacing)
    if satellite_mm > 0:
        if spacing is None:
            raise ValueError("satellite_mm needs the volume's spacing (x, y, z) in mm")
        mask = keep_main_lesion(mask, spacing, satellite_mm)
    return mask, probabilities


def predict_mask(model: nn.Module, image, roi_size, **kwargs) -> np.ndarray:
    """The hematoma mask of `segment` alone (metrics on the working grid)."""
    return segment(model, image, roi_size, **kwargs)[0]


def mask_on_grid(mask: np.ndarray, probabilities: np.ndarray, working: Geometry, target: Geometry) -> sitk.Image:
    """The working-grid prediction on `target`'s grid (uint8 image), the way nnU-Net exports:
    the foreground probability is interpolated linearly and thresholded at 0.5 there, rather than
    the binary mask copied by nearest neighbour, which leaves the working grid's 2 x 2 x 5 mm
    staircase on a finer scan (on the development cohort's external centres: Dice against the
    stored masks 0.667 vs 0.653). Probabilities count only within one voxel of the kept lesion, so
    components dropped by post-processing stay dropped; a lesion too thin to reach 0.5 on the
    target grid falls back to the nearest-neighbour copy rather than vanishing."""
    near = ndimage.binary_dilation(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool))
    soft = np.where(near, probabilities, 0.0).astype(np.float32)
    resampled = sitk.GetArrayFromImage(to_original_grid(soft, working, target, is_mask=False)) > 0.5
    if not resampled.any():
        return to_original_grid(np.asarray(mask).astype(np.uint8), working, target, is_mask=True)
    image = sitk.GetImageFromArray(resampled.astype(np.uint8))
    image.CopyInformation(target.reference())
    return image
