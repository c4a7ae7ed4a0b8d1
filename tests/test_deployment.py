"""Deployment: `hemex certs` (fast) and a real Flower 1.42 deployment on loopback (slow).

The slow tests start, through the scripts in server/deploy and client/deploy, a SuperLink with
TLS and SuperNode authentication, register three node keys with `flwr supernode register`,
start three SuperNodes (TLS, node keys, centre id and data path in their node-config), run a
one-round federation with `flwr run` over TLS, and check that a SuperNode whose key was never
registered is refused. Every process they start runs in its own process group and is stopped in
the fixture's teardown, failures included; detached Flower runtime processes are found by their
parent chain or by the test's unique ports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import ConfigError
from common.federation.certs import create_dev_pki

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the hemex environment: flwr, flower-superlink, flower-supernode
SUPERLINK_SCRIPT = REPO / "server" / "deploy" / "start-superlink.sh"
SUPERNODE_SCRIPT = REPO / "client" / "deploy" / "start-supernode.sh"
CONNECTION = "hemex-tls"
CENTERS = ("center1", "center2", "center3")
TRAIN, HELD_OUT = ("center1", "center2"), "center3"

# Three small centres (3, 3 and 2 cases at 64 px): enough for a round on 2 CPU cores.
COHORT = """
name = "deploy3"
median_volume_ml = 13.0
log_volume_sd = 1.2
train_centers = ["center1", "center2"]
test_centers = ["center3"]
[[centers]]
id = "center1"
n = 3
prevalence = 0.34
matrix = 64
inplane_mm = 3.0
slice_mm = 5.0
storage = "nii.gz"
orientation = "RAS"
[[centers]]
id = "center2"
n = 3
prevalence = 0.34
matrix = 64
inplane_mm = 3.0
slice_mm = 5.0
storage = "nii.gz"
orientation = "LPS"
[[centers]]
id = "center3"
n = 2
prevalence = 0.5
matrix = 64
inplane_mm = 3.0
slice_mm = 5.0
storage = "nii"
"""


# ------------------------------------------------------------------------------------------
# hemex certs (fast)


@pytest.fixture
def pki(tmp_path):
    return create_dev_pki(tmp_path / "pki", nodes="center1,center2", hosts="127.0.0.1,coordinator.example.org")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_server_certificate_is_signed_by_the_ca_and_names_the_hosts(pki):
    ca, server = load_cert(pki.ca_cert), load_cert(pki.server_cert)
    ca.verify_directly_issued_by(ca)  # self-signed root
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost", "coordinator.example.org"])
def test_tls_handshake_verifies_the_server_against_the_ca(pki, hostname):
    """What SuperNodes and `flwr` do: verify the chain and the host name (or IP) in the SAN."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    left, right = socket.socketpair()
    errors = []

    def serve():
        try:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                tls.sendall(b"ok")
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with client_ctx.wrap_socket(left, server_hostname=hostname) as tls:
        assert tls.recv(2) == b"ok"
    thread.join(10)
    assert not errors
    with pytest.raises(ssl.SSLCertVerificationError):  # a name not in the SAN is rejected
        left, right = socket.socketpair()
        threading.Thread(target=lambda: _quiet_handshake(server_ctx, right), daemon=True).start()
        client_ctx.wrap_socket(left, server_hostname="elsewhere.example.org")


def _quiet_handshake(ctx, sock):
    try:
        ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError):
        pass


def test_node_keys_are_secp384r1_in_openssh_format_and_flower_accepts_them(pki):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    assert set(pki.node_keys) == {"center1", "center2"}
    for node, (private_path, public_path) in pki.node_keys.items():
        private_bytes = private_path.read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public_text = public_path.read_text(encoding="utf-8")
        assert public_text.startswith("ecdsa-sha2-nistp384 ") and public_text.rstrip().endswith(f"hemex-{node}")
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        # The loaders `flwr supernode register` and `flower-supernode` use.
        assert try_load_public_key(public_path)
        keys = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(private_path), auth_supernode_public_key=None))
        assert keys[1].public_numbers() == public.public_numbers()
    first, second = (p.read_bytes() for p, _ in pki.node_keys.values())
    assert first != second


