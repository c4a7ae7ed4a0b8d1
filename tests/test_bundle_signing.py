"""The model bundle: every file `hemex predict` loads is in the manifest, the manifest is signed
with the coordinator's Ed25519 key from `hemex certs`, and a site that trusts that key refuses any
tampered file, manifest or signature."""

from __future__ import annotations

import base64
import json
import shutil
import stat

import pytest

from common.errors import ConfigError, DataError
from common.federation.certs import create_dev_pki
from common.inference.bundle import load_bundle, sha256_file, sign_manifest, write_manifest, write_untrained_bundle


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return create_dev_pki(tmp_path_factory.mktemp("pki") / "pki", nodes=["center1"])


@pytest.fixture(scope="module")
def signed_template(tmp_path_factory, pki):
    bundle = write_untrained_bundle(tmp_path_factory.mktemp("bundle") / "model", "smoke")
    sign_manifest(bundle, pki.bundle_key)
    return bundle


@pytest.fixture
def signed(signed_template, tmp_path):
    return shutil.copytree(signed_template, tmp_path / "model")


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def test_certs_make_the_coordinators_bundle_key(pki):
    assert stat.S_IMODE(pki.bundle_key.stat().st_mode) == 0o600
    assert pki.bundle_pub.read_text().startswith("ssh-ed25519 ") and pki.bundle_pub.read_text().endswith(" hemex-bundle\n")
    assert pki.bundle_key in pki.files() and pki.bundle_pub in pki.files()


