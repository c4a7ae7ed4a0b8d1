"""Development PKI for a Flower deployment: a CA, the SuperLink's TLS certificate, node keys.

Layout of the folder `create_dev_pki` writes (one step, atomically: a staging folder renamed
into place, so a failure leaves nothing half-written):

    ca.crt              CA certificate: every party holds it (SuperNodes verify the SuperLink
                        with it, `flwr` too, and the SuperLink's own ServerApp runtime)
    ca.key              CA private key (0600): only to sign more certificates; keep it offline
    server.crt          SuperLink TLS certificate, signed by the CA, SAN = hosts + localhost
    server.key          its private key (0600): coordinator only
    nodes/<id>.key      SuperNode authentication private key (0600), ECDSA SECP384R1, OpenSSH
                        format: only site <id> holds it
    nodes/<id>.pub      its OpenSSH public key: the coordinator registers it with
                        `flwr supernode register`
    bundle.key          the coordinator's Ed25519 key (0600, OpenSSH) that signs model bundles
    bundle.pub          its public key ('ssh-ed25519 ...'): sites trust it in `hemex predict`

Flower 1.42 requires the node keys to be NIST elliptic-curve keys in OpenSSH format (it reads
them with `load_ssh_private_key` / `load_ssh_public_key`). Real sites should generate their own
key pair and send only the .pub file; this command is for development and tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
CURVE = ec.SECP384R1
CA_DAYS = 5 * 365
SERVER_DAYS = 365


@dataclass
class DevPKI:
    """Paths of what `create_dev_pki` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]
    node_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # id -> (private, public)
    bundle_key: Path | None = None
    bundle_pub: Path | None = None

    def files(self) -> list[Path]:
        paths = [self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.bundle_key, self.bundle_pub]
        for private, public in self.node_keys.values():
            paths += [private, public]
        return paths


def parse_nodes(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Node ids from "a,b,c" (or a list); each must be a safe file name, no duplicates."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    nodes = tuple(n.strip() for n in items if n.strip())
    for node in nodes:
        if not NODE_ID.match(node):
            raise ConfigError(f"node id {node!r} must be letters, digits, '.', '_' or '-' (at most 64, "
                              "not starting with '.' or '-')")
    duplicates = sorted({n for n in nodes if nodes.count(n) > 1})
    if duplicates:
        raise ConfigError(f"node id(s) given twice: {', '.join(duplicates)}")
    return nodes


def parse_hosts(value: str | Sequence[str]) -> tuple[str, ...]:
    """Host names / IP addresses the server certificate is valid for; localhost and 127.0.0.1
    are always added (the SuperLink's own ServerApp runtime connects over loopback)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    hosts = [h.strip() for h in items if h.strip()]
    if not hosts:
        raise ConfigError("--host needs at least one host name or IP address")
    for host in hosts:
        if not _is_ip(host) and not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
            raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name")
        if _is_ip(host) and ipaddress.ip_address(host).is_unspecified:
            raise ConfigError(f"--host {host!r} is a bind address, not a name clients connect to; "
                              "give the coordinator's IP address or DNS name")
    out: list[str] = []
    for host in [*hosts, "localhost", "127.0.0.1"]:
        if host not in out:
            out.append(host)
    return tuple(out)


def create_dev_pki(out: Path, nodes: Sequence[str] = (), hosts: str | Sequence[str] = ("127.0.0.1",),
                   days: int = SERVER_DAYS) -> DevPKI:
    """Write a development CA, a SuperLink server certificate and node key pairs to `out`.

    `out` must not exist or be an empty folder; nothing is ever overwritten.
    """
    out = Path(out).expanduser().absolute()
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    nodes = parse_nodes(nodes)
    host_list = parse_hosts(hosts)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty folder; refusing to overwrite "
                          "certificates or keys (choose another --out or remove it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # mode 0700
    try:
        now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
        ca_key = ec.generate_private_key(CURVE())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hemex development"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "hemex development CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name).issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=max(days, CA_DAYS)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA384())
        )

        server_key = ec.generate_private_key(CURVE())
        san = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in host_list]
        server_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hemex development"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, host_list[0])]))
            .issuer_name(ca_name)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA384())
        )

        _write(staging / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(staging / "ca.key", _pem_private(ca_key), 0o600)
        _write(staging / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(staging / "server.key", _pem_private(server_key), 0o600)
        signing = ed25519.Ed25519PrivateKey.generate()
        _write(staging / "bundle.key", signing.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), 0o600)
        _write(staging / "bundle.pub", signing.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" hemex-bundle\n", 0o644)
        node_keys = {}
        if nodes:
            (staging / "nodes").mkdir(mode=0o700)
        for node in nodes:
            key = ec.generate_private_key(CURVE())
            private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption())
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            _write(staging / "nodes" / f"{node}.key", private, 0o600)
            _write(staging / "nodes" / f"{node}.pub", public + f" hemex-{node}\n".encode(), 0o644)
            node_keys[node] = (out / "nodes" / f"{node}.key", out / "nodes" / f"{node}.pub")
        _fsync_dir(staging)
        # rename(2) onto a missing or empty folder is atomic; a folder that gained files
        # meanwhile makes it fail instead of being overwritten.
        try:
            os.rename(staging, out)
        except OSError as err:
            raise ConfigError(f"{out} could not be created ({err.strerror}); nothing was written") from err
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DevPKI(root=out, ca_cert=out / "ca.crt", ca_key=out / "ca.key", server_cert=out / "server.crt",
                  server_key=out / "server.key", hosts=host_list, node_keys=node_keys, bundle_key=out / "bundle.key",
                  bundle_pub=out / "bundle.pub")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write through a temporary file created with its final mode (a private key is never
    readable by others, not even for an instant), then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # os.open's mode is filtered by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