def test_private_keys_are_owner_only(pki):
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for path in [pki.ca_key, pki.server_key, *(private for private, _ in pki.node_keys.values())]:
        assert mode(path) == 0o600, path
    for path in [pki.ca_cert, pki.server_cert, *(public for _, public in pki.node_keys.values())]:
        assert mode(path) == 0o644, path
    assert mode(pki.root) == 0o700
    assert not [p for p in pki.root.parent.iterdir() if p.name.endswith(".tmp")]  # no staging leftovers
    assert not [p for p in pki.root.rglob(".*")]


def test_certs_refuses_to_overwrite_a_non_empty_folder(pki, tmp_path, capsys):
    from common.cli import main

    before = {p: p.read_bytes() for p in pki.files()}
    with pytest.raises(ConfigError, match="already exists and is not an empty folder; refusing to overwrite"):
        create_dev_pki(pki.root, nodes="center3")
    assert main(["certs", "--out", str(pki.root), "--nodes", "center1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hemex certs: error: ") and "refusing to overwrite" in err and "\n" not in err
    assert {p: p.read_bytes() for p in pki.files()} == before
    assert not (pki.root / "nodes" / "center3.key").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert create_dev_pki(empty).server_cert.is_file()  # an empty folder is fine


@pytest.mark.parametrize("nodes, hosts, message", [
    ("center1,../evil", "127.0.0.1", "node id '../evil' must be"),
    ("a,b,a", "127.0.0.1", "node id\\(s\\) given twice: a"),
    ("a", "0.0.0.0", "bind address"),
    ("a", "bad host", "neither an IP address nor a DNS name"),
])
def test_certs_rejects_bad_names(tmp_path, nodes, hosts, message):
    with pytest.raises(ConfigError, match=message):
        create_dev_pki(tmp_path / "pki", nodes=nodes, hosts=hosts)
    assert not (tmp_path / "pki").exists()


def test_certs_command_prints_the_files_and_next_steps(tmp_path, capsys):
    from common.cli import main

    assert main(["certs", "--out", str(tmp_path / "pki"), "--nodes", "center1"]) == 0
    out = capsys.readouterr().out
    assert "ca.crt" in out and "server.key" in out and "center1.pub" in out
    assert "flwr supernode register" in out and "start-superlink.sh" in out and "start-supernode.sh" in out


# ------------------------------------------------------------------------------------------
# A real deployment on loopback (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict:
    env = os.environ.copy()
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1",
               # Three ClientApps share 2 cores: one thread each avoids oversubscription.
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _proc_table() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every live (non-zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            table[int(entry.name)] = (int(fields[1]), (entry / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(roots: set[int], table: dict | None = None) -> set[int]:
    """The live processes among `roots` and every live descendant (e.g. a SuperNode and the
    ClientApp processes it started)."""
    table = _proc_table() if table is None else table
    found = set(roots) & set(table)
    grew = True
    while grew:
        children = {p for p, (ppid, _) in table.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


class Processes:
    """Processes this test module started, each in its own session; `stop_all` ends them and
    everything they spawned, including Flower's detached runtime processes."""

    def __init__(self):
        self.started: list[tuple[str, subprocess.Popen, Path]] = []
        self.markers: set[bytes] = set()  # strings only our processes have on their command line

    def start(self, name: str, command: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.started.append((name, process, log))
        return process

    def ours(self) -> set[int]:
        table = _proc_table()
        roots = {p.pid for _, p, _ in self.started}
        roots |= {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in self.markers)}
        # Descendants, detached sessions included (found through the parent chain).
        return process_tree(roots, table) - {os.getpid()}

    def stop_all(self, grace_s: float = 15.0) -> list[int]:
        """Stop every process; return the pids still alive afterwards (should be none)."""
        targets = self.ours()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for _, process, _ in self.started:
                if process.poll() is None:
                    _signal_group(process.pid, sig)
            for pid in targets:
                _signal_pid(pid, sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                for _, process, _ in self.started:
                    process.poll()  # reap our direct children
                alive = targets & set(_proc_table())
                targets = alive | self.ours()
                if not targets:
                    break
                time.sleep(0.2)
            if not targets:
                break
        for _, process, _ in self.started:
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return sorted(self.ours())


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if pytest itself is killed (no teardown then)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, kept across exec


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def flwr(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def flwr_json(args: list[str], env: dict, cwd: Path, timeout: float = 120) -> dict:
    result = flwr([*args, "--format", "json"], env, cwd, timeout)
    start = result.stdout.find("{")  # the JSON document follows any "Using SuperLink" line
    assert result.returncode == 0 and start >= 0, f"flwr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout[start:])


def wait_for(condition, timeout: float, what: str, processes: list[tuple[str, subprocess.Popen, Path]] = (),
             interval: float = 0.5):
    """Wait until condition() is truthy; fail early, with the log, if a watched process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for name, process, log in processes:
            if process.poll() is not None:
                pytest.fail(f"{name} exited with code {process.returncode} while waiting for {what}:\n"
                            f"{tail(log)}")
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" +
                "".join(f"\n--- {name}:\n{tail(log)}" for name, _, log in processes))


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def https_health(port: int, ca: Path) -> bool:
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=context, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A SuperLink (TLS + SuperNode auth) and three authenticated SuperNodes on loopback."""
    from common.phantoms.cohort import generate_cohort

    for tool in ("flwr", "flower-superlink", "flower-supernode", "hemex"):
        assert (BIN / tool).is_file(), f"{BIN / tool} missing: install hemex into this environment"
    root = tmp_path_factory.mktemp("deploy")
    timings: dict[str, float] = {}
    started = time.monotonic()
    processes = Processes()
    try:
        # Development PKI through the real command; "rogue" gets a key that is never registered,
        # "pinned" one registered by the app-trust test.
        certs = root / "pki"
        result = subprocess.run([str(BIN / "hemex"), "certs", "--out", str(certs), "--host", "127.0.0.1",
                                 "--nodes", ",".join([*CENTERS, "rogue", "pinned"])], capture_output=True, text=True, encoding="utf-8", errors="replace",
                                timeout=120)
        assert result.returncode == 0, result.stderr
        spec = root / "cohort.toml"
        spec.write_text(COHORT, encoding="utf-8")
        data = root / "data"
        generate_cohort(str(spec), data, seed=0)
        timings["certs+cohort"] = time.monotonic() - started

        # Coordinator: the SuperLink. Its state is kept in memory here: with the SQLite file a
        # deployment uses, Flower 1.42 answers 500 "database is locked" once a write waits more
        # than 5 s (SQLite busy_timeout), which a CPU-starved CI machine can reach, and a failed
        # ServerApp heartbeat then fails the whole run (seen here under load average ~15).
        port = free_port()
        processes.markers.add(f"127.0.0.1:{port}".encode())
        superlink_log = root / "superlink.log"
        superlink = processes.start(
            "superlink", ["bash", str(SUPERLINK_SCRIPT), "--certs", str(certs), "--host", "127.0.0.1",
                          "--port", str(port), "--state", str(root / "superlink-state"),
                          "--database", ":flwr-in-memory:", "--log-file", str(root / "superlink-file.log")],
            flower_env(root / "flwr-home"), superlink_log, root)
        watched = [("superlink", superlink, superlink_log)]
        wait_for(lambda: https_health(port, certs / "ca.crt"), 120, "the SuperLink's HTTPS health check", watched)
        timings["superlink"] = time.monotonic() - started

        # The coordinator's flwr CLI: a connection with the CA as root certificate (TLS).
        cli_home = root / "flwr-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n', encoding="utf-8")
        cli_env = flower_env(cli_home)
        node_ids = {}
        for center in CENTERS:
            registered = flwr_json(["supernode", "register", str(certs / "nodes" / f"{center}.pub"), CONNECTION],
                                   cli_env, root)
            assert registered["success"]
            node_ids[center] = int(registered["node-id"])
        timings["register"] = time.monotonic() - started

        # Sites: one SuperNode per centre, each with its own key, data path, runtime port and home.
        nodes = {}
        for center in CENTERS:
            node_port = free_port()
            processes.markers.add(f"127.0.0.1:{node_port}".encode())
            log = root / f"supernode-{center}.log"
            process = processes.start(
                f"supernode {center}",
                ["bash", str(SUPERNODE_SCRIPT), "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                 "--key", str(certs / "nodes" / f"{center}.key"), "--center", center,
                 "--data-path", str(data / center), "--port", str(node_port),
                 "--state", str(root / f"supernode-{center}")],
                flower_env(root / "flwr-home"), log, root)
            nodes[center] = (process, log)
            watched.append((f"supernode {center}", process, log))
        for center, (_, log) in nodes.items():
            wait_for(lambda log=log: "SuperNode ID:" in log.read_text(errors="replace"), 180,
                     f"SuperNode {center} to connect", watched)
            assert f"SuperNode ID: {node_ids[center]}" in log.read_text(encoding="utf-8"), f"{center} got another node id"
        timings["supernodes"] = time.monotonic() - started
        yield {"root": root, "certs": certs, "data": data, "port": port, "cli_env": cli_env,
               "node_ids": node_ids, "nodes": nodes, "superlink": superlink, "superlink_log": superlink_log,
               "processes": processes, "watched": watched, "timings": timings, "started": started}
    finally:
        leftover = processes.stop_all()
        timings["total"] = time.monotonic() - started
        print("\ndeployment timings (s since start): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
        assert not leftover, f"processes left running after teardown: {leftover}"


def run_federation(deployment, run_config: dict, during=None, app: Path = REPO) -> tuple[dict, float]:
    """Submit one segmentation round of `app` with `flwr run` over TLS (run_config on top of the defaults
    below), call `during()` every second while it runs, and return federation.json and the run's
    wall time once the run has completed (a failed run fails the test with the ServerApp's log)."""
    root, env = deployment["root"], deployment["cli_env"]
    run_config = {"centers": ",".join(CENTERS), "test-centers": HELD_OUT, "profile": "smoke", "seg-rounds": 1,
                  "cls-rounds": 0, "node-wait-s": 120.0, "min-aggregate-cases": 1, **run_config}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    submitted = time.monotonic()
    started = flwr_json(["run", str(app), CONNECTION, "--run-config", overrides], env, root, timeout=300)
    assert started["success"], started
    run_id = started["run-id"]

    # `flwr run --stream` can end early when the SuperLink is busy (a log query times out on
    # its database), so poll: the report file, and the run's status now and then.
    report_path = Path(run_config["out-dir"]) / "federation.json"
    last_check = [0.0]

    def finished():
        if during is not None:
            during()
        since = time.monotonic() - last_check[0]
        if since < 3 or (since < 45 and not report_path.is_file()):
            return None
        last_check[0] = time.monotonic()
        runs = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env, root)["runs"]
        return runs[0]["status"] if runs and runs[0]["status"].startswith("finished") else None

    # Measured 6.5-8 min on a 2-core machine under load average ~10 (other jobs); each of the
    # 10 ClientApp messages starts a fresh Python process that imports torch and MONAI.
    status = wait_for(finished, 900, f"run {run_id} to finish", deployment["watched"], interval=1.0)
    seconds = time.monotonic() - submitted
    if status != "finished:completed":
        server_log = flwr(["log", str(run_id), CONNECTION, "--show"], env, root).stdout
        pytest.fail(f"run {run_id} ended {status}:\n{server_log[-4000:]}")
    return json.loads(report_path.read_text(encoding="utf-8")), seconds


@pytest.mark.slow
def test_federation_over_tls_with_authenticated_supernodes(deployment):
    root, env, port = deployment["root"], deployment["cli_env"], deployment["port"]
    # TLS only: the port does not speak plain HTTP.
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
    listed = flwr_json(["supernode", "ls", CONNECTION], env, root)
    status = {int(n["node-id"]): n["status"] for n in listed["nodes"]}
    assert status == {node: "online" for node in deployment["node_ids"].values()}

    out = root / "run-out"
    # One segmentation round; no classifier stage (cls-rounds=0) to keep it short. Two-case sites:
    # min-aggregate-cases 1, or every Dice would be withheld.
    report, _ = run_federation(deployment, {"out-dir": str(out), "round-timeout-s": 300.0})
    deployment["timings"]["run"] = time.monotonic() - deployment["started"]

    assert {c: v["role"] for c, v in report["centers"].items()} == {
        "center1": "train", "center2": "train", "center3": "test"}
    final = report["stages"]["seg"]["final"]
    assert set(final) == set(CENTERS)
    for center in CENTERS:
        assert "error" not in final[center], final[center]
        assert 0.0 <= final[center]["dice"] <= 1.0
    assert final[HELD_OUT]["num-examples"] == 2  # every case of the held-out centre
    rounds = report["stages"]["seg"]["rounds"]
    assert [r["round"] for r in rounds] == [1]
    for kind in ("train", "evaluate"):
        assert set(rounds[0][kind]["sent_bytes"]) == set(TRAIN)
        assert set(rounds[0][kind]["reply_bytes"]) == set(TRAIN) and rounds[0][kind]["errors"] == {}
    assert (out / "model" / "segmentation" / "model.safetensors").is_file()
    # On the wire: the held-out site never received a train message; the training sites did.
    for center, (_, log) in deployment["nodes"].items():
        text = log.read_text(errors="replace")
        assert ("Receiving: train.seg" in text) == (center in TRAIN), center
        assert "Receiving: evaluate.seg" in text


def start_extra_supernode(deployment, name: str, extra: list[str] = ()) -> tuple[subprocess.Popen, Path]:
    """A SuperNode beyond the fixture's three, with key `name` (from `hemex certs`) and center1's
    data, through the deploy script; `extra` is appended to its arguments. Returns it and its log."""
    root, certs = deployment["root"], deployment["certs"]
    node_port = free_port()
    deployment["processes"].markers.add(f"127.0.0.1:{node_port}".encode())
    log = root / f"supernode-{name}.log"
    process = deployment["processes"].start(
        f"{name} supernode",
        ["bash", str(SUPERNODE_SCRIPT), "--superlink", f"127.0.0.1:{deployment['port']}", "--ca",
         str(certs / "ca.crt"), "--key", str(certs / "nodes" / f"{name}.key"), "--center", name, "--data-path",
         str(deployment["data"] / "center1"), "--port", str(node_port), "--state", str(root / f"supernode-{name}"),
         *extra],
        flower_env(root / "flwr-home"), log, root)
    return process, log


@pytest.mark.slow
def test_unregistered_supernode_is_refused(deployment):
    root, certs = deployment["root"], deployment["certs"]
    rogue, log = start_extra_supernode(deployment, "rogue")
    try:
        code = rogue.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was neither refused nor stopped within 180 s:\n{tail(log)}")
    output = log.read_text(errors="replace")
    assert code == 1  # flwr_exit's status for an error; Flower's own code is in the message
    assert "Failed to activate SuperNode" in output and "Exit Code: 305" in output, output
    assert "SuperNode ID:" not in output
    # The SuperLink refused exactly this key: it logs the rejected public key.
    rogue_key = serialization.load_ssh_public_key((certs / "nodes" / "rogue.pub").read_bytes())
    pem = rogue_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    superlink_log = deployment["superlink_log"].read_text(errors="replace")
    refusal = f"Attempted to register SuperNode with public key: {pem!r}, exception: No SuperNode found"
    assert refusal in superlink_log
    # The federation still holds exactly the three registered SuperNodes.
    listed = flwr_json(["supernode", "ls", CONNECTION], deployment["cli_env"], root)
    assert sorted(int(n["node-id"]) for n in listed["nodes"]) == sorted(deployment["node_ids"].values())


def start_pinned_supernode(deployment) -> tuple[int, Path]:
    """A fourth site, registered, whose SuperNode runs only app bundles signed by a key it trusts
    (Flower's --trusted-entities, given through the deploy script): the coordinator's Ed25519 key
    from `hemex certs`. Returns its node id and log."""
    root, certs = deployment["root"], deployment["certs"]
    registered = flwr_json(["supernode", "register", str(certs / "nodes" / "pinned.pub"), CONNECTION],
                           deployment["cli_env"], root)
    assert registered["success"]
    trusted = root / "trusted-entities.yaml"
    trusted.write_text(f'hemex-coordinator: "{(certs / "bundle.pub").read_text(encoding="utf-8").strip()}"\n',
                       encoding="utf-8")
    process, log = start_extra_supernode(deployment, "pinned", ["--", "--trusted-entities", str(trusted)])
    deployment["watched"].append(("pinned supernode", process, log))
    wait_for(lambda: "SuperNode ID:" in log.read_text(errors="replace"), 180, "the pinned SuperNode to connect",
             deployment["watched"])
    return int(registered["node-id"]), log


@pytest.mark.slow
def test_a_poisoning_site_is_rejected_by_centre_and_the_global_model_stays_finite(deployment, tmp_path):
    """Fault injection on real processes: the coordinator submits a copy of the app whose site code
    makes center2 reply NaN weights (a poisoning or broken site; no test hook exists in hemex
    itself). The ServerApp (unchanged) must reject that reply by centre with its reason, aggregate
    center1 alone, and save and evaluate a finite model.

    Meanwhile a site that trusts only signed app bundles refuses this one (self-submitted bundles
    carry no signature in open-source Flower 1.42) before any of its code runs; the coordinator
    names that node in federation.json and goes on. The pinned site stays for the later runs."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    pinned_id, pinned_log = start_pinned_supernode(deployment)

    app = tmp_path / "poisoned-app"
    for part in ("client", "common", "configs", "server"):
        shutil.copytree(REPO / part, app / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", app / "pyproject.toml")
    handler = app / "client" / "segmentation.py"
    code = handler.read_text(encoding="utf-8")
    honest = "    state = model.state_dict()\n"
    assert code.count(honest) == 1
    handler.write_text(code.replace(honest, honest + (
        "    if site.center == 'center2':\n"
        "        state = {k: v.float().fill_(float('nan')) if v.is_floating_point() else v for k, v in state.items()}\n")),
        encoding="utf-8")

    out = deployment["root"] / "run-poisoned"
    report, _ = run_federation(deployment, {"out-dir": str(out), "round-timeout-s": 600.0, "min-valid-replies": 1},
                               app=app)
    train = report["stages"]["seg"]["rounds"][0]["train"]
    assert set(train["reply_bytes"]) == {"center1", "center2"}  # both answered ...
    assert set(train["rejected"]) == {"center2"}  # ... and the NaN reply was refused, by centre, with why
    assert "hold NaN or infinite values" in train["rejected"]["center2"]
    weights = load_file(str(out / "model" / "segmentation" / "model.safetensors"))
    assert weights and all(np.isfinite(w).all() for w in weights.values() if w.dtype.kind == "f")
    final = report["stages"]["seg"]["final"]
    for center in ("center1", HELD_OUT):
        assert "error" not in final[center] and 0.0 <= final[center]["dice"] <= 1.0
    # The pinned site refused the bundle: no ClientApp ran there, and the coordinator names the node.
    assert report["refused_nodes"] == {str(pinned_id): "The FAB could not be verified."}
    pinned = pinned_log.read_text(errors="replace")
    assert "The FAB could not be verified" in pinned and "Receiving: train" not in pinned, pinned[-3000:]


@pytest.mark.slow
def test_a_site_whose_every_scan_is_corrupt_fails_by_class_and_digest_and_the_run_goes_on(deployment):
    """Fault injection on real processes: every image of center2 is overwritten with random bytes
    after the SuperNode started. Its training reply is an error naming only the error class, the
    hemex source line and a digest (no path, no case id), the run goes on with center1 (quorum 1),
    and the files are put back afterwards."""
    images = sorted((deployment["data"] / "center2" / "images").iterdir())
    originals = {path: path.read_bytes() for path in images}
    out = deployment["root"] / "run-corrupt"
    try:
        for path in images:
            path.write_bytes(os.urandom(4096))
        report, _ = run_federation(deployment, {"out-dir": str(out), "round-timeout-s": 600.0,
                                                "min-valid-replies": 1})
    finally:
        for path, content in originals.items():
            path.write_bytes(content)
    train = report["stages"]["seg"]["rounds"][0]["train"]
    assert set(train["reply_bytes"]) == {"center1"}
    why = train["errors"]["center2"]
    assert "site error in train.seg" in why and "digest" in why, why
    text = json.dumps(report)
    assert "center2-000" not in text and str(deployment["data"]) not in text  # no case id, no path
    assert (out / "model" / "segmentation" / "model.safetensors").is_file()
    final = report["stages"]["seg"]["final"]
    assert "error" not in final["center1"] and 0.0 <= final[HELD_OUT]["dice"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])  # SIGKILL last: center2 is gone afterwards
def test_a_hung_or_killed_site_is_dropped_and_the_run_completes_on_the_others(deployment, fault):
    """Fault injection on real processes: once center2's training message has arrived, its SuperNode
    and ClientApp are stopped (SIGSTOP: connected but silent, a hung site) or killed (SIGKILL: a
    crashed machine). The run must drop center2 at the straggler deadline or when the SuperLink
    reports it unavailable (not wait for round-timeout-s), go on with center1 and end with a model."""
    root = deployment["root"]
    process, log = deployment["nodes"]["center2"]
    already = log.read_text(errors="replace").count("Receiving: train.seg")
    hit: set[int] = set()

    def strike_center2_when_it_trains():
        if not hit and log.read_text(errors="replace").count("Receiving: train.seg") > already:
            for _ in range(2):  # a second pass catches a ClientApp started between the two
                for pid in process_tree({process.pid}) - hit:
                    _signal_pid(pid, getattr(signal, fault))
                    hit.add(pid)

    if fault == "SIGKILL":  # the fixture's liveness watch must not fail the run for this death
        deployment["watched"][:] = [w for w in deployment["watched"] if w[0] != "supernode center2"]
    out = root / f"run-{fault.lower()}"
    timeout_s = 1800.0
    try:
        report, seconds = run_federation(
            deployment, {"out-dir": str(out), "round-timeout-s": timeout_s, "straggler-factor": 1.5,
                         "straggler-grace-s": 10.0, "min-valid-replies": 1}, during=strike_center2_when_it_trains)
    finally:
        for pid in hit:
            _signal_pid(pid, signal.SIGCONT)
    # Resumed (SIGCONT), center2 finishes the work it was stopped in (the reply is ignored: that run
    # has ended) before it answers the next run's first message, which gives it node-wait-s for that.
    assert hit, "center2 never received its training message"
    train = report["stages"]["seg"]["rounds"][0]["train"]
    assert set(train["reply_bytes"]) == {"center1"}
    # Dropped by hemex's straggler deadline (1.5 x the other site's time + 10 s) or, if its missed
    # heartbeats (2 x 30 s) come first, answered for it by the SuperLink as unavailable: either way
    # filed under the centre, in a small share of the hard limit.
    why = train["errors"]["center2"]
    assert "dropped for this round" in why or "Node Unavailable" in why, why
    assert train["wall_s"] < timeout_s / 4
    assert seconds < timeout_s
    assert (out / "model" / "segmentation" / "model.safetensors").is_file()
    final = report["stages"]["seg"]["final"]
    assert "error" not in final["center1"] and 0.0 <= final["center1"]["dice"] <= 1.0
    assert "error" not in final[HELD_OUT]
    print(f"\n{fault} at center2: run {seconds:.0f} s, training call {train['wall_s']:.0f} s; center2: {why}")


# ------------------------------------------------------------------------------------------
# The app bundle and the SuperNode's state (fast)


def test_supernode_state_defaults_to_a_per_user_folder_outside_the_app(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "flower-supernode"
    fake.write_text('#!/usr/bin/env bash\necho "FLWR_HOME=$FLWR_HOME"\n', encoding="utf-8")
    fake.chmod(0o755)
    for name in ("ca.crt", "c1.key"):
        (tmp_path / name).write_text("x", encoding="utf-8")
    (tmp_path / "c1.key").chmod(0o600)
    (tmp_path / "data" / "c1").mkdir(parents=True)
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XDG_STATE_HOME", None)
    args = ["bash", str(SUPERNODE_SCRIPT), "--superlink", "127.0.0.1:8000", "--ca", str(tmp_path / "ca.crt"),
            "--key", str(tmp_path / "c1.key"), "--center", "c1", "--data-path", str(tmp_path / "data" / "c1")]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    home = tmp_path / "home" / ".local" / "state" / "hemex" / "supernode-c1" / "flwr-home"
    assert done.stdout.strip() == f"FLWR_HOME={home}"
    assert not (REPO / "supernode-c1").exists()  # started from the app folder, nothing lands in it
    done = subprocess.run(args, cwd=tmp_path, env={**env, "XDG_STATE_HOME": str(tmp_path / "state")},
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == f"FLWR_HOME={tmp_path / 'state' / 'hemex' / 'supernode-c1' / 'flwr-home'}"


def test_the_app_bundle_holds_only_the_apps_and_never_supernode_state(tmp_path):
    import tomli
    from flwr.cli.build import get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    from simulation.run import check_app_bundle, stage_app

    files = collect_files(REPO)
    # SuperNode state left in the app folder by an older script (installed bundles, JSON, Python).
    files.update({"supernode-center1/flwr-home/apps/x/server/run.py": b"", "supernode-center1/config.json": b"{}"})
    config = tomli.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    paths = get_filtered_fab_paths(filter_paths_for_publish(files), config)
    assert {p.split("/")[0] for p in paths} == {"client", "common", "configs", "server"}
    assert "server/run.py" in paths and "configs/profiles/smoke.toml" in paths
    # A local federation submits a staged copy of the app: the very files Flower would bundle.
    staged = stage_app(REPO, tmp_path / "app")
    assert sorted(get_filtered_fab_paths(filter_paths_for_publish(collect_files(staged)), config)) == sorted(paths)
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == sorted(
        [*paths, "pyproject.toml"])
    assert check_app_bundle(staged) < 2 * 2**20  # ~0.6 MiB, far below Flower's 10 MiB


def test_an_oversized_app_bundle_is_a_one_line_error_naming_the_biggest_entries(tmp_path):
    from common.errors import HemexError
    from simulation.run import check_app_bundle

    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "app"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "x"\n\n'
        '[tool.flwr.app.components]\nserverapp = "app:server"\nclientapp = "app:client"\n\n'
        '[tool.flwr.app.config]\nseed = 0\n', encoding="utf-8")
    (tmp_path / "app.py").write_text("x = 1\n", encoding="utf-8")
    state = tmp_path / "supernode-center1" / "flwr-home"
    state.mkdir(parents=True)
    (state / "bundle.json").write_text(os.urandom(6 * 2**20).hex(), encoding="utf-8")  # 12 MiB, ~6 zipped
    (tmp_path / "notes.md").write_text(os.urandom(3 * 2**20).hex(), encoding="utf-8")
    with pytest.raises(HemexError) as err:
        check_app_bundle(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path}: the app bundle is over Flower's 10 MiB limit; biggest entries: "
                              "supernode-center1/ 12.0 MiB, notes.md 6.0 MiB, app.py 0.0 MiB")
