"""What redrawing a predicted mask's boundary on the scan's own pixels costs, as ratios to steps
measured in the same run (these machines are noisy; only the ratios carry over).

    .venv/bin/python bench/refine_bench.py [--size 512 512 32] [--repeats 3]

A synthetic head-sized scan (0.45 x 0.45 x 5 mm, a 65 HU lobulated clot in 30 HU brain with 4 HU
noise) and its model output on the CPU profile's 2 x 2 x 5 mm working grid (a shrunken disc with a
smooth probability edge). Timed, median of --repeats:
  mask_on_grid    the working-grid probability interpolated onto the scan's grid (the step before)
  refine          postprocess.refine_boundary on that grid
  read            io.read_ct of the scan as NIfTI (what every prediction pays anyway)
Prints the seconds, refine / mask_on_grid and refine / read, and the Dice of both masks against
the clot as drawn (the refinement's gain on this scan).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from common.data import io  # noqa: E402
from common.data.preprocess import Geometry  # noqa: E402
from common.inference.segmentation import mask_on_grid  # noqa: E402
from common.inference.postprocess import refine_boundary  # noqa: E402

NATIVE = (0.45, 0.45, 5.0)
WORKING = (2.0, 2.0, 5.0)


def grid(size, spacing) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    image.SetSpacing(spacing)
    return image


def scene(size):
    nx, ny, nz = size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    cx, cy = 0.6 * nx * NATIVE[0], 0.5 * ny * NATIVE[1]
    r = np.hypot(x * NATIVE[0] - cx, y * NATIVE[1] - cy)
    angle = np.arctan2(y * NATIVE[1] - cy, x * NATIVE[0] - cx)
    clot = (r < 18 + 4 * np.sin(3 * angle)) & (np.abs(z - nz / 2) <= nz / 6)
    hu = np.where(clot, 65.0, 30.0) + np.random.default_rng(0).normal(0, 4, clot.shape)
    native = grid(size, NATIVE)
    working_size = [int(round(s * n / w)) for s, n, w in zip(size, NATIVE, WORKING)]
    working = grid(working_size, WORKING)
    wz, wy, wx = np.mgrid[0:working_size[2], 0:working_size[1], 0:working_size[0]].astype(np.float32)
    wr = np.hypot(wx * WORKING[0] - cx, wy * WORKING[1] - cy)
    prob = np.clip((16.0 - wr) / 4.0 + 0.5, 0, 1) * (np.abs(wz - working_size[2] / 2) <= working_size[2] / 6)
    return hu.astype(np.float32), clot, native, working, prob.astype(np.float32)


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def dice(a, b):
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 32], help="x y z voxels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hu, clot, native, working, prob = scene(args.size)
    work_geom, native_geom = Geometry.of(working), Geometry.of(native)
    t_grid, mask = timed(lambda: sitk.GetArrayFromImage(
        mask_on_grid(prob > 0.5, prob, work_geom, native_geom)), args.repeats)
    t_refine, refined = timed(lambda: refine_boundary(mask, hu, NATIVE), args.repeats)
    with tempfile.TemporaryDirectory(prefix="refine_bench.") as tmp:
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing(NATIVE)
        io.write_image(image, Path(tmp) / "scan.nii.gz")
        t_read, _ = timed(lambda: io.read_ct(Path(tmp) / "scan.nii.gz"), args.repeats)
    print(f"{'x'.join(map(str, args.size))} scan at {NATIVE} mm, median of {args.repeats}:")
    print(f"  mask_on_grid {t_grid:7.3f} s   refine {t_refine:7.3f} s   read {t_read:7.3f} s")
    print(f"  refine / mask_on_grid {t_refine / t_grid:5.2f}x   refine / read {t_refine / t_read:5.2f}x")
    print(f"  Dice vs the drawn clot: interpolated {dice(mask > 0, clot):.3f} -> refined {dice(refined > 0, clot):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
