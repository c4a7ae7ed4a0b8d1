"""Synthetic multicentre NCCT cohorts written in the site data contract.

A cohort config (configs/cohorts/*.toml) lists centres with case counts, target prevalence, a
centre effect on the risk, and a scanner. Every case has its own random stream derived from
(seed, centre, case), so results do not depend on the number of worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from common.config import load_toml, resolve_config
from common.errors import ConfigError
from common.files import write_text
from common.phantoms.anatomy import render_anatomy, sample_subject
from common.phantoms.fields import rotation_matrix
from common.phantoms.lesion import render_hematoma
from common.phantoms.risk import (Phenotype, calibrate_intercept, draw_labels, followup_volume, risk_score,
                                  sample_phenotype)
from common.phantoms.scanner import SUB_SLICES, Scanner


@dataclass(frozen=True)
class CenterSpec:
    id: str
    n: int
    prevalence: float
    effect: float  # centre effect on the risk logit (case mix, treatment, follow-up timing)
    scanner: Scanner


@dataclass(frozen=True)
class CohortSpec:
    name: str
    description: str
    median_volume_ml: float
    log_volume_sd: float
    train_centers: tuple[str, ...]
    test_centers: tuple[str, ...]
    centers: tuple[CenterSpec, ...]


def load_cohort_spec(name_or_path: str) -> tuple[CohortSpec, dict]:
    """Parse a cohort TOML into a spec; also return the raw dict for the run record."""
    path = resolve_config(name_or_path, "cohorts")
    raw = load_toml(path)
    scanner_keys = {f.name for f in fields(Scanner)}
    try:
        centers = []
        for c in raw["centers"]:
            unknown = set(c) - scanner_keys - {"id", "n", "prevalence", "effect"}
            if unknown:
                raise ConfigError(f"{path}: centre {c.get('id')!r} has unknown key(s) {', '.join(sorted(unknown))}")
            scanner = Scanner(**{k: v for k, v in c.items() if k in scanner_keys})
            centers.append(CenterSpec(str(c["id"]), int(c["n"]), float(c["prevalence"]), float(c.get("effect", 0.0)),
                                      scanner))
        spec = CohortSpec(raw.get("name", path.stem), raw.get("description", ""),
                          float(raw.get("median_volume_ml", 12.0)), float(raw.get("log_volume_sd", 1.0)),
                          tuple(raw.get("train_centers", [])), tuple(raw.get("test_centers", [])), tuple(centers))
    except KeyError as err:
        raise ConfigError(f"{path}: missing key {err}") from err
    ids = [c.id for c in spec.centers]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: duplicate centre ids")
    for c in spec.centers:
        if c.n < 2 or not 0 < c.prevalence < 1:
            raise ConfigError(f"{path}: centre {c.id}: need n >= 2 and 0 < prevalence < 1")
    for role in ("train_centers", "test_centers"):
        missing = set(getattr(spec, role)) - set(ids)
        if missing:
            raise ConfigError(f"{path}: {role} names unknown centre(s) {', '.join(sorted(missing))}")
    return spec, raw


@dataclass
class CaseJob:
    center: str
    case_id: str
    phenotype: Phenotype
    scanner: Scanner
    seed: tuple[int, ...]
    image_dir: Path
    mask_dir: Path


def render_case(job: CaseJob) -> dict:
    """Render, acquire and store one case; return what truth.csv records about it."""
    rng = np.random.default_rng(np.random.SeedSequence(list(job.seed)))
    subject = sample_subject(rng)
    scanner = job.scanner
    # Head pose on the table: small rotations and offsets; the scan is centred near the head.
    pose = rotation_matrix(rng.normal(0, 5), rng.normal(0, 6), rng.normal(0, 3))
    head_centre = np.array([rng.normal(0, 4), rng.normal(0, 4), 0.0])
    scan_centre = np.array([0.0, 0.0, 12.0 + rng.normal(0, 3)])
    coords, origin = scanner.sampling_grid(scan_centre)
    local = np.einsum("ij,j...->i...", pose.T.astype(np.float32), coords - head_centre[:, None, None, None].astype(np.float32))
    x, y, z = local
    fine_spacing = (scanner.slice_mm / SUB_SLICES, scanner.inplane_mm, scanner.inplane_mm)
    extent = [s * n for s, n in zip(fine_spacing, x.shape)]
    anatomy = render_anatomy(subject, x, y, z, rng, extent)
    fine_voxel_ml = float(np.prod(fine_spacing)) / 1000.0
    level_fine, placement = render_hematoma(job.phenotype, anatomy, x, y, z, fine_voxel_ml, fine_spacing, rng)
    hu = scanner.acquire(anatomy.hu, rng)
    nz = hu.shape[0]
    # Averaging the level field over the slice thickness estimates it at the slice centre, so the
    # mask neither grows nor shrinks with slice thickness.
    mask = level_fine.reshape(nz, SUB_SLICES, *level_fine.shape[1:]).mean(axis=1) < 0
    scanner.store(hu, mask, origin, job.image_dir, job.mask_dir, job.case_id)
    voxel_ml = scanner.inplane_mm**2 * scanner.slice_mm / 1000.0
    measured_hu = hu[mask] if mask.any() else np.array([np.nan])  # as a reader would measure it
    return {
        "center": job.center, "case_id": job.case_id,
        "volume_ml": round(float(mask.sum() * voxel_ml), 3),
        "lesion_mean_hu": round(float(measured_hu.mean()), 2),
        "lesion_sd_hu": round(float(measured_hu.std()), 2),
        "ivh_ml": placement["ivh_ml"],
    }


def _single_threaded() -> None:
    # One process per core: stop torch's own thread pool from oversubscribing the machine.
    torch.set_num_threads(1)


def plan_center(spec: CohortSpec, center_index: int, seed: int) -> tuple[list[Phenotype], np.ndarray, np.ndarray]:
    """Phenotypes, true risks and labels of one centre (labels conditioned on its HE count)."""
    center = spec.centers[center_index]
    rng = np.random.default_rng(np.random.SeedSequence([seed, center_index, 0]))
    phenotypes = [sample_phenotype(rng, spec.median_volume_ml, spec.log_volume_sd) for _ in range(center.n)]
    scores = np.array([risk_score(p) for p in phenotypes]) + center.effect
    # The intercept targets the prevalence over the centre's case-mix population, not this sample.
    population = [sample_phenotype(rng, spec.median_volume_ml, spec.log_volume_sd) for _ in range(4000)]
    b0 = calibrate_intercept(np.array([risk_score(p) for p in population]) + center.effect, center.prevalence)
    risks = expit(b0 + scores)
    n_positive = int(round(center.prevalence * center.n))
    labels = draw_labels(rng, risks, n_positive)
    return phenotypes, risks, labels


def generate_cohort(cohort: str, out: Path, seed: int = 0, workers: int | None = None,
                    progress=None) -> dict:
    """Write a complete cohort to `out` (atomically: built beside it, then renamed)."""
    spec, raw = load_cohort_spec(cohort)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: output folder exists and is not empty; choose another --out or remove it")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.time()
    jobs, rows, truth = [], {}, {}
    for ci, center in enumerate(spec.centers):
        phenotypes, risks, labels = plan_center(spec, ci, seed)
        (staging / center.id / "images").mkdir(parents=True)
        (staging / center.id / "masks").mkdir(parents=True)
        follow_rng = np.random.default_rng(np.random.SeedSequence([seed, ci, 1]))
        for k, (p, risk, he) in enumerate(zip(phenotypes, risks, labels)):
            case_id = f"{center.id}-{k:04d}"
            jobs.append(CaseJob(center.id, case_id, p, center.scanner, (seed, ci, 2, k),
                                staging / center.id / "images", staging / center.id / "masks"))
            rows[case_id] = {"case_id": case_id, "he": int(he), "onset_to_ct_h": round(p.onset_to_ct_h, 2)}
            phenotype = {("target_volume_ml" if k2 == "volume_ml" else k2): (round(v, 4) if isinstance(v, float) else v)
                         for k2, v in p.as_dict().items()}  # volume_ml is reserved for the rendered mask's volume
            truth[case_id] = {"center": center.id, "case_id": case_id, "risk": round(float(risk), 5), "he": int(he),
                              **phenotype}
            truth[case_id]["followup_rng"] = follow_rng.integers(2**31)
    workers = workers or min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_threaded) as pool:
        for done, measured in enumerate(pool.map(render_case, jobs, chunksize=1), start=1):
            record = truth[measured["case_id"]]
            fu_rng = np.random.default_rng(record.pop("followup_rng"))
            followup = followup_volume(fu_rng, measured["volume_ml"], record["he"])
            rows[measured["case_id"]]["followup_volume_ml"] = round(followup, 2)
            record.update({k: v for k, v in measured.items() if k not in ("center", "case_id")})
            record["followup_volume_ml"] = round(followup, 2)
            if progress:
                progress(done, len(jobs))
    for center in spec.centers:
        center_rows = [r for cid, r in rows.items() if truth[cid]["center"] == center.id]
        write_csv(staging / center.id / "cases.csv", center_rows)
    write_csv(staging / "truth.csv", list(truth.values()))
    summary = summarize(spec, list(truth.values()))
    record = {"cohort": spec.name, "seed": seed, "config": raw, "summary": summary,
              "seconds": round(time.time() - start, 1)}
    (staging / "cohort.json").write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return record


def summarize(spec: CohortSpec, truth: list[dict]) -> dict:
    """Per-centre n, HE, prevalence, oracle AUC, volume and HU; plus the pooled oracle AUC."""
    out = {"centers": {}, "train_centers": list(spec.train_centers), "test_centers": list(spec.test_centers)}
    for center in spec.centers:
        t = [r for r in truth if r["center"] == center.id]
        he = np.array([r["he"] for r in t])
        risk = np.array([r["risk"] for r in t])
        out["centers"][center.id] = {
            "n": len(t), "n_he": int(he.sum()), "prevalence": round(float(he.mean()), 3),
            "oracle_auc": round(float(roc_auc_score(he, risk)), 3) if 0 < he.sum() < len(he) else None,
            "median_volume_ml": round(float(np.median([r["volume_ml"] for r in t])), 2),
            "median_lesion_hu": round(float(np.nanmedian([r["lesion_mean_hu"] for r in t])), 1),
            "storage": center.scanner.storage, "slice_mm": center.scanner.slice_mm,
            "inplane_mm": center.scanner.inplane_mm,
        }
    he = np.array([r["he"] for r in truth])
    out["oracle_auc_pooled"] = round(float(roc_auc_score(he, [r["risk"] for r in truth])), 3)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """CSV with the union of keys as header, written atomically."""
    header = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())

