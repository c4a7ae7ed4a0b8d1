"""On-site synthesis for one centre: the `hemex synth` run.

    DATA_ROOT/<center>  --(reference masks)-->  HE ROIs  --DDPM-->  generator
        --DDIM-->  candidates  --memorization audit-->  accepted synthetic HE ROIs

Outputs in OUT (each written to a temporary name and renamed):
    synthetic_he.npz  images (n, 3, P, P) float32 [0, 1] (HU-window channels), masks (n, P, P)
                      uint8 (with_mask: generated, or with mask_condition the site's HE masks moved
                      at random that the images were drawn around), plus geometry metadata;
                      accepted samples only
    audit.json        counts, threshold, distance quantiles, feature distance, intensity stats
    quality.png       real HE ROIs, accepted synthetic ROIs, rejected ones beside their nearest
                      training ROI
    config.json       resolved settings, seed, package versions, timings

Counting for the ratio is per ROI slice (the classifier trains on slices; every case contributes
`slices_per_case` of them), so the number of synthetic ROIs is
    synthetic_needed(HE cases * k, NHE cases * k, ratio).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.errors import DataError, HemexError
from common.files import versions, write_json, write_npz
from common.synthesis.settings import SynthesisSettings

NPZ_FORMAT = "hemex-synthetic-he/1"
CHANNEL_NAMES = ("brain", "blood", "subdural")


@dataclass
class CenterROIs:
    """ROIs of one centre's labelled cases: images (N, C, P, P), masks (N, P, P), per-ROI labels
    and case ids (groups), and the cases left out with the reason."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    n_he_cases: int
    n_nhe_cases: int
    skipped: list[str]


MIN_HE_CASES = 2  # the memorization audit compares each real case with the others: two at least


def usable_he_cases(data_root: Path, center: str) -> int:
    """HE cases of the centre with a reference mask: what a generator can learn from."""
    from common.data.contract import read_cohort

    return sum(c.he == 1 and c.mask_path is not None for c in read_cohort(Path(data_root), [center])[center])


def load_center_rois(data_root: Path, center: str, settings: SynthesisSettings, windows,
                     include_nhe: bool = False, log: Callable[[str], None] = lambda m: None) -> CenterROIs:
    """ROIs of a centre's HE cases (and NHE cases when include_nhe) from the reference masks, on the
    native grid (as the classifier extracts them). NHE cases are always counted."""
    from common.data.contract import read_cohort
    from common.data.preprocess import load_case
    from common.data.roi import extract_rois

    cases = read_cohort(Path(data_root), [center])[center]
    usable = usable_he_cases(data_root, center)
    if usable < MIN_HE_CASES:
        raise DataError(Path(data_root) / center, f"{usable} HE case(s) with a reference mask; a generator and its "
                        f"memorization audit need at least {MIN_HE_CASES}")
    labelled = [c for c in cases if c.he in (0, 1)]
    n_he = sum(c.he == 1 for c in labelled)
    n_nhe = sum(c.he == 0 for c in labelled)
    images, masks, labels, groups, skipped = [], [], [], [], []
    wanted = [c for c in labelled if c.he == 1 or include_nhe]
    for i, case in enumerate(wanted, start=1):
        if case.mask_path is None:
            skipped.append(f"{center}/{case.case_id}: no reference mask")
            continue
        try:
            sample = load_case(case, None, windows)
            rois = extract_rois(sample, k=settings.slices_per_case, size_mm=settings.size_mm,
                                pixels=settings.pixels, windows=windows)
        except DataError as err:
            skipped.append(str(err))
            continue
        images.append(rois.images)
        masks.append(rois.masks)
        labels += [case.he] * len(rois.images)
        groups += [case.case_id] * len(rois.images)
        log(f"ROIs {i}/{len(wanted)}")
    if not images:
        raise DataError(Path(data_root) / center, "no HE case with a usable reference mask: nothing to learn from")
    return CenterROIs(np.concatenate(images).astype(np.float32), np.concatenate(masks).astype(np.uint8),
                      np.asarray(labels, int), np.asarray(groups), n_he, n_nhe, skipped)


