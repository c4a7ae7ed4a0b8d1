"""A portable model bundle: the federation's model folder plus a checksummed manifest.

    BUNDLE/segmentation/model.safetensors, model.json          (common.training.checkpoint)
    BUNDLE/classifier/classifier.safetensors, classifier.json  (common.training.classification.storage)
    BUNDLE/manifest.json                                        (this module)

`write_bundle` is the one writer of this layout (server/run.py and the untrained test bundle).

manifest.json = {"format": "hemex-bundle/1", "files": {relative path: sha256}, "preprocessing":
{spacing, windows, roi_size, sw_overlap, sw_batch_size[, slice_thickness_mm]}, "provenance": {...},
"model_version": ...}. The segmentation record does not hold the working spacing or the
inference window, so they live in the manifest (derived from the run profile when not given).
`load_bundle` verifies every listed checksum before any weight is read; a mismatch, a missing
file or an unknown format raises a one-line DataError naming the file. Every file it loads (both
records and the weights they name) must be listed. BUNDLE/manifest.sig is an Ed25519 signature of
manifest.json's exact bytes by the coordinator's bundle key (`hemex certs`: bundle.key); with a
trusted public key (bundle.pub) `load_bundle` refuses an unsigned bundle or a signature that
does not verify, so a changed manifest, and through its checksums any changed file, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from common.errors import ConfigError, DataError, HemexError

FORMAT = "hemex-bundle/1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
TRUSTED_KEY_ENV = "HEMEX_TRUSTED_KEY"  # a site's default trusted key for `hemex predict`
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
                  if p.is_file() and p.name not in (MANIFEST_NAME, SIGNATURE_NAME)
                  and not p.name.startswith("."))


def write_manifest(bundle_dir: Path, provenance: dict, preprocessing: dict | None = None) -> Path:
    """Checksum every file of `bundle_dir` and write BUNDLE/manifest.json atomically.

    `preprocessing` defaults to the profile named by provenance["profile"] (default "cpu");
    the HU windows default to the classifier record's "windows". Provenance is free-form
    (centres, rounds, case counts, versions); "version" there becomes the model version.
    """
    from common import __version__
    from common.files import versions, write_json

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
    manifest = {"format": FORMAT, "model_version": version, "created": datetime.now(timezone.utc).isoformat(),
                "files": files, "preprocessing": pre,
                "provenance": {"versions": versions(), **provenance}}
    path = bundle_dir / MANIFEST_NAME
    (bundle_dir / SIGNATURE_NAME).unlink(missing_ok=True)  # it signed another manifest
    write_json(path, manifest)
    return path


def _key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read key file ({err.strerror or err})") from err


def load_signing_key(path: Path):
    """The coordinator's Ed25519 bundle key (OpenSSH or PEM private key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    data = _key_file(path)
    try:
        key = load_ssh_private_key(data, None) if b"OPENSSH" in data else load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: not a readable unencrypted private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: bundle signing needs an Ed25519 key, got {type(key).__name__}")
    return key


def load_trusted_key(path: Path):
    """A public key a site trusts for bundles: OpenSSH ('ssh-ed25519 ...') or PEM, Ed25519."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

    data = _key_file(path).strip()
    try:
        key = load_pem_public_key(data) if data.startswith(b"-----") else load_ssh_public_key(data)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: not a readable public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: a trusted bundle key must be Ed25519, got {type(key).__name__}")
    return key


def key_id(public_key) -> str:
    """SHA-256 of the raw public key, shortened: names the key in manifest.sig."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def sign_manifest(bundle_dir: Path, key_path: Path) -> Path:
    """Sign BUNDLE/manifest.json's bytes with the coordinator's key into BUNDLE/manifest.sig."""
    from common.files import write_json

    key = load_signing_key(key_path)
    data = (Path(bundle_dir) / MANIFEST_NAME).read_bytes()
    path = Path(bundle_dir) / SIGNATURE_NAME
    write_json(path, {"algorithm": "ed25519", "key_id": key_id(key.public_key()),
                      "signature": base64.b64encode(key.sign(data)).decode("ascii")})
    return path


def verify_signature(path: Path, manifest: dict, trusted_key: Path) -> None:
    """The manifest's bytes, signed by the trusted key, and parsed as `manifest`; else DataError."""
    from cryptography.exceptions import InvalidSignature

    public = load_trusted_key(trusted_key)
    signature_path, manifest_path = path / SIGNATURE_NAME, path / MANIFEST_NAME
    if not signature_path.is_file():
        raise DataError(signature_path, f"missing: the bundle is unsigned, and {trusted_key} is the trusted key")
    try:
        record = json.loads(signature_path.read_text(encoding="utf-8"))
        signature = base64.b64decode(record["signature"], validate=True)
        data = manifest_path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(signature_path, f"unreadable bundle signature ({type(err).__name__})") from err
    try:
        public.verify(signature, data)
    except InvalidSignature:
        raise DataError(manifest_path, f"signature does not verify with the trusted key {trusted_key} (key "
                                       f"{key_id(public)}; signed by {record.get('key_id')!r}): the manifest was "
                                       "changed or signed by another key") from None
    if json.loads(data) != manifest:
        raise DataError(manifest_path, "changed while it was being verified")


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


