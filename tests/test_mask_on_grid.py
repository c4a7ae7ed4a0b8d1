"""Mapping a working-grid prediction onto the scan's finer grid (`mask_on_grid`): interpolating
the foreground probability beats copying the binary mask by nearest neighbour, dropped components
stay dropped, and a lesion thinner than the threshold still comes back."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from common.data.preprocess import Geometry, to_original_grid
from common.inference.segmentation import mask_on_grid

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# Both grids tile the same 40 x 40 x 40 mm box: a 0.5 x 0.5 x 1.25 mm scan, a 2 x 2 x 5 mm working grid.
FINE = Geometry((80, 80, 32), (0.5, 0.5, 1.25), (0.25, 0.25, 0.625), IDENTITY)
COARSE = Geometry((20, 20, 8), (2.0, 2.0, 5.0), (1.0, 1.0, 2.5), IDENTITY)


def centres(geometry: Geometry, offsets=(0.0,)) -> list[np.ndarray]:
    """Physical (z, y, x) coordinate grids of the voxel centres (plus sub-voxel offsets)."""
    axes = [geometry.origin[a] + np.add.outer(np.arange(geometry.size[a]) * geometry.spacing[a],
                                              np.asarray(offsets) * geometry.spacing[a]).ravel()
            for a in (2, 1, 0)]
    return np.meshgrid(*axes, indexing="ij")


def ball(geometry: Geometry, centre, radius: float, supersample: int = 1) -> np.ndarray:
    """Fraction of each voxel inside a ball (supersampled), (z, y, x)."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    z, y, x = centres(geometry, offsets)
    inside = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) < radius ** 2
    shape = tuple(geometry.size[::-1])
    s = supersample
    return inside.reshape(shape[0], s, shape[1], s, shape[2], s).mean(axis=(1, 3, 5))


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_probability_interpolation_follows_the_lesion_better_than_nearest_neighbour():
    centre, radius = (20.3, 19.7, 21.0), 7.0
    truth = ball(FINE, centre, radius) > 0.5
    probabilities = ball(COARSE, centre, radius, supersample=6).astype(np.float32)  # a perfect partial-volume model
    mask = (probabilities > 0.5).astype(np.uint8)
    nearest = sitk.GetArrayFromImage(to_original_grid(mask, COARSE, FINE, is_mask=True))
    mapped = mask_on_grid(mask, probabilities, COARSE, FINE)
    assert mapped.GetSize() == FINE.size and mapped.GetSpacing() == FINE.spacing
    d_nearest, d_mapped = dice(nearest, truth), dice(sitk.GetArrayFromImage(mapped), truth)
    print(f"Dice vs the true ball: nearest {d_nearest:.3f}, interpolated {d_mapped:.3f}")
    assert d_mapped > d_nearest + 0.02 and d_mapped > 0.9


def test_dropped_components_stay_dropped_and_thin_lesions_survive():
    probabilities = np.zeros(COARSE.size[::-1], np.float32)
    probabilities[3:5, 8:12, 8:12] = 0.9  # the kept lesion
    probabilities[3:5, 1:3, 1:3] = 0.9  # a component post-processing removed (absent from the mask)
    mask = np.zeros_like(probabilities, np.uint8)
    mask[3:5, 8:12, 8:12] = 1
    mapped = sitk.GetArrayFromImage(mask_on_grid(mask, probabilities, COARSE, FINE))
    assert mapped[:, 36:44, 36:44].any() and not mapped[:, :16, :16].any()
    # One voxel at 0.55: linear interpolation stays below 0.5 almost everywhere around it.
    thin = np.zeros_like(probabilities)
    thin[4, 10, 10] = 0.55
    single = (thin > 0.5).astype(np.uint8)
    assert sitk.GetArrayFromImage(mask_on_grid(single, thin, COARSE, FINE)).sum() > 0
