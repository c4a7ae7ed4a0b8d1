"""`hemex predict`: hematoma mask, volume and HE risk for new NCCT scans (NIfTI or DICOM series).

Per case, in OUT_DIR:
    mask.nii.gz   hematoma mask (uint8) on the ORIGINAL image grid (size, spacing, origin and
                  direction of the input), written atomically
    result.json   volume_ml, probability, band, threshold, classifier_slices, model_version, warnings, timing
    report.png    up to 4 axial slices through the hematoma (brain window, mask outlined), and the
                  classifier's ROI slices with its Grad-CAM map (where it looked)

Pipeline: read -> canonical orientation (LPS) -> working spacing of the bundle -> sliding-window
segmentation -> mask mapped onto the scan's own pixels (interpolated probability) -> boundary redrawn
there from the scan's densities (`postprocess.refine_boundary`) -> stored on the original grid -> volume
in mL counted on that grid -> classifier ROIs centred on the predicted mask (classifier's own grid) ->
patient-level logit -> the bundle's calibration -> probability -> risk band.

Risk bands around the bundle's operating threshold t (fixed on the training centres'
validation cases by the federation; 0.5 when the bundle has none):
    low           p <  t - 0.10
    intermediate  t - 0.10 <= p < t + 0.10   (too close to the operating point to call)
    high          p >= t + 0.10
The 0.10 margin (BAND_MARGIN) is a fixed probability distance, not a fitted quantity.

Refused (a one-line error for the case): values that are not Hounsfield units (raw stored values,
a missing rescale, a windowed export), as `hemex check` defines them.

Warnings: a body cross-section larger than a head, or a scan too short to hold a hematoma
(`common/data/plausibility.py`); "no hematoma found" (empty predicted mask: probability and band are null); "slice
thickness X mm outside the training range" when the bundle's preprocessing records
slice_thickness_mm = [min, max] (bundles without it are not checked); a missing threshold; a
DICOM series rebuilt on a regular grid (gantry tilt, missing or uneven slices: the mask is then
on that grid, and the DICOM SEG frames are sampled back onto the acquired slices).
Batch mode writes OUT/<case>/... per case and OUT/summary.json.

For a DICOM series input the mask is also written as a DICOM SEG object, mask.seg.dcm
(common/inference/dicom_seg.py), referencing the source series and its instances.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from common.data.contract import IMAGE_SUFFIXES
from common.data.dicom_study import count_studies
from common.data.io import metaimage_data_files, read_ct, write_image
from common.data.plausibility import anatomy_problems, coverage_problems, hu_problems
from common.data.preprocess import DEFAULT_WINDOWS, Geometry, Sample, resample_sample, to_canonical, to_original_grid
from common.errors import DataError, HemexError
from common.inference.bundle import Bundle
from common.files import write_json

BAND_MARGIN = 0.10
DEFAULT_THRESHOLD = 0.5
NO_HEMATOMA = "no hematoma found"


def volume_ml(mask: sitk.Image) -> float:
    """Volume of the nonzero voxels in mL, counted on the mask's own grid."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return count * float(np.prod(mask.GetSpacing())) / 1000.0


def risk_band(probability: float | None, threshold: float, margin: float = BAND_MARGIN) -> str | None:
    if probability is None:
        return None
    if probability < threshold - margin:
        return "low"
    if probability < threshold + margin:
        return "intermediate"
    return "high"


def case_name(path: Path) -> str:
    path = Path(path)
    for suffix in IMAGE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def load_input(path: Path, case_id: str, notes: list[str] | None = None) -> tuple[sitk.Image, Sample]:
    """(original image, native-spacing sample in canonical orientation; the working grids made
    from it carry the bundle's HU windows). What reading corrected is appended to `notes`."""
    image = read_ct(path, notes)
    original = Geometry.of(image)
    canonical = to_canonical(image)
    hu = sitk.GetArrayFromImage(canonical).astype(np.float32)
    sample = Sample(case_id, "predict", DEFAULT_WINDOWS, hu, None, tuple(canonical.GetSpacing()), original,
                    Geometry.of(canonical))
    return image, sample


def scanned_region(original: Geometry, working: Geometry) -> np.ndarray:
    """(z, y, x) uint8 on `working`: 1 where the scan has voxels. An oblique or tilted scan's
    axis-aligned working grid pads its corners with air; a hematoma cannot lie there, and a mask
    voxel there would have no place on the original grid."""
    ones = np.ones(original.size[::-1], dtype=np.uint8)
    return sitk.GetArrayFromImage(to_original_grid(ones, original, working))


