"""A portable model bundle: the federation's model folder plus a checksummed manifest.

    BUNDLE/segmentation/model.safetensors, model.json          (common.training.checkpoint)
    BUNDLE/classifier/classifier.safetensors, classifier.json  (common.training.classification)
    BUNDLE/manifest.json                                        (this module)

manifest.json = {"format": "hemex-bundle/1", "files": {relative path: sha256}, "preprocessing":
{spacing, windows, roi_size, sw_overlap, sw_batch_size[, slice_thickness_mm]}, "provenance": {...},
"model_version": ...}. The segmentation record does not hold the working spacing or the
inference window, so they live in the manifest (derived from the run profile when not given).
`load_bundle` verifies every listed checksum before any weight is read; a mismatch, a missing
file or an unknown format raises a one-line DataError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common.errors import DataError, HemexError

FORMAT = "hemex-bundle/1"
MANIFEST_NAME = "manifest.json"
SEG_DIR = "segmentation"
CLS_DIR = "classifier"
REQUIRED = (f"{SEG_DIR}/model.json", f"{SEG_DIR}/model.safetensors", f"{CLS_DIR}/classifier.json")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing_from_profile(profile: dict | str) -> dict:
    """The preprocessing record of a run profile (name, path or loaded dict)."""
    from common.config import load_profile
    from common.training.settings import SegmentationSettings

    if isinstance(profile, (str, Path)):
        profile = load_profile(str(profile))
    seg = SegmentationSettings.from_profile(profile)
    pre = profile["preprocess"]
    out = {"spacing": [float(v) for v in pre["spacing"]],
           "roi_size": [int(v) for v in seg.inference_roi], "sw_overlap": float(seg.sw_overlap),
           "sw_batch_size": int(seg.sw_batch_size), "satellite_mm": float(seg.satellite_mm)}
    if pre.get("windows"):
        out["windows"] = [[float(a), float(b)] for a, b in pre["windows"]]
    return out


def _bundle_files(bundle_dir: Path) -> list[str]:
    return sorted(p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST_NAME and not p.name.startswith("."))


def write_manifest(bundle_dir: Path, provenance: dict, preprocessing: dict | None = None) -> Path:
    """Checksum every file of `bundle_dir` and write BUNDLE/manifest.json atomically.

    `preprocessing` defaults to the profile named by provenance["profile"] (default "cpu");
    the HU windows default to the classifier record's "windows". Provenance is free-form
    (centres, rounds, case counts, versions); "version" there becomes the model version.
    """
    from common import __version__
    from common.training.checkpoint import write_json_atomic

    bundle_dir = Path(bundle_dir)
    for rel in REQUIRED:
        if not (bundle_dir / rel).is_file():
            raise DataError(bundle_dir / rel, "missing: not a hemex model bundle")
    pre = dict(preprocessing) if preprocessing is not None else preprocessing_from_profile(provenance.get("profile", "cpu"))
    if "windows" not in pre:
        record = json.loads((bundle_dir / CLS_DIR / "classifier.json").read_text(encoding="utf-8"))
        if record.get("windows"):
            pre["windows"] = record["windows"]
        else:
            from common.data.preprocess import DEFAULT_WINDOWS

            pre["windows"] = [list(w) for w in DEFAULT_WINDOWS]
    for key in ("spacing", "roi_size"):
        if key not in pre:
            raise DataError(bundle_dir, f"preprocessing lacks {key!r}")
    files = {rel: sha256_file(bundle_dir / rel) for rel in _bundle_files(bundle_dir)}
    combined = hashlib.sha256("".join(f"{k}={v};" for k, v in files.items()).encode()).hexdigest()
    version = str(provenance.get("version") or f"hemex-{__version__}+{combined[:12]}")
    from common.training.classification import versions

    manifest = {"format": FORMAT, "model_version": version, "created": datetime.now(timezone.utc).isoformat(),
                "files": files, "preprocessing": pre,
                "provenance": {"versions": versions(), **provenance}}
    path = bundle_dir / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


@dataclass
class Bundle:
    path: Path
    manifest: dict
    seg_model: object
    seg_record: dict
    classifier: object
    cls_settings: object
    calibration: object
    cls_record: dict
    preprocessing: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.manifest.get("model_version"))

    @property
    def threshold(self) -> float | None:
        value = self.cls_record.get("threshold")
        return None if value is None else float(value)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.preprocessing["spacing"])  # type: ignore[return-value]

    @property
    def windows(self) -> list[list[float]]:
        return [list(map(float, w)) for w in self.preprocessing["windows"]]


def read_manifest(path: Path) -> tuple[Path, dict]:
    """(bundle folder, manifest); `path` is the bundle or a federation run folder holding model/."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "model bundle not found")
    if path.is_file():
        raise DataError(path, "a model bundle is a folder (archives are not supported: unpack it first)")
    if not (path / MANIFEST_NAME).is_file() and (path / "model" / MANIFEST_NAME).is_file():
        path = path / "model"
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(manifest_path, "missing: not a hemex model bundle (write it with write_manifest)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(manifest_path, f"cannot read bundle manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(manifest_path, f"unknown bundle format {found!r}; expected {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("preprocessing"), dict):
        raise DataError(manifest_path, "bundle manifest lacks 'files' or 'preprocessing'")
    return path, manifest


def verify(path: Path, manifest: dict) -> None:
    """Every required file listed, every listed file present with its recorded SHA-256."""
    files = manifest["files"]
    for rel in REQUIRED:
        if rel not in files:
            raise DataError(path / rel, "not listed in the bundle manifest")
    for rel, expected in files.items():
        target = (path / rel).resolve()
        if path.resolve() not in target.parents:
            raise DataError(path / rel, "manifest entry points outside the bundle")
        if not target.is_file():
            raise DataError(path / rel, "missing from the model bundle")
        if sha256_file(target) != expected:
            raise DataError(path / rel, "SHA-256 checksum mismatch: the bundle file was modified or damaged")


def load_bundle(path: Path, device="cpu") -> Bundle:
    """Verify the manifest's checksums, then load both models. Raises DataError (one line)."""
    from common.training.checkpoint import load_checkpoint
    from common.training.classification import load_classifier

    path, manifest = read_manifest(path)
    verify(path, manifest)
    try:
        seg_model, seg_record = load_checkpoint(path / SEG_DIR, device=device)
        classifier, cls_settings, calibration, cls_record = load_classifier(path / CLS_DIR, device=device)
    except HemexError:
        raise
    except Exception as err:  # a record that does not fit its weights
        line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"cannot load the bundle's models: {line}") from err
    seg_model.eval()
    pre = dict(manifest["preprocessing"])
    pre.setdefault("windows", cls_record.get("windows"))
    return Bundle(path, manifest, seg_model, seg_record, classifier, cls_settings, calibration, cls_record, pre)


def write_untrained_bundle(bundle_dir: Path, profile: str = "smoke", seed: int = 0, threshold: float = 0.5,
                           provenance: dict | None = None, preprocessing: dict | None = None) -> Path:
    """A bundle of RANDOMLY INITIALISED models laid out exactly as server/run.py writes one
    (for tests and timing only: its predictions mean nothing)."""
    import torch

    from common.config import load_profile
    from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS
    from common.training.checkpoint import architecture, build_model, save_checkpoint
    from common.training.classification import ClassifierSettings, create_model, save_classifier
    from common.training.settings import SegmentationSettings

    bundle_dir = Path(bundle_dir)
    loaded = load_profile(profile)
    windows = loaded["preprocess"]["windows"]
    seg = SegmentationSettings.from_profile(loaded)
    cls = ClassifierSettings.from_profile(loaded)
    torch.manual_seed(seed)
    arch = architecture(seg.model, len(windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS, seg.model_overrides)
    save_checkpoint(bundle_dir / SEG_DIR, build_model(arch).state_dict(), arch,
                    {"seed": seed, "train_centers": [], "rounds": 0, "strategy": "untrained"})
    save_classifier(bundle_dir / CLS_DIR, create_model(cls, windows).state_dict(),
                    {"settings": cls.as_dict(), "windows": windows,
                     "calibration": {"method": "none", "a": 1.0, "b": 0.0, "n": 0}, "threshold": threshold,
                     "train_centers": [], "rounds": 0, "seed": seed})
    pre = preprocessing_from_profile(loaded)
    pre.update(preprocessing or {})
    write_manifest(bundle_dir, {"profile": profile, "centers": [], "rounds": {"seg": 0, "cls": 0},
                                "note": "untrained (random weights)", **(provenance or {})}, pre)
    return bundle_dir