PLAN_KEYS = ("spacing", "roi_size")  # working spacing (x, y, z) mm and inference window (z, y, x) voxels


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
    # The segmentation plan: every site and `hemex predict` must resample and window as training did.
    missing = [k for k in PLAN_KEYS if k not in manifest["preprocessing"]]
    if missing:
        raise DataError(manifest_path, f"bundle preprocessing lacks the segmentation plan's {', '.join(missing)}")
    return path, manifest


def verify(path: Path, manifest: dict) -> None:
    """Every required file listed, every listed file present with its recorded SHA-256, and the
    classifier weights its (verified) record names listed too: nothing unlisted is ever loaded."""
    files = manifest["files"]
    for rel in REQUIRED:
        if rel not in files:
            raise DataError(path / rel, "loaded by hemex predict but not listed in the bundle manifest")
    for rel, expected in files.items():
        target = (path / rel).resolve()
        if path.resolve() not in target.parents:
            raise DataError(path / rel, "manifest entry points outside the bundle")
        if not target.is_file():
            raise DataError(path / rel, "missing from the model bundle")
        if sha256_file(target) != expected:
            raise DataError(path / rel, "SHA-256 checksum mismatch: the bundle file was modified or damaged")
    record_path = path / CLS_DIR / "classifier.json"
    try:
        weights = json.loads(record_path.read_text(encoding="utf-8"))["weights"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(record_path, f"cannot read the classifier weights' name ({type(err).__name__})") from err
    rel = f"{CLS_DIR}/{weights}"
    if not isinstance(weights, str) or os.path.normpath(rel) != rel or rel not in files:
        raise DataError(path / CLS_DIR / str(weights), "loaded by hemex predict but not listed in the bundle manifest")


def trusted_key_path(explicit: str | Path | None) -> Path | None:
    """--trusted-key, else the site's HEMEX_TRUSTED_KEY, else None (checksums only)."""
    value = explicit or os.environ.get(TRUSTED_KEY_ENV, "")
    return Path(value) if value else None


def load_bundle(path: Path, device="cpu", trusted_key: Path | None = None) -> Bundle:
    """Verify the signature (with `trusted_key`) and every checksum, then load both models.
    Raises DataError (one line)."""
    from common.training.checkpoint import load_checkpoint
    from common.training.classification.storage import load_classifier

    path, manifest = read_manifest(path)
    if trusted_key is not None:
        verify_signature(path, manifest, Path(trusted_key))
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


def write_bundle(bundle_dir: Path, segmentation: tuple[dict, dict, dict], classifier: tuple[dict, dict],
                 provenance: dict, preprocessing: dict | None = None, signing_key: Path | None = None) -> Path:
    """The one writer of the bundle layout: the segmentation checkpoint (state, architecture,
    info), the classifier (state, record), the manifest and, with `signing_key`, its signature.
    Written into a hidden folder beside `bundle_dir` and moved into place whole, so a reader
    never sees a bundle whose files and manifest disagree; a previous bundle there is replaced."""
    import shutil
    import tempfile

    from common.training.checkpoint import save_checkpoint
    from common.training.classification.storage import save_classifier

    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=bundle_dir.parent, prefix=f".{bundle_dir.name}."))
    try:
        seg_state, arch, seg_info = segmentation
        save_checkpoint(staging / SEG_DIR, seg_state, arch, seg_info)
        save_classifier(staging / CLS_DIR, *classifier)
        write_manifest(staging, provenance, preprocessing)
        if signing_key is not None:
            sign_manifest(staging, Path(signing_key))
        old = None
        if bundle_dir.exists():
            old = Path(tempfile.mkdtemp(dir=bundle_dir.parent, prefix=f".{bundle_dir.name}.old."))
            os.replace(bundle_dir, old / bundle_dir.name)
        os.replace(staging, bundle_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return bundle_dir


def write_untrained_bundle(bundle_dir: Path, profile: str = "smoke", seed: int = 0, threshold: float = 0.5,
                           provenance: dict | None = None, preprocessing: dict | None = None) -> Path:
    """A bundle of RANDOMLY INITIALISED models laid out exactly as server/run.py writes one
    (for tests and timing only: its predictions mean nothing)."""
    import torch

    from common.config import load_profile
    from common.training.central import IN_CHANNELS_PER_WINDOW, OUT_CHANNELS
    from common.training.checkpoint import architecture, build_model
    from common.training.classification.settings import ClassifierSettings, create_model
    from common.training.settings import SegmentationSettings

    bundle_dir = Path(bundle_dir)
    loaded = load_profile(profile)
    windows = loaded["preprocess"]["windows"]
    seg = SegmentationSettings.from_profile(loaded)
    cls = ClassifierSettings.from_profile(loaded)
    torch.manual_seed(seed)
    arch = architecture(seg.model, len(windows) * IN_CHANNELS_PER_WINDOW, OUT_CHANNELS, seg.model_overrides)
    pre = preprocessing_from_profile(loaded)
    pre.update(preprocessing or {})
    return write_bundle(
        bundle_dir, (build_model(arch).state_dict(), arch, {"seed": seed, "train_centers": [], "rounds": 0,
                                                           "strategy": "untrained"}),
        (create_model(cls, windows).state_dict(),
         {"settings": cls.as_dict(), "windows": windows, "calibration": {"method": "none", "a": 1.0, "b": 0.0, "n": 0},
          "threshold": threshold, "train_centers": [], "rounds": 0, "seed": seed}),
        {"profile": profile, "centers": [], "rounds": {"seg": 0, "cls": 0}, "note": "untrained (random weights)",
         **(provenance or {})}, pre)
