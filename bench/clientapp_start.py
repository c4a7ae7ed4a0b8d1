"""What a site pays before its handler's real work, per message: a deployed SuperNode starts a fresh
ClientApp process for every message (Flower 1.42), so imports and the site's preprocessed scans are
paid again each time.

    .venv/bin/python bench/clientapp_start.py [--data DATA_ROOT] [--center center1] [--repeats 2]

Measured in fresh processes, in the same run: (1) importing the ClientApp (`client.app`), with the
modules that take longest (as `python -X importtime` reports them); (2) building the site and
loading its segmentation training cases, as a `train.seg` message does, and cutting its classifier
ROIs on the reference masks, as a `train.cls` message does, with empty on-disk caches (the first
message) and with the caches the first one left (every later message).
Prints seconds and the warm / cold ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "runs" / "paper-seed0" / "cohort-paper-seed0"

LOAD_SITE = """
import json, sys, time
start = time.perf_counter()
from common.federation.settings import FederationSettings
from client.site import Site
imported = time.perf_counter()
site = Site({center!r}, {data!r}, FederationSettings(profile="cpu", out_dir={out!r}), cache_dir={cache!r})
samples = site.cache.load(site.fit_cases)
loaded = time.perf_counter()
dataset, fit, val = site.roi_dataset()
print(json.dumps({{"import_s": imported - start, "load_s": loaded - imported, "rois_s": time.perf_counter() - loaded,
                  "cases": len(samples), "roi_cases": len(dataset.cases)}}))
"""


def run_python(code: str) -> tuple[float, str, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *code], cwd=REPO, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout, done.stderr


PACKAGES = ("torch", "monai", "flwr", "timm", "scipy", "SimpleITK", "sklearn", "matplotlib", "numpy", "safetensors")


# What a message's process imports: the app (its handler table), then the handler's own module.
HANDLER_MODULES = ("client.app", "client.segmentation", "client.classifier", "client.synthesis", "client.pretraining")


def import_times(repeats: int, module: str = "client.app") -> tuple[float, list[tuple[str, float]]]:
    """Best wall time of importing `module` in a fresh process, and the cumulative import time of
    the libraries it pulls in (each counted where it is first imported)."""
    best, slowest = float("inf"), []
    for _ in range(repeats):
        seconds, _, stderr = run_python(["-X", "importtime", "-c", f"import {module}"])
        if seconds < best:
            best = seconds
            rows = []
            for line in stderr.splitlines():
                if not line.startswith("import time:") or "|" not in line:
                    continue
                _, cumulative, name = line[len("import time:"):].split("|")
                if name.strip() in PACKAGES and cumulative.strip().isdigit():
                    rows.append((name.strip(), int(cumulative) / 1e6))
            slowest = sorted(rows, key=lambda r: -r[1])[:6]
    return best, slowest


def site_load(data: Path, center: str, cache: Path, out: Path) -> dict:
    code = LOAD_SITE.format(center=center, data=str(data / center), out=str(out), cache=str(cache))
    seconds, stdout, _ = run_python(["-c", code])
    return {**json.loads(stdout.strip().splitlines()[-1]), "process_s": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="a cohort DATA_ROOT (default: the main job's)")
    parser.add_argument("--center", default="center1")
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per measurement (best kept)")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / args.center).is_dir():
        print(f"{data / args.center}: no such centre; run `make simulate` first or pass --data", file=sys.stderr)
        return 2
    imports, slowest = import_times(args.repeats)
    print(f"import client.app in a fresh process: {imports:.2f} s (best of {args.repeats}); libraries, cumulative "
          "(nested: torch is inside monai's time):")
    for name, seconds in slowest:
        print(f"  {name:40s} {seconds:6.2f} s")
    print("a message's process also imports its handler's module (on the first message it handles):")
    for module in HANDLER_MODULES[1:]:
        seconds, libraries = import_times(args.repeats, module)
        print(f"  {module:40s} {seconds:6.2f} s ({', '.join(n for n, _ in libraries[:3])} the slowest)")
    work = Path(tempfile.mkdtemp(prefix="hemex-start-"))
    try:
        cold = warm = None
        for _ in range(args.repeats):
            shutil.rmtree(work / "cache", ignore_errors=True)
            first = site_load(data, args.center, work / "cache", work / "out")
            later = site_load(data, args.center, work / "cache", work / "out")
            cold = first if cold is None or first["process_s"] < cold["process_s"] else cold
            warm = later if warm is None or later["process_s"] < warm["process_s"] else warm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"site {args.center}, {cold['cases']} training cases, a fresh process per message:")
    print(f"  first message (no cache): process {cold['process_s']:.2f} s = imports {cold['import_s']:.2f} s "
          f"+ building the site and loading its cases {cold['load_s']:.2f} s + ROIs {cold['rois_s']:.2f} s")
    print(f"  later messages (caches):  process {warm['process_s']:.2f} s = imports {warm['import_s']:.2f} s "
          f"+ {warm['load_s']:.2f} s + {warm['rois_s']:.2f} s")
    print(f"  classifier ROIs of {cold['roi_cases']} labelled cases: first message {cold['rois_s']:.2f} s, later "
          f"{warm['rois_s']:.2f} s")
    print(f"  warm / cold: loading {warm['load_s'] / cold['load_s']:.3f}, ROIs {warm['rois_s'] / cold['rois_s']:.3f}, "
          f"process {warm['process_s'] / cold['process_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