def generator_inputs(rois: CenterROIs, settings: SynthesisSettings) -> np.ndarray:
    """What the generator learns: the window channels, plus the mask as a channel when with_mask."""
    if settings.with_mask:
        return np.concatenate([rois.images, rois.masks[:, None].astype(np.float32)], axis=1)
    return rois.images


def split_generated(samples: np.ndarray, settings: SynthesisSettings, n_windows: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Generated (n, C', P, P) -> window images (n, n_windows, P, P) and masks (n, P, P) or None."""
    images = samples[:, :n_windows].astype(np.float32)
    masks = (samples[:, n_windows] > 0.5).astype(np.uint8) if settings.with_mask else None
    return images, masks


def generate(trained, n: int, seed: int, he_masks: np.ndarray) -> np.ndarray:
    """`n` generated ROIs (n, C', P, P) laid out as the generator's inputs (window channels, then the
    mask when with_mask). A mask-conditioned generator draws around the site's HE masks, moved at
    random (common/synthesis/shapes.py), which become the ROIs' mask channel."""
    from common.synthesis.diffusion import sample
    from common.synthesis.shapes import sampling_masks

    if not trained.condition_channels:
        return sample(trained, n, seed=seed)
    masks = sampling_masks(he_masks, n, seed=seed).astype(np.float32)[:, None]
    return np.concatenate([sample(trained, n, seed=seed, conditions=masks), masks], axis=1)


def resize_rois(images: np.ndarray, pixels: int, masks: np.ndarray | None = None):
    """Resample (n, C, P, P) images (bilinear) and (n, P, P) masks (nearest) to pixels x pixels, e.g.
    when the generator ran at a smaller size than the classifier's ROIs."""
    import torch
    import torch.nn.functional as F

    images = np.asarray(images, np.float32)
    if images.shape[-1] == pixels:
        return images, masks
    x = F.interpolate(torch.from_numpy(images), size=(pixels, pixels), mode="bilinear", align_corners=False)
    out_masks = None
    if masks is not None:
        m = F.interpolate(torch.from_numpy(np.asarray(masks, np.float32))[:, None], size=(pixels, pixels), mode="bilinear",
                          align_corners=False)
        out_masks = (m[:, 0] > 0.5).numpy().astype(np.uint8)
    return x.clamp(0, 1).numpy(), out_masks


def load_synthetic(path: Path) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Read a synthetic_he.npz: (images, masks or None, metadata)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            images = data["images"].astype(np.float32)
            masks = data["masks"].astype(np.uint8) if "masks" in data.files else None
    except (OSError, KeyError, ValueError) as err:
        raise DataError(path, f"not a hemex synthetic_he.npz: {err}") from err
    if meta.get("format") != NPZ_FORMAT:
        raise DataError(path, f"format {meta.get('format')!r}, expected {NPZ_FORMAT!r}")
    return images, masks, meta


@dataclass
class SynthesisResult:
    images: np.ndarray  # accepted (n, C, P, P)
    masks: np.ndarray | None
    audit: dict
    config: dict


def synthesize(rois: CenterROIs, settings: SynthesisSettings, seed: int = 0, n_needed: int | None = None,
               log: Callable[[str], None] = print, holdout: np.ndarray | None = None,
               cache_dir: Path | None = None) -> tuple[SynthesisResult, dict]:
    """Train a generator on the HE ROIs (all ROIs, class-conditional, when settings.conditional),
    generate candidates, audit them, and keep up to `n_needed` accepted samples. With `cache_dir`,
    a generator trained before on the same inputs and settings is reused (common/synthesis/cache.py).

    Returns the result and the intermediate arrays (for the quality figure): candidates,
    accepted mask, nearest indices.
    """
    from common.synthesis.audit import feature_distance, intensity_stats, memorization_audit, realism_verdict
    from common.synthesis.cache import generator_key, load_generator, save_generator
    from common.synthesis.diffusion import count_parameters, train_generator
    from common.synthesis.ratio import synthetic_needed

    k = settings.slices_per_case
    if n_needed is None:
        n_needed = synthetic_needed(rois.n_he_cases * k, rois.n_nhe_cases * k, settings.ratio)
    n_needed = min(n_needed, settings.max_synthetic)
    he = rois.labels == 1
    n_windows = rois.images.shape[1]
    inputs = generator_inputs(rois, settings)
    if settings.conditional:
        train_x, train_y = inputs, rois.labels
    else:
        train_x, train_y = inputs[he], None
    timings = {}
    trained = None
    key = generator_key(train_x, train_y, settings, seed)
    if n_needed > 0:
        trained = load_generator(cache_dir, key, settings)
        if trained is not None:
            log(f"reusing the cached {settings.generator} generator {key[:12]} (same ROIs, settings and seed)")
            timings["train_seconds"] = 0.0
    if n_needed > 0 and trained is None:
        log(f"training {settings.generator} generator ({settings.objective}) on {len(train_x)} ROIs "
            f"({int(he.sum())} HE from {len(np.unique(rois.groups[he]))} cases), {settings.train_steps} steps")
        last = [time.perf_counter()]

        def progress(step, total, loss):
            if time.perf_counter() - last[0] > 15 or step == total:
                last[0] = time.perf_counter()
                log(f"  step {step}/{total} loss {loss:.4f}")

        t0 = time.perf_counter()
        trained = train_generator(train_x, settings, seed=seed, labels=train_y, progress=progress)
        timings["train_seconds"] = time.perf_counter() - t0
        save_generator(cache_dir, key, trained)
    elif n_needed <= 0:
        log(f"no synthetic samples needed at ratio {settings.ratio} "
            f"({rois.n_he_cases} HE / {rois.n_nhe_cases} NHE cases): no generator trained")
    # At least realism_samples candidates, so that the realism gate's MMD^2 rests on enough synthetic
    # samples (with ~25 its 5-95 % spread for one generator was 0.05-0.11 against gates of 0.06-0.15).
    n_candidates = max(int(np.ceil(n_needed * settings.oversample)), settings.realism_samples) if n_needed else 0
    t0 = time.perf_counter()
    candidates = generate(trained, n_candidates, seed + 1, rois.masks[he]) if n_candidates and trained is not None \
        else np.zeros((0, *inputs.shape[1:]), np.float32)
    timings["sample_seconds"] = time.perf_counter() - t0
    timings["seconds_per_sample"] = timings["sample_seconds"] / n_candidates if n_candidates else None
    log(f"generated {n_candidates} candidates in {timings['sample_seconds']:.1f} s")
    cand_images, cand_masks = split_generated(candidates, settings, n_windows)
    real_he = rois.images[he]
    audit = memorization_audit(cand_images, real_he, rois.groups[he], settings.audit_percentile,
                               settings.audit_max_shift, include_flips=settings.hflip)
    accepted_index = np.flatnonzero(audit["accepted"])[:n_needed]
    images = cand_images[accepted_index]
    masks = cand_masks[accepted_index] if cand_masks is not None else None
    summary = dict(audit["summary"])
    report = {
        "center_counts": {"he_cases": rois.n_he_cases, "nhe_cases": rois.n_nhe_cases, "slices_per_case": k,
                          "he_rois_used": int(he.sum()), "skipped": rois.skipped},
        "ratio": settings.ratio,
        "memorization": summary,
        "training": trained.summary() if trained is not None else None,
        "timing": timings,
    }
    generated, generated_masks = images, masks  # what the generator made and the memorization audit let through
    passed_audit = cand_images[audit["accepted"]]
    if len(images) >= 2:
        # Judged on every candidate the audit let through (the kept ones are the first of them).
        report["feature_distance"] = fd = feature_distance(real_he, passed_audit, seed=0, holdout=holdout)
        if (rois.labels == 0).sum() >= 2:
            # A scale for the number: the site's own real NHE ROIs against its real HE ROIs (same
            # scanner, different class). A realistic generator should come no farther than this.
            fd["real_nhe_vs_real_he"] = feature_distance(real_he, rois.images[rois.labels == 0], seed=0)["real_vs_synthetic"]
        report["realism"] = realism = realism_verdict(fd)
        realism["gate"] = settings.realism_gate
        if settings.realism_gate and realism["passed"] is False:
            log(f"realism gate: synthetic MMD^2 {realism['mmd2_synthetic']:.3f} > {realism['mmd2_threshold']:.3f}; "
                "no synthetic ROI is kept")
            images = images[:0]
            masks = masks[:0] if masks is not None else None
    summary["kept"] = int(len(images))
    summary["needed"] = int(n_needed)
    summary["shortfall"] = int(max(0, n_needed - len(images)))
    groups = {"real_he": real_he, "synthetic_he": generated}
    if (rois.labels == 0).any():
        groups["real_nhe"] = rois.images[rois.labels == 0]
    report["intensity"] = {name: intensity_stats(arr, CHANNEL_NAMES) for name, arr in groups.items()}
    if generated_masks is not None and len(generated_masks):
        report["mask_fraction"] = {"real_he": float(rois.masks[he].mean()), "synthetic_he": float(generated_masks.mean())}
    report["parameters"] = count_parameters(trained.model) if trained is not None else None
    config = {"settings": settings.as_dict(), "seed": seed}
    intermediates = {"candidates": cand_images, "accepted": audit["accepted"], "nearest": audit["nearest"],
                     "real_he": real_he, "trained": trained, "generated": generated}
    return SynthesisResult(images, masks, report, config), intermediates


def run_synth(data_root: Path, center: str, out: Path, profile: str = "cpu", seed: int = 0, ratio: str | None = None,
              generator: str | None = None, train_steps: int | None = None, log: Callable[[str], None] = print,
              cache_dir: Path | None = None) -> dict:
    """The `hemex synth` run: train (or reuse from `cache_dir`), generate, audit, write the four
    outputs. Returns audit.json's content."""
    import torch

    from common.config import load_profile
    from common.synthesis.audit import save_sample_grid
    from common.synthesis.settings import synthesis_settings

    started = time.time()
    prof = load_profile(profile)
    settings = synthesis_settings(prof, ratio=ratio, generator=generator, train_steps=train_steps)
    windows = [tuple(w) for w in prof.get("preprocess", {}).get("windows", ())] or None
    if windows is None:
        from common.data.preprocess import DEFAULT_WINDOWS

        windows = DEFAULT_WINDOWS
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HemexError(f"{out}: exists and is not a folder")
    threads = torch.get_num_threads()
    log(f"loading ROIs of {center} from {data_root}")
    rois = load_center_rois(Path(data_root), center, settings, windows, include_nhe=True)
    log(f"{center}: {rois.n_he_cases} HE / {rois.n_nhe_cases} NHE cases; ratio {settings.ratio}")
    result, extra = synthesize(rois, settings, seed=seed, log=log, cache_dir=cache_dir)
    audit = result.audit
    audit["center"] = center
    audit["data_root"] = str(data_root)
    meta = {"format": NPZ_FORMAT, "center": center, "pixels": settings.pixels, "size_mm": settings.size_mm,
            "channels": list(CHANNEL_NAMES[: result.images.shape[1]] if len(result.images) else CHANNEL_NAMES),
            "windows": [list(w) for w in windows], "generator": settings.generator, "seed": seed,
            "ratio": settings.ratio, "count": int(len(result.images)), "has_masks": result.masks is not None}
    arrays = {"images": result.images.astype(np.float32)}
    if result.masks is not None:
        arrays["masks"] = result.masks.astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / "synthetic_he.npz", meta, **arrays)
    rejected = ~extra["accepted"]
    candidates = extra["candidates"]
    memo = audit["memorization"]
    gated = audit.get("realism", {}).get("passed") is False and settings.realism_gate
    save_sample_grid(out / "quality.png", extra["real_he"], extra["generated"], candidates[rejected],
                     extra["real_he"][extra["nearest"][rejected]] if rejected.any() else None,
                     title=f"{center}: {settings.generator} generator, {memo['accepted']}/{memo['synthetic']} accepted "
                           f"(threshold {memo['threshold']:.3f})" + ("; ALL DROPPED by the realism gate" if gated else "")
                           + "; brain window")
    write_json(out / "audit.json", audit)
    config = dict(result.config)
    config.update({"command": "synth", "data_root": str(Path(data_root).resolve()), "center": center,
                   "profile": prof.get("name"), "windows": [list(w) for w in windows],
                   "versions": versions(), "torch_threads": threads, "seconds": time.time() - started,
                   "outputs": ["synthetic_he.npz", "audit.json", "quality.png", "config.json"]})
    write_json(out / "config.json", config)
    return audit