def _thickness_warning(image: sitk.Image, bundle: Bundle) -> str | None:
    """A warning when the scan's slice spacing (head-foot axis) lies outside the bundle's
    preprocessing["slice_thickness_mm"] = [min, max]; bundles without that range get no check."""
    thickness = float(sitk.DICOMOrient(image, "LPS").GetSpacing()[2])  # the axis closest to patient z
    bounds = bundle.preprocessing.get("slice_thickness_mm")
    if bounds:
        low, high = float(bounds[0]), float(bounds[1])
        if not low - 1e-3 <= thickness <= high + 1e-3:
            return f"slice thickness {thickness:.2f} mm outside the training range {low:g}-{high:g} mm"
    return None


def predict_case(bundle: Bundle, input_path: Path, out_dir: Path) -> dict:
    """Predict one case (NIfTI file or DICOM series folder); writes mask.nii.gz, result.json and
    report.png into `out_dir` and returns the result record."""
    import torch

    from common.data.roi import extract_rois
    from common.metrics.markers import marker_features, marker_vector
    from common.inference.saliency import gradcam_maps
    from common.networks.vit import marker_inputs
    from common.training.classification.prediction import case_logits
    from common.training.classification.rois import roi_array, slice_markers
    from common.inference.segmentation import mask_on_grid, segment
    from common.inference.postprocess import implausible_mask, refine_boundary

    input_path, out_dir = Path(input_path), Path(out_dir)
    timing, warnings = {}, []
    started = time.perf_counter()
    image, native = load_input(input_path, case_name(input_path), warnings)
    refused = hu_problems(native.hu)
    if refused:  # raw stored values or a wrong rescale: any probability would be meaningless
        raise DataError(input_path, "not a head NCCT in Hounsfield units: " + "; ".join(refused))
    warnings += anatomy_problems(image) + coverage_problems(image)
    try:
        working = resample_sample(native, bundle.spacing, bundle.windows)
    except ValueError as err:  # the working grid's size limit (preprocess.axis_aligned_grid)
        raise DataError(input_path, str(err)) from err
    timing["load_s"] = time.perf_counter() - started

    t = time.perf_counter()
    pre = bundle.preprocessing
    mask, probabilities = segment(bundle.seg_model, working.image, tuple(pre["roi_size"]), spacing=working.spacing,
                                  satellite_mm=float(pre.get("satellite_mm", 0.0)), hu=working.hu,
                                  overlap=float(pre.get("sw_overlap", 0.25)),
                                  sw_batch_size=int(pre.get("sw_batch_size", 4)), name=str(input_path))
    mask &= scanned_region(native.original, working.working)
    # The boundary is redrawn on the scan's own pixels (canonical orientation), then the mask is
    # stored on the input's grid: the volume is counted where a clinician would measure it.
    mask_native = sitk.GetArrayFromImage(mask_on_grid(mask, probabilities, working.working, native.working))
    mask_native = refine_boundary(mask_native, native.hu, native.spacing)
    mask_original = to_original_grid(mask_native, native.working, native.original, is_mask=True)
    volume = volume_ml(mask_original)
    implausible = implausible_mask(mask_native, native.hu, native.spacing)
    if implausible:
        warnings.append(implausible)
    timing["segment_s"] = time.perf_counter() - t

    t = time.perf_counter()
    threshold = bundle.threshold
    if threshold is None:
        threshold = DEFAULT_THRESHOLD
        warnings.append(f"bundle has no operating threshold; using {DEFAULT_THRESHOLD}")
    probability, markers, attention = None, None, []
    if not mask_native.any():
        warnings.append(NO_HEMATOMA)
    else:
        settings = bundle.cls_settings
        cls_sample, cls_mask = native, mask_native
        if settings.spacing is not None:
            cls_sample = resample_sample(native, settings.spacing, bundle.windows)
            cls_mask = sitk.GetArrayFromImage(to_original_grid(mask_native, native.working, cls_sample.working))
        if cls_mask.any():
            rois = extract_rois(cls_sample, cls_mask, k=settings.k_slices, size_mm=settings.size_mm,
                                pixels=settings.pixels, windows=bundle.windows)
            # The NCCT markers of the predicted hematoma: reported, and the input of a fusion classifier.
            markers = marker_features(cls_sample.hu, cls_mask, cls_sample.spacing, settings.hypodense_hu)
            rois.features = marker_vector(markers)
            with torch.no_grad():
                logit = case_logits(bundle.classifier, [rois], settings)[0]
            probability = float(bundle.calibration(logit))
            # Where the classifier looked, on each distinct ROI slice (ROIs repeat slices of a thin hematoma).
            first = [i for i, z in enumerate(rois.slices) if z not in rois.slices[:i]]
            rows = slice_markers([rois], marker_inputs(bundle.classifier))
            try:
                maps = gradcam_maps(bundle.classifier, roi_array(rois, settings.mask_channel)[first],
                                    None if rows is None else rows[first])
                attention = [(int(rois.slices[i]), rois.images[i, 0], rois.masks[i], heat) for i, heat in zip(first, maps)]
            except ValueError as err:  # a classifier that is not a ViT (a timm model by name)
                warnings.append(f"no attention map: {err}")
        else:
            warnings.append(NO_HEMATOMA)
    timing["classify_s"] = time.perf_counter() - t

    t = time.perf_counter()
    thickness = _thickness_warning(image, bundle)
    if thickness:
        warnings.append(thickness)
    if volume == 0 and NO_HEMATOMA not in warnings:
        warnings.append(NO_HEMATOMA)
    result = {"case": case_name(input_path), "input": str(input_path), "volume_ml": round(volume, 3),
              "probability": None if probability is None else round(probability, 4),
              "markers": None if markers is None else {k: round(float(v), 4) if math.isfinite(v) else None
                                                       for k, v in markers.items()},
              "band": risk_band(probability, threshold), "threshold": threshold,
              # Axial slices (canonical order, as report.png numbers them) whose ROIs the classifier scored.
              "classifier_slices": sorted({z for z, *_ in attention}) if attention else None,
              "band_margin": BAND_MARGIN, "model_version": bundle.version, "warnings": warnings,
              "input_geometry": {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()),
                                 "origin": list(image.GetOrigin()), "direction": list(image.GetDirection())},
              "outputs": {"mask": "mask.nii.gz", "report": "report.png"}}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_image(mask_original, out_dir / "mask.nii.gz")
    if Path(input_path).is_dir():  # a DICOM series: the mask also as DICOM SEG for PACS viewers
        from common.inference.dicom_seg import write_dicom_seg

        write_dicom_seg(input_path, mask_original, out_dir / "mask.seg.dcm", bundle.version)
        result["outputs"]["dicom_seg"] = "mask.seg.dcm"
    write_report(native.hu, mask_native, native.spacing, out_dir / "report.png",
                 title=f"{result['case']}: hematoma {volume:.1f} mL, HE probability "
                       + ("n/a" if probability is None else f"{probability:.2f} ({result['band']})"),
                 attention=attention)
    timing["write_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - started
    result["timing"] = {k: round(v, 3) for k, v in timing.items()}
    write_json(out_dir / "result.json", result)
    return result


def report_slices(mask: np.ndarray, n: int = 4) -> list[int]:
    """Up to n axial slices spread over the hematoma (or over the volume when there is none)."""
    area = mask.reshape(mask.shape[0], -1).sum(axis=1)
    candidates = np.flatnonzero(area) if area.any() else np.arange(mask.shape[0])
    if len(candidates) <= n:
        return [int(z) for z in candidates]
    picks = np.linspace(0, len(candidates) - 1, n).round().astype(int)
    return sorted({int(candidates[i]) for i in picks})


def write_report(hu: np.ndarray, mask: np.ndarray, spacing, path: Path, title: str,
                 attention: list | None = None) -> Path:
    """Axial slices (canonical grid: anterior up, patient right on the left) in a brain window
    (level 40, width 80 HU) with the mask outlined in red; with `attention` ((slice, ROI brain
    window, ROI mask, map) per classifier slice), a second row: each ROI with the classifier's
    Grad-CAM map over it (`common.inference.saliency`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = report_slices(mask)
    attention = attention or []
    columns = max(len(slices), len(attention), 1)
    fig, axes = plt.subplots(1 + bool(attention), columns, figsize=(3.2 * columns, 3.6 * (1 + bool(attention))),
                             squeeze=False)
    aspect = float(spacing[1]) / float(spacing[0])
    for ax, z in zip(axes[0], slices):
        ax.imshow(hu[z], cmap="gray", vmin=0, vmax=80, aspect=aspect, interpolation="nearest")
        if mask[z].any():
            ax.contour(mask[z].astype(float), levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"slice {z}", fontsize=8)
    for ax, (z, roi, roi_mask, heat) in zip(axes[-1] if attention else [], attention):
        ax.imshow(roi, cmap="gray", vmin=0, vmax=1, interpolation="nearest")  # the ROI's brain window
        ax.imshow(heat, cmap="jet", alpha=0.35, vmin=0, vmax=1, interpolation="bilinear")
        if roi_mask.any():
            ax.contour(roi_mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        ax.set_title(f"slice {z}: where the classifier looked", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=90)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _is_dicom_series(folder: Path) -> bool:
    """A folder of plain files (no NIfTI, no subfolders) is read as one DICOM series."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(children) and not any(p.is_dir() or p.name.endswith(IMAGE_SUFFIXES) for p in children)


def _is_one_study(folder: Path) -> bool:
    """A folder without image files whose subfolders hold the DICOM series of one examination (a
    PACS or CD export: STUDY/SERIES-1, SERIES-2, ...) is one case, not a folder of cases. A single
    subfolder is a case either way (and keeps its own name)."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if any(p.is_file() and p.name.endswith(IMAGE_SUFFIXES) for p in children):
        return False
    return sum(p.is_dir() for p in children) >= 2 and count_studies(folder) == 1


def find_cases(input_path: Path) -> list[Path]:
    input_path = Path(input_path)
    if not input_path.exists():
        raise DataError(input_path, "input not found")
    if input_path.is_file() or _is_dicom_series(input_path) or _is_one_study(input_path):
        return [input_path]
    cases = sorted(p for p in input_path.iterdir() if not p.name.startswith(".")
                   and (p.is_dir() or p.name.endswith(IMAGE_SUFFIXES)))
    if not cases:
        raise DataError(input_path, f"no image files ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders found")
    return cases


def skipped_entries(input_path: Path, cases: list[Path]) -> dict[str, str]:
    """Files in a batch folder that are not cases, with why: a site should see what was not read."""
    input_path = Path(input_path)
    if not input_path.is_dir() or cases == [input_path]:
        return {}
    entries = [p for p in input_path.iterdir() if not p.name.startswith(".")]
    data_files = metaimage_data_files(entries)
    return {p.name: f"not an image file hemex reads ({', '.join(IMAGE_SUFFIXES)}); a DICOM series goes in a "
                    "folder of its own" for p in sorted(entries)
            if p not in cases and p.is_file() and p.name not in data_files}


def predict_inputs(bundle: Bundle, input_path: Path, out: Path, log=None) -> dict:
    """Batch prediction: INPUT is a NIfTI file, a DICOM series folder, or a folder of such cases.
    Each case goes to OUT/<case name>/; OUT/summary.json lists every case with its result or its
    one-line error (a broken case does not stop the others), and every file it did not read."""
    out = Path(out)
    cases = find_cases(input_path)
    summary = {"model_version": bundle.version, "input": str(input_path), "cases": {}, "failed": 0}
    skipped = skipped_entries(input_path, cases)
    if skipped:
        summary["skipped"] = skipped
        if log:
            for name, why in skipped.items():
                log(f"skipped {name}: {why}")
    for case in cases:
        name = case_name(case)
        try:
            result = predict_case(bundle, case, out / name)
            summary["cases"][name] = {"status": "ok", "volume_ml": result["volume_ml"],
                                      "probability": result["probability"], "band": result["band"],
                                      "warnings": result["warnings"]}
        except Exception as err:  # noqa: BLE001 - one broken case must not stop the batch
            if isinstance(err, HemexError):
                line = str(err)
            else:
                lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
                line = f"{case}: {type(err).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
            summary["cases"][name] = {"status": "error", "error": line}
            summary["failed"] += 1
        if log:
            entry = summary["cases"][name]
            log(f"{name}: " + (entry["error"] if entry["status"] == "error" else
                               f"{entry['volume_ml']:.1f} mL, probability "
                               f"{'n/a' if entry['probability'] is None else format(entry['probability'], '.2f')}"
                               + (f" ({'; '.join(entry['warnings'])})" if entry["warnings"] else "")))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary)
    return summary