def test_a_signed_bundle_loads_with_the_trusted_key(signed, pki):
    bundle = load_bundle(signed, trusted_key=pki.bundle_pub)
    assert bundle.threshold == 0.5
    signature = json.loads((signed / "manifest.sig").read_text(encoding="utf-8"))
    assert signature["algorithm"] == "ed25519" and len(signature["key_id"]) == 16
    assert "manifest.sig" not in bundle.manifest["files"]
    # Rewriting the manifest drops the signature that covered the old one.
    write_manifest(signed, {"profile": "smoke"})
    assert not (signed / "manifest.sig").exists()
    with pytest.raises(DataError, match=r"manifest.sig: missing: the bundle is unsigned"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    load_bundle(signed)  # without a trusted key: checksums only


@pytest.mark.parametrize("rel", ["segmentation/model.safetensors", "segmentation/model.json",
                                 "classifier/classifier.safetensors", "classifier/classifier.json"])
def test_every_tampered_file_is_refused(signed, pki, rel):
    flip_byte(signed / rel)
    with pytest.raises(DataError, match=f"{rel}: SHA-256 checksum mismatch"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    # Updating its checksum in the manifest breaks the signature.
    edit_manifest(signed, lambda m: m["files"].__setitem__(rel, sha256_file(signed / rel)))
    with pytest.raises(DataError, match="manifest.json: signature does not verify with the trusted key"):
        load_bundle(signed, trusted_key=pki.bundle_pub)


def test_swapped_classifier_weights_without_a_manifest_entry_are_refused(signed, pki):
    """The attack the issue names: drop the classifier weights' entry, swap the file."""
    weights = signed / "classifier" / "classifier.safetensors"
    flip_byte(weights)
    edit_manifest(signed, lambda m: m["files"].pop("classifier/classifier.safetensors"))
    with pytest.raises(DataError, match="signature does not verify"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    with pytest.raises(DataError, match=r"classifier/classifier.safetensors: loaded by hemex predict but not listed"):
        load_bundle(signed)  # even unsigned: a loaded file must be listed
    # A classifier record pointing at a file of its own choosing is refused the same way.
    record = signed / "classifier" / "classifier.json"
    shutil.copy(weights, signed / "classifier" / "other.safetensors")
    record.write_text(record.read_text(encoding="utf-8").replace('"classifier.safetensors"', '"other.safetensors"'))
    edit_manifest(signed, lambda m: m["files"].__setitem__("classifier/classifier.json", sha256_file(record)))
    with pytest.raises(DataError, match=r"classifier/other.safetensors: loaded by hemex predict but not listed"):
        load_bundle(signed)


def test_a_tampered_manifest_or_signature_is_refused(signed, pki, tmp_path):
    edit_manifest(signed, lambda m: m["preprocessing"].__setitem__("spacing", [1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="manifest.json: signature does not verify"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    sign_manifest(signed, pki.bundle_key)
    load_bundle(signed, trusted_key=pki.bundle_pub)  # the coordinator re-signed it
    signature = signed / "manifest.sig"
    record = json.loads(signature.read_text(encoding="utf-8"))
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[0] ^= 0x01
    signature.write_text(json.dumps({**record, "signature": base64.b64encode(raw).decode()}))
    with pytest.raises(DataError, match="signature does not verify"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    signature.write_text("not json")
    with pytest.raises(DataError, match=r"manifest.sig: unreadable bundle signature"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    # Signed by another coordinator's key: refused, naming both keys.
    other = create_dev_pki(tmp_path / "other")
    sign_manifest(signed, other.bundle_key)
    with pytest.raises(DataError, match=r"signature does not verify with the trusted key .*signed by '[0-9a-f]{16}'"):
        load_bundle(signed, trusted_key=pki.bundle_pub)
    # A key of the wrong kind is a one-line ConfigError naming the file.
    with pytest.raises(ConfigError, match=r"center1.pub: a trusted bundle key must be Ed25519"):
        load_bundle(signed, trusted_key=pki.node_keys["center1"][1])
    with pytest.raises(ConfigError, match=r"center1.key: bundle signing needs an Ed25519 key"):
        sign_manifest(signed, pki.node_keys["center1"][0])


def test_hemex_predict_refuses_a_bundle_its_trusted_key_did_not_sign(signed, pki, tmp_path, capsys, monkeypatch):
    from common.cli import main

    other = create_dev_pki(tmp_path / "other")
    args = ["predict", str(tmp_path / "nothing.nii.gz"), "--model", str(signed), "--out", str(tmp_path / "out")]
    assert main([*args, "--trusted-key", str(other.bundle_pub)]) != 0
    err = capsys.readouterr().err.strip()
    assert "manifest.json: signature does not verify" in err and "\n" not in err
    monkeypatch.setenv("HEMEX_TRUSTED_KEY", str(other.bundle_pub))  # a site's default
    assert main(args) != 0 and "signature does not verify" in capsys.readouterr().err


def test_a_bad_bundle_key_stops_the_run_before_any_site_is_contacted(tmp_path):
    from test_guard import CountingGrid, federated_run

    grid = CountingGrid(["h1", "h2", "h3", "h4"], train=lambda center: 0.01)
    with pytest.raises(ConfigError, match=r"missing.key: cannot read key file"):
        federated_run(tmp_path, grid, seg_rounds=1, bundle_key=str(tmp_path / "missing.key")).execute()
    assert grid.sent == []


def test_a_bundle_is_written_whole_or_not_at_all(signed, pki, tmp_path):
    """write_bundle stages the folder and moves it into place: a failure (here an unreadable
    signing key) leaves the previous bundle as it was and no staging folder behind."""
    from common.inference.bundle import write_bundle

    before = {p.relative_to(signed).as_posix(): sha256_file(p) for p in signed.rglob("*") if p.is_file()}
    bundle = load_bundle(signed)
    seg = (bundle.seg_model.state_dict(), bundle.seg_record["architecture"], {"seed": 1})
    cls = (bundle.classifier.state_dict(), {k: v for k, v in bundle.cls_record.items() if k not in ("format", "weights")})
    with pytest.raises(ConfigError):
        write_bundle(signed, seg, cls, {"profile": "smoke"}, signing_key=tmp_path / "no-such.key")
    after = {p.relative_to(signed).as_posix(): sha256_file(p) for p in signed.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in signed.parent.iterdir() if p.name.startswith(".")] == []
    # A successful write replaces the bundle: signed with the new key, loadable with it.
    write_bundle(signed, seg, cls, {"profile": "smoke", "seed": 1}, signing_key=pki.bundle_key)
    again = load_bundle(signed, trusted_key=pki.bundle_pub)
    assert again.manifest["provenance"]["seed"] == 1 and again.seg_record["seed"] == 1
    assert [p.name for p in signed.parent.iterdir() if p.name.startswith(".")] == []
