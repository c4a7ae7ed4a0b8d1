"""End-to-end `hemex predict` timing on CPU: load / segment / classify / write per case.

    .venv/bin/python bench/predict_bench.py [--profile smoke] [--size 512 512 32] [--cases 3]
        [--threads 2] [--roi Z Y X] [--out runs/predict_bench.json]

Builds a bundle of RANDOMLY INITIALISED models (the profile's architectures, laid out as the
federation writes them) and a synthetic 512x512x32 head CT (0.45 x 0.45 x 5 mm, written as
NIfTI), then times `predict_case` on it. The weights are untrained: only the timing means
anything, not the mask, the volume or the probability. The first case is a warm-up and is
reported separately; the table shows the median of the following cases and each stage's share
of the total. Target of issue 8: <= 20 s per case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from common.data import io  # noqa: E402
from common.inference.bundle import load_bundle, write_untrained_bundle  # noqa: E402
from common.inference.predict import predict_case  # noqa: E402

STAGES = ("load_s", "segment_s", "classify_s", "write_s")


def synthetic_scan(size, spacing=(0.45, 0.45, 5.0)) -> sitk.Image:
    nx, ny, nz = size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    rng = np.random.default_rng(0)
    radius = ((x - (nx - 1) / 2) / (0.45 * nx)) ** 2 + ((y - (ny - 1) / 2) / (0.4 * ny)) ** 2
    blob = ((x - 0.6 * nx) ** 2 + (y - ny / 2) ** 2 <= (0.08 * nx) ** 2) & (np.abs(z - nz / 2) <= nz / 6)
    hu = np.full((nz, ny, nx), -1000.0, dtype=np.float32)
    hu[radius <= 1.0] = 1000.0
    hu[radius <= 0.85] = 30.0
    hu[blob] = 65.0
    hu += rng.normal(0, 4, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(spacing)
    image.SetOrigin((-(nx - 1) / 2 * spacing[0], -(ny - 1) / 2 * spacing[1], 0.0))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 32], help="x y z voxels")
    parser.add_argument("--cases", type=int, default=3, help="timed runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roi", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="override the profile's sliding-window inference window (voxels)")
    parser.add_argument("--out", default=None, help="optional JSON output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="predict_bench.") as tmp:
        tmp = Path(tmp)
        bundle = load_bundle(write_untrained_bundle(tmp / "bundle", args.profile,
                                                    preprocessing={"roi_size": args.roi} if args.roi else None))
        scan = tmp / "scan.nii.gz"
        io.write_image(synthetic_scan(args.size), scan)
        runs = []
        for i in range(args.cases + 1):
            result = predict_case(bundle, scan, tmp / f"out{i}")
            runs.append(result["timing"])
            print(f"run {i}{' (warm-up)' if i == 0 else ''}: "
                  + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in result["timing"].items()), flush=True)
    timed = runs[1:] or runs
    median = {k: statistics.median(r[k] for r in timed) for k in (*STAGES, "total_s")}
    print(f"\nhemex predict on a {'x'.join(map(str, args.size))} synthetic scan, profile {args.profile!r}, "
          f"inference window {bundle.preprocessing['roi_size']}, {args.threads} torch threads, UNTRAINED weights (timing only); median of {len(timed)} run(s):")
    print(f"{'stage':<10} {'seconds':>8} {'share':>7}")
    for k in STAGES:
        print(f"{k[:-2]:<10} {median[k]:>8.2f} {median[k] / median['total_s']:>7.1%}")
    print(f"{'total':<10} {median['total_s']:>8.2f} {'':>7}  (target <= 20 s per case: "
          f"{'met' if median['total_s'] <= 20 else 'NOT met'})")
    if args.out:
        from common.files import write_json

        write_json(Path(args.out), {"profile": args.profile, "size": args.size, "roi_size": bundle.preprocessing["roi_size"], "threads": args.threads,
                                    "untrained": True, "runs": runs, "median": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
