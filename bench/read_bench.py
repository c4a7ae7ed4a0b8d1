"""What hemex's input safeguards cost when reading a scan, as ratios to plain SimpleITK reads
measured in the same run (these machines are noisy; only the ratios carry over).

    .venv/bin/python bench/read_bench.py [--size 512 512 64] [--repeats 3]

Cases (a synthetic head-sized volume, int16):
  nifti.gz   io.read_ct (header-size check streams the gzip once more) vs sitk.ReadImage
  dicom      io.read_ct on an even series (slice geometry check) vs sitk.ImageSeriesReader
  tilted     io.read_ct on a 15-degree gantry-tilted series (rebuilt on a regular grid) vs the
             same plain ITK read (which would be sheared)
  checks     the head-CT plausibility tests (HU and body outline) vs reading the NIfTI
  enhanced   io.read_ct on the even series as one enhanced multi-frame image (rebuilt from its frame
             positions) vs sitk.ReadImage of that file (GDCM alone: frames stacked in file order)
  spacing    io.slice_spacing_mm on the even series (headers only: what a site's info reply reads
             per case) vs the plain series read
Prints the median seconds of each and the ratio hemex / baseline.
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

from common.data import dicom_io, io  # noqa: E402
from common.data.plausibility import anatomy_problems, hu_problems  # noqa: E402


def head(size, spacing, direction=None) -> sitk.Image:
    nx, ny, nz = size
    _, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    r = ((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.47 * ny)) ** 2
    hu = np.where(r <= 1, 1000.0, -1000.0)
    hu = np.where(r <= 0.85, 30.0, hu) + np.random.default_rng(0).normal(0, 5, hu.shape)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write_enhanced(series: Path, folder: Path) -> Path:
    """The series as one Legacy Converted Enhanced CT image (highdicom), the multi-frame form."""
    import warnings

    import highdicom as hd
    import pydicom
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*intended person name.*")
        image = LegacyConvertedEnhancedCTImage([pydicom.dcmread(f) for f in dicom_io.dicom_series_files(series)],
                                               hd.UID(), 99, hd.UID(), 1)
    folder.mkdir()
    image.save_as(folder / "enhanced.dcm")
    return folder / "enhanced.dcm"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 64])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spacing = (0.45, 0.45, 2.5)
    tilt = np.deg2rad(15.0)
    sheared = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), 0.0, 0.0, float(np.sin(tilt)), 1.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        io.write_image(head(args.size, spacing), tmp / "ct.nii.gz")
        dicom_io.write_dicom_series(head(args.size, spacing), tmp / "even", "bench")
        dicom_io.write_dicom_series(head(args.size, spacing, sheared), tmp / "tilted", "bench-tilt")
        enhanced = write_enhanced(tmp / "even", tmp / "enhanced")

        def plain_series(folder):
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_io.dicom_series_files(folder))
            reader.SetOutputPixelType(sitk.sitkFloat32)
            return reader.Execute()

        nifti = sitk.ReadImage(str(tmp / "ct.nii.gz"))
        cases = [
            ("nifti.gz", lambda: io.read_ct(tmp / "ct.nii.gz"), lambda: sitk.ReadImage(str(tmp / "ct.nii.gz"))),
            ("dicom", lambda: io.read_ct(tmp / "even"), lambda: plain_series(tmp / "even")),
            ("tilted", lambda: io.read_ct(tmp / "tilted"), lambda: plain_series(tmp / "tilted")),
            ("checks", lambda: (hu_problems(sitk.GetArrayViewFromImage(nifti)), anatomy_problems(nifti)),
             lambda: sitk.ReadImage(str(tmp / "ct.nii.gz"))),
            ("enhanced", lambda: io.read_ct(tmp / "enhanced"), lambda: sitk.ReadImage(str(enhanced), sitk.sitkFloat32)),
            ("spacing", lambda: io.slice_spacing_mm(tmp / "even"), lambda: plain_series(tmp / "even")),
        ]
        for name, hemex, baseline in cases:
            base = median_time(baseline, args.repeats)
            ours = median_time(hemex, args.repeats)
            rows.append((name, base, ours))
    print(f"volume {args.size[0]}x{args.size[1]}x{args.size[2]} int16, median of {args.repeats}")
    print(f"{'case':<10} {'baseline s':>11} {'hemex s':>9} {'ratio':>7}")
    for name, base, ours in rows:
        print(f"{name:<10} {base:>11.3f} {ours:>9.3f} {ours / base:>7.2f}")


if __name__ == "__main__":
    main()
