"""Procedural adult head anatomy in Hounsfield units.

Coordinates are mm in a head frame: x toward the patient's left, y posterior, z superior,
origin near the centre of the cranial vault. Tissue HU follow published NCCT values
(gray matter 37-45, white matter 20-30, CSF 5-15, scalp 40-55, fat -50..-120, bone 700-3000).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.phantoms.fields import bounding_box, ellipsoid_sdf, smooth_noise, smooth_union

AIR_HU = -1000.0


@dataclass(frozen=True)
class Subject:
    vault: tuple[float, float, float]  # intracranial semi-axes (x, y, z) mm
    skull_mm: float
    scalp_mm: float
    atrophy: float  # 0 young .. 1 atrophic: wider CSF spaces and ventricles
    gm_hu: float
    wm_hu: float
    csf_hu: float
    table_hu: float  # cortical bone of the skull tables
    diploe_hu: float

    @property
    def ventricle_scale(self) -> float:
        return 1.0 + 0.8 * self.atrophy


def sample_subject(rng: np.random.Generator) -> Subject:
    return Subject(
        vault=(rng.normal(67, 3), rng.normal(84, 4), rng.normal(68, 3)),
        skull_mm=rng.uniform(5.0, 8.0),
        scalp_mm=rng.uniform(4.0, 7.0),
        atrophy=float(rng.beta(2, 3)),
        gm_hu=rng.normal(40, 1.5),
        wm_hu=rng.normal(27, 1.5),
        csf_hu=rng.normal(8, 2),
        table_hu=rng.uniform(1300, 1900),
        diploe_hu=rng.uniform(600, 900),
    )


# Deep structures (centre, semi-axes) for the right hemisphere; mirrored in x for the left.
CAUDATE = ((11.0, -12.0, 12.0), (5.0, 10.0, 9.0))
PUTAMEN = ((24.0, -2.0, 2.0), (5.5, 14.0, 10.0))
THALAMUS = ((9.0, 10.0, 2.0), (8.0, 12.0, 9.0))
BRAINSTEM = ((0.0, 16.0, -34.0), (12.0, 11.0, 24.0))
CEREBELLUM = ((22.0, 42.0, -38.0), (26.0, 22.0, 17.0))


@dataclass
class Anatomy:
    hu: np.ndarray  # float32 HU, noise-free
    cavity_sdf: np.ndarray  # signed distance to the inner table (negative inside the skull)
    parenchyma: np.ndarray  # bool: brain tissue (not CSF), where a hematoma may grow
    ventricles: np.ndarray  # bool


def render_anatomy(s: Subject, x, y, z, rng: np.random.Generator, extent_mm) -> Anatomy:
    """Render a head on coordinate arrays x, y, z (head frame, same shape (nz, ny, nx))."""
    shape = x.shape
    ax, ay, az = s.vault
    # Cranial cavity: vault above the skull base, temporal fossae, posterior fossa.
    vault = np.maximum(ellipsoid_sdf(x, y, z, (0, 0, 0), (ax, ay, az)), -(z + 22.0))
    temporal = np.minimum(ellipsoid_sdf(x, y, z, (42, -8, -26), (22, 34, 18)),
                          ellipsoid_sdf(x, y, z, (-42, -8, -26), (22, 34, 18)))
    fossa = ellipsoid_sdf(x, y, z, (0, 38, -36), (50, 34, 26))
    wobble = 1.2 * smooth_noise(rng, shape, extent_mm, 40.0)
    cavity = smooth_union(smooth_union(vault, temporal, 8.0), fossa, 8.0) + wobble

    # Skull thickens toward the base; scalp thickens over the temporal muscles.
    base = np.clip((-18.0 - z) / 30.0, 0.0, 1.0)
    skull_t = s.skull_mm * (1.0 + 1.5 * base)
    temporalis = np.clip((np.abs(x) / ax - 0.65) / 0.3, 0, 1) * (np.abs(z) < 35)
    scalp_t = s.scalp_mm + 5.0 * temporalis

    hu = np.full(shape, AIR_HU, dtype=np.float32)
    outer = cavity - skull_t  # distance outside the outer table
    scalp = (outer >= 0) & (outer < scalp_t)
    depth_in_scalp = np.where(scalp, scalp_t - outer, 0)
    fat = scalp & (depth_in_scalp > 1.5) & (depth_in_scalp < 1.5 + 0.35 * scalp_t) & (temporalis < 0.5)
    hu[scalp] = 48.0
    hu[fat] = -90.0

    bone = (cavity >= 0) & (outer < 0)
    rel = np.where(bone, cavity / skull_t, 0)  # 0 at inner table, 1 at outer
    tables = (rel < 0.28) | (rel > 0.72)
    bone_hu = np.where(tables, s.table_hu, s.diploe_hu) + 120 * smooth_noise(rng, shape, extent_mm, 6.0)
    hu[bone] = bone_hu[bone]
    # Skull-base air cells (mastoid, sinuses): low-density pockets inside thick base bone.
    cells = bone & (base > 0.3) & (smooth_noise(rng, shape, extent_mm, 8.0) > 1.1)
    hu[cells] = AIR_HU + 150

    inside = cavity < 0
    depth = -cavity
    hu[inside] = s.wm_hu
    folds = smooth_noise(rng, shape, extent_mm, 14.0)
    csf_t = 1.2 + 2.5 * s.atrophy
    cortex = inside & ((depth < csf_t + 3.0) | ((np.abs(folds) < 0.35) & (depth < 22.0)))
    hu[cortex] = s.gm_hu

    # Deep structures all lie in a central box: evaluate them there only (~8x fewer voxels).
    box = bounding_box((np.abs(x) < 52) & (y > -40) & (y < 66) & (z > -62) & (z < 34))
    bx, by, bz, b_inside = x[box], y[box], z[box], inside[box]
    b_hu = hu[box]
    for side in (1.0, -1.0):
        for (cx, cy, cz), semi in (CAUDATE, PUTAMEN, THALAMUS):
            b_hu[b_inside & (ellipsoid_sdf(bx, by, bz, (side * cx, cy, cz), semi) < 0)] = s.gm_hu - 2.0
        cb_c, cb_s = CEREBELLUM
        cerebellum = b_inside & (ellipsoid_sdf(bx, by, bz, (side * cb_c[0], cb_c[1], cb_c[2]), cb_s) < 0)
        b_hu[cerebellum] = s.gm_hu - 3.0
    b_hu[b_inside & (ellipsoid_sdf(bx, by, bz, *BRAINSTEM) < 0)] = s.wm_hu + 6.0

    # CSF spaces: subarachnoid rim, sulci, interhemispheric fissure, ventricles.
    vs = s.ventricle_scale
    sulci = inside & ((depth < csf_t) | ((np.abs(folds) < 0.05 + 0.05 * s.atrophy) & (depth < 16.0)))
    fissure = inside & (np.abs(x) < 1.0 + s.atrophy) & (z > -15) & (np.abs(y) > 30 - 10 * (z > 25))
    b_vent = np.zeros(bx.shape, dtype=bool)
    for side in (1.0, -1.0):
        b_vent |= ellipsoid_sdf(bx, by, bz, (side * (5.0 + 1.5 * vs), 0.0, 14.0), (3.5 * vs, 24.0, 6.5 * vs)) < 0
        b_vent |= ellipsoid_sdf(bx, by, bz, (side * 12.0, 26.0, 4.0), (3.0 * vs, 9.0, 9.0)) < 0  # atria
    b_vent |= ellipsoid_sdf(bx, by, bz, (0.0, 4.0, 0.0), (1.2 * vs, 10.0, 7.0)) < 0  # third
    b_vent |= ellipsoid_sdf(bx, by, bz, (0.0, 33.0, -33.0), (5.0, 3.5, 6.0)) < 0  # fourth
    ventricles = np.zeros(shape, dtype=bool)
    ventricles[box] = b_vent & b_inside
    csf = sulci | fissure | ventricles
    hu[csf] = s.csf_hu
    falx = inside & (np.abs(x) < 0.5) & (z > 0) & (np.abs(y) > 34)
    hu[falx] = 55.0
    parenchyma = inside & ~csf & (depth > csf_t)
    return Anatomy(hu, cavity.astype(np.float32), parenchyma, ventricles)
