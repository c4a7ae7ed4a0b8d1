"""How a centre's scanner turns a phantom into stored CT: geometry, blur, noise, calibration, files.

Centres differ the way real ones do: in-plane spacing, slice thickness (slices are integrated
over their thickness from sub-slice samples), reconstruction kernel (soft: correlated noise and
smooth edges; sharp: fine-grained noise and edge enhancement), noise level, HU calibration
offset, gantry tilt, and storage (int16 .nii.gz, float32 .nii, DICOM series; RAS/LPS order).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from common.data.dicom_io import write_dicom_series
from common.data.io import write_image
from common.errors import ConfigError

KERNELS = {"soft": (0.9, 1.0, 0.0), "standard": (0.7, 0.7, 0.2), "sharp": (0.5, 0.4, 0.6)}
# kernel -> (PSF sigma mm, noise correlation sigma px, edge enhancement gain)
STORAGES = ("nii.gz", "nii", "dicom")
SUB_SLICES = 2  # samples integrated per slice thickness (partial volume along z)


@dataclass(frozen=True)
class Scanner:
    matrix: int = 256
    inplane_mm: float = 0.9
    slice_mm: float = 5.0
    noise_hu: float = 4.0
    kernel: str = "soft"
    hu_offset: float = 0.0
    storage: str = "nii.gz"
    orientation: str = "LPS"  # axis order written to disk (SimpleITK DICOMOrient code)
    tilt_deg: float = 0.0  # gantry tilt about the left-right axis
    coverage_mm: float = 150.0  # cranio-caudal extent of the scan

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ConfigError(f"scanner kernel {self.kernel!r} unknown; use one of {', '.join(KERNELS)}")
        if self.storage not in STORAGES:
            raise ConfigError(f"scanner storage {self.storage!r} unknown; use one of {', '.join(STORAGES)}")
        if self.storage == "dicom" and self.orientation != "LPS":
            raise ConfigError("DICOM series are written slice by slice in LPS order; set orientation = 'LPS'")
        for name in ("matrix", "inplane_mm", "slice_mm", "coverage_mm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"scanner {name} must be > 0, got {getattr(self, name)}")

    @property
    def n_slices(self) -> int:
        return max(4, int(round(self.coverage_mm / self.slice_mm)))

    def direction(self) -> np.ndarray:
        t = np.deg2rad(self.tilt_deg)
        return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])

    def sampling_grid(self, centre_mm) -> tuple[np.ndarray, tuple[float, float, float]]:
        """Physical coordinates (3, n_slices*SUB_SLICES, matrix, matrix) of the sub-slice samples,
        and the stored grid's origin. The stored volume is centred on `centre_mm`."""
        d = self.direction()
        n_xy, nz = self.matrix, self.n_slices
        half = np.array([(n_xy - 1) * self.inplane_mm, (n_xy - 1) * self.inplane_mm,
                         (nz - 1) * self.slice_mm]) / 2
        origin = np.asarray(centre_mm, dtype=float) - d @ half
        sub = (np.arange(nz * SUB_SLICES) - (SUB_SLICES - 1) / 2) / SUB_SLICES  # slice index units
        i = np.arange(n_xy) * self.inplane_mm
        k = sub * self.slice_mm
        coords = (origin[:, None, None, None]
                  + d[:, 0, None, None, None] * i[None, None, None, :]
                  + d[:, 1, None, None, None] * i[None, None, :, None]
                  + d[:, 2, None, None, None] * k[None, :, None, None])
        return coords.astype(np.float32), tuple(origin)

    def acquire(self, hu_fine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Integrate sub-slices, blur with the kernel's PSF, add kernel-shaped noise, miscalibrate."""
        nz = hu_fine.shape[0] // SUB_SLICES
        hu = hu_fine.reshape(nz, SUB_SLICES, *hu_fine.shape[1:]).mean(axis=1)
        psf_mm, noise_px, edge_gain = KERNELS[self.kernel]
        sigma = (0, psf_mm / self.inplane_mm, psf_mm / self.inplane_mm)
        hu = ndimage.gaussian_filter(hu, sigma)
        if edge_gain:
            hu = hu + edge_gain * (hu - ndimage.gaussian_filter(hu, (0, 1.2, 1.2)))
        noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0, noise_px, noise_px))
        noise *= self.noise_hu / (noise.std() + 1e-12)
        return np.clip(hu + noise + self.hu_offset, -1024, 3071).astype(np.float32)

    def to_image(self, array: np.ndarray, origin) -> sitk.Image:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((self.inplane_mm, self.inplane_mm, self.slice_mm))
        image.SetOrigin(origin)
        image.SetDirection(self.direction().ravel().tolist())
        return image

    def store(self, hu: np.ndarray, mask: np.ndarray, origin, image_dir: Path, mask_dir: Path,
              case_id: str) -> None:
        """Write the image in this centre's storage format and the mask as .nii.gz on the same grid."""
        image = self.to_image(hu, origin)
        mask_image = self.to_image(mask.astype(np.uint8), origin)
        if self.storage == "dicom":
            write_dicom_series(image, image_dir / case_id, patient_id=case_id,
                               extra_tags={"0018|0060": "120", "0018|1210": self.kernel.upper()})
        else:
            image = sitk.DICOMOrient(image, self.orientation)
            if self.storage == "nii.gz":
                image = sitk.Cast(sitk.Round(image), sitk.sitkInt16)
            write_image(image, image_dir / f"{case_id}.{self.storage}", compress=self.storage == "nii.gz")
            mask_image = sitk.DICOMOrient(mask_image, self.orientation)
        write_image(mask_image, mask_dir / f"{case_id}.nii.gz")
