"""Render a spontaneous intracerebral hematoma with its NCCT markers into a head phantom.

Shape: a randomly oriented ellipsoid whose surface is perturbed by smooth noise (irregularity),
scaled to the target volume, confined to brain parenchyma; satellite islands near its border.
Density: clot HU with smooth heterogeneity, a blend-sign half (18-30 HU darker behind a sharp
planar interface), an enclosed black-hole region (>= 28 HU darker), perihematomal edema with
exponential fall-off, and intraventricular extension.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.phantoms.anatomy import BRAINSTEM, CEREBELLUM, PUTAMEN, THALAMUS, Anatomy
from common.phantoms.fields import ellipsoid_sdf, random_rotation, smooth_noise
from common.phantoms.risk import Phenotype

EDEMA_HU = 24.0
OUTSIDE = 100.0  # level-field value (mm) far from any hematoma


def candidate_region(p: Phenotype, anatomy: Anatomy, x, y, z) -> np.ndarray:
    """Voxels where the hematoma centre may lie for its location type."""
    side = float(p.side)
    depth = -anatomy.cavity_sdf
    if p.location == "lobar":
        deep = ellipsoid_sdf(x, y, z, (side * 18.0, 0.0, 6.0), (22.0, 30.0, 20.0)) < 0
        region = (x * side > 8) & (depth > 10) & (depth < 32) & (z > -5) & ~deep
    else:
        (cx, cy, cz), semi = {"deep": PUTAMEN, "thalamus": THALAMUS, "cerebellum": CEREBELLUM,
                              "brainstem": BRAINSTEM}[p.location]
        if p.location != "brainstem":
            cx *= side
        region = ellipsoid_sdf(x, y, z, (cx, cy, cz), semi) < 0
    region &= anatomy.parenchyma
    if not region.any():  # tiny or clipped grids: fall back to any parenchyma
        region = anatomy.parenchyma
    return region


def render_hematoma(p: Phenotype, anatomy: Anatomy, x, y, z, voxel_ml: float, spacing_zyx,
                    rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Add the hematoma to anatomy.hu in place. Return its level field (approximate signed
    distance in mm, negative inside; +OUTSIDE where blood cannot be) and measured descriptors.
    A level field rather than a mask lets thick slices average it and threshold once."""
    region = np.flatnonzero(candidate_region(p, anatomy, x, y, z))
    centre_idx = region[rng.integers(len(region))]
    centre = np.array([x.flat[centre_idx], y.flat[centre_idx], z.flat[centre_idx]])
    rotation = random_rotation(rng)
    ratios = np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)])
    ratios /= np.cbrt(ratios.prod())
    radius = np.cbrt(3.0 * p.volume_ml * 1000.0 / (4.0 * np.pi))

    # Work inside a box around the centre: hematomas are small next to the head.
    reach = 2.2 * radius * ratios.max() + 12.0
    near = (np.abs(x - centre[0]) < reach) & (np.abs(y - centre[1]) < reach) & (np.abs(z - centre[2]) < reach)
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(near))
    bx, by, bz = x[box] - centre[0], y[box] - centre[1], z[box] - centre[2]
    local = np.einsum("ij,j...->i...", rotation.T, np.stack([bx, by, bz]))
    extent = [sh * sp for sh, sp in zip(bx.shape, spacing_zyx)]
    lobes = smooth_noise(rng, bx.shape, extent, max(4.0, 0.9 * radius))
    amplitude = 0.06 + 0.4 * p.irregularity
    allowed = anatomy.parenchyma[box] | ((-anatomy.cavity_sdf[box] > 2.0) & ~anatomy.ventricles[box])

    # Two passes of volume correction: the perturbation and clipping change the volume.
    scale = 1.0
    for _ in range(3):
        axes = radius * scale * ratios
        rho = np.sqrt(sum((local[i] / axes[i]) ** 2 for i in range(3)))
        core_level = (rho - 1.0 - amplitude * lobes) * float(np.mean(axes))
        core = (core_level < 0) & allowed
        achieved = core.sum() * voxel_ml
        if achieved <= 0:
            scale *= 1.5
            continue
        scale *= float(np.clip((p.volume_ml / achieved) ** (1 / 3), 0.7, 1.4))

    level = core_level
    for _ in range(p.islands):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        offset = rotation @ (direction * axes * rng.uniform(1.1, 1.45))
        r_island = rng.uniform(1.6, 3.2)
        island = np.sqrt((bx - offset[0]) ** 2 + (by - offset[1]) ** 2 + (bz - offset[2]) ** 2) - r_island
        level = np.minimum(level, island)
    level = np.where(allowed, level, OUTSIDE).astype(np.float32)
    mask = level < 0

    # Density: clot HU plus heterogeneity, then the hypodense markers.
    texture = smooth_noise(rng, bx.shape, extent, 3.0)
    clot = p.clot_hu + (2.0 + 9.0 * p.heterogeneity) * texture
    if p.blend:
        normal = rng.standard_normal(3)
        normal /= np.linalg.norm(normal)
        side = np.einsum("i,i...->...", normal, np.stack([bx, by, bz])) > rng.uniform(-0.2, 0.3) * radius
        clot = np.where(side, clot - rng.uniform(18, 30), clot)
    if p.black_hole:
        inner = ndimage.binary_erosion(core, iterations=2)
        if inner.sum() > 8:
            pick = np.flatnonzero(inner)[rng.integers(inner.sum())]
            hx, hy, hz = bx.flat[pick], by.flat[pick], bz.flat[pick]
            r_hole = rng.uniform(0.25, 0.4) * radius
            hole = ((bx - hx) ** 2 + (by - hy) ** 2 + (bz - hz) ** 2 < r_hole**2) & inner
            clot = np.where(hole, clot - rng.uniform(28, 40), clot)

    hu_box = anatomy.hu[box]
    # Edema: brain around the clot drifts toward ~24 HU, falling off over a few mm.
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing_zyx)
    falloff = rng.uniform(2.0, 4.5) * (0.6 + 0.4 * np.cbrt(p.volume_ml / 12.0))
    weight = np.exp(-distance / falloff) * anatomy.parenchyma[box] * (distance > 0)
    hu_box[:] = hu_box + (EDEMA_HU - hu_box) * weight * 0.9
    hu_box[mask] = clot[mask]

    ivh_ml = 0.0
    if p.ivh:
        # Blood layers in the dependent (posterior) part of the ipsilateral lateral ventricle.
        ventricle = anatomy.ventricles & (x * p.side > 0) & (y > rng.uniform(-5, 15))
        anatomy.hu[ventricle] = rng.uniform(55, 70)
        ivh_ml = float(ventricle.sum() * voxel_ml)

    full = np.full(anatomy.hu.shape, OUTSIDE, dtype=np.float32)
    full[box] = level
    return full, {"centre_mm": centre.round(1).tolist(), "ivh_ml": round(ivh_ml, 2)}
