"""What every image reader checks before it allocates, and how a reader's error is shown in one line."""

from __future__ import annotations

import math
import os

from common.errors import ConfigError

# The largest image hemex reads (voxels x components), checked from the header before any voxel is
# decompressed or allocated: a 2048^3 all-zero .nii.gz is 16 MB on disk but 8 G voxels (32 GiB once
# read as float32). 2^30 is generous for head CT: a standard scan is 512 x 512 x 30-700 (at most
# ~0.2 G), and even a 1024 x 1024 ultra-high-resolution matrix with 1000 slices of 0.25 mm (25 cm of
# head) stays under it; read as float32 it is 4 GiB, about what one site process can afford beside
# preprocessing's copies. A site with larger scans raises it with the environment variable below.
MAX_VOXELS = 1 << 30
MAX_VOXELS_ENV = "HEMEX_MAX_VOXELS"


def max_voxels() -> int:
    """The voxel limit in force: MAX_VOXELS, or the site's HEMEX_MAX_VOXELS."""
    value = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not value:
        return MAX_VOXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{MAX_VOXELS_ENV}={value!r}: expected a whole number of voxels >= 1")
    return limit


def size_problem(size, components: int = 1) -> str | None:
    """Why an image of `size` (from its header) is too large to read, or None."""
    voxels = math.prod(int(n) for n in size) * max(int(components), 1)
    limit = max_voxels()
    if voxels <= limit:
        return None
    shape = " x ".join(str(int(n)) for n in size) + (f" x {components} components" if components > 1 else "")
    return (f"size {shape} ({voxels:,} voxels) is over hemex's limit of {limit:,} voxels "
            f"({MAX_VOXELS_ENV} sets it); not read")


def error_message(err: Exception) -> str:
    """The one line of an error worth showing: ITK messages start with a file:line banner and end
    with the useful sentence, so the last non-empty line (the exception's type when there is none)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__
