"""Run a whole federation on this machine through Flower's simulation engine.

One virtual SuperNode per centre (partition-id i -> centres[i]), a private SuperLink on free
loopback ports with its state in the run folder (FLWR_HOME), no runtime dependency
installation, and the SuperLink stopped afterwards even on failure, so nothing is left running
and no other Flower deployment on the machine is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common.errors import HemexError
from common.federation.settings import FederationSettings
from server.checkpoint import ServerCheckpoints, training_settings

APP_DIR = Path(__file__).resolve().parent.parent  # the Flower app: this repository (pyproject.toml)
BIN_DIR = Path(sys.executable).parent  # Flower's executables live beside this interpreter
CONNECTION = "hemex-local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_flower_config(flwr_home: Path, port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")


def flower_env(flwr_home: Path) -> dict:
    env = os.environ.copy()
    # The SuperLink starts the simulation runtime by name: it must find this environment's.
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_HOME=str(flwr_home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_DISABLE_UPDATE_CHECK="1", RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
               # Flower and Ray print non-ASCII; sites may run under a C or ASCII locale.
               PYTHONIOENCODING="utf-8")
    return env


def start_superlink(flwr_home: Path, http_port: int, log_file: Path):
    # Flower 1.42 serves the Control, Fleet and runtime APIs on this one HTTP port.
    command = [str(BIN_DIR / "flower-superlink"), "--insecure", "--simulation",
               "--isolation", "subprocess", "--disable-runtime-dependency-installation",
               "--host", "127.0.0.1", "--port", str(http_port),
               "--database", str(flwr_home / "state.db"), "--log-file", str(log_file)]
    process = subprocess.Popen(command, env=flower_env(flwr_home), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise HemexError(f"flower-superlink exited with code {process.returncode}; see {log_file}")
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1.0).is_success:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise HemexError(f"flower-superlink did not become ready within 60 s; see {log_file}")
    except BaseException:  # not ready, or Ctrl-C / SIGTERM while waiting: leave nothing running
        stop(process)
        raise


def stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it started (simulation runtime, Ray workers)."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def runtime_pids(port: int) -> list[int]:
    """Processes of the simulation runtime bound to our SuperLink (found by its address)."""
    needle = f"127.0.0.1:{port}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                # The SuperLink's long-lived executor also names the address: it is not the runtime.
                if needle in cmdline and b"flower-superexec" not in cmdline and b"flower-superlink" not in cmdline:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def reap_runtime(port: int, grace_s: float = 30.0) -> None:
    """The simulation runtime exits on its own once the SuperLink is gone; make sure of it."""
    deadline = time.monotonic() + grace_s
    while runtime_pids(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in runtime_pids(port):
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def check_app_bundle(app_dir: Path = APP_DIR) -> int:
    """Bytes of the app bundle (FAB) `flwr run` would build from `app_dir`, built by Flower's own
    code; a one-line HemexError naming the biggest entries when it is over Flower's limit."""
    import tomli
    from flwr.cli.build import build_fab_from_disk, get_filtered_fab_paths
    from flwr.cli.utils import collect_files, filter_paths_for_publish
    from flwr.common.constant import FAB_MAX_SIZE

    try:
        return len(build_fab_from_disk(app_dir))
    except ValueError as err:
        if "exceeds maximum" not in str(err):
            raise HemexError(f"{app_dir / 'pyproject.toml'}: cannot build the app bundle: "
                             f"{str(err).splitlines()[0]}") from None
    files = filter_paths_for_publish(collect_files(app_dir.resolve()))
    config = tomli.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    sizes: dict[str, int] = {}
    for path in get_filtered_fab_paths(files, config):
        top = path.split("/")[0] + ("/" if "/" in path else "")
        sizes[top] = sizes.get(top, 0) + (app_dir / path).stat().st_size
    biggest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
    raise HemexError(f"{app_dir}: the app bundle is over Flower's {FAB_MAX_SIZE / 2**20:.0f} MiB limit; biggest "
                     f"entries: {', '.join(f'{name} {size / 2**20:.1f} MiB' for name, size in biggest)} (move "
                     "them out of the app folder or add them to fab-exclude in pyproject.toml)")


def stage_app(app_dir: Path, into: Path) -> Path:
    """Copy the app bundle's files (pyproject.toml and its fab-include patterns) into `into` and
    return it. `flwr run` walks every file under the folder it is given before filtering, the
    environment and run folders included (3-4 s each here, twice per federation): it is given this
    copy, which also keeps whatever lies beside the code out of the bundle."""
    import tomli

    config = tomli.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["flwr"]["app"]["fab-include"]
    into.mkdir(parents=True, exist_ok=True)
    for relative in ["pyproject.toml", *sorted({str(path.relative_to(app_dir)) for pattern in patterns
                                                  for path in app_dir.glob(pattern) if path.is_file()})]:
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app_dir / relative, target)
    return into


def ray_cpus(num_cpus: int, n_train_sites: int) -> int:
    """CPUs Ray is told it has (one per virtual site), so that every training site of a round runs at once.

    Each site trains on one torch thread. Told the truth (2 CPUs), Ray runs 3 training sites as
    2 + 1: the third site trains alone while a core idles, in every round of every stage. Told one
    CPU per training site, it runs them together and the OS shares the cores among them (a round
    takes 1.5 site-times instead of 2 on 2 cores). At most twice the real count.
    """
    return int(min(max(num_cpus, n_train_sites), 2 * num_cpus))


def run_local_federation(settings: FederationSettings, num_cpus: int = 2, timeout_s: float = 3600,
                         log=print) -> dict:
    """Run the hemex ServerApp/ClientApp over one virtual node per centre; return the report."""
    out = Path(settings.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    app = stage_app(APP_DIR, Path(tempfile.mkdtemp(prefix=".app-", dir=out)))
    try:
        return _run_staged(app, settings, out, num_cpus, timeout_s, log)
    finally:
        shutil.rmtree(app, ignore_errors=True)


def _run_staged(app: Path, settings: FederationSettings, out: Path, num_cpus: int, timeout_s: float, log) -> dict:
    check_app_bundle(app)  # before anything starts, not after the SuperLink refuses it
    if settings.resume:  # checkpoints of other settings: one line now, not after the SuperLink starts
        ServerCheckpoints(out / "checkpoints", training_settings(settings)).verify()
    flwr_home = out / "flwr-home"
    port = free_port()
    write_flower_config(flwr_home, port)
    run_config = {**settings.to_run_config(), "out-dir": str(out),
                  "data-root": str(Path(settings.data_root).resolve())}
    overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
    concurrent_sites = ray_cpus(num_cpus, len(settings.train_centers))
    federation = (f"num-supernodes={len(settings.node_centers)} client-resources-num-cpus=1 "
                  f"init-args-num-cpus={concurrent_sites}")
    report_path = out / "federation.json"
    report_path.unlink(missing_ok=True)  # a previous run's report must not pass for this one's
    superlink = start_superlink(flwr_home, port, out / "superlink.log")
    process = None
    try:
        log_path = out / "flower.log"
        with open(log_path, "w", encoding="utf-8") as flower_log:
            command = [str(BIN_DIR / "flwr"), "run", str(app), CONNECTION, "--stream",
                       "--run-config", overrides, "--federation-config", federation]
            process = subprocess.Popen(command, env=flower_env(flwr_home), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                       cwd=out, start_new_session=True)
            deadline = time.monotonic() + timeout_s
            for line in process.stdout:
                flower_log.write(line)
                if "hemex" in line or "ERROR" in line:
                    log(line.rstrip())
                if time.monotonic() > deadline:
                    stop(process)
                    raise HemexError(f"federation exceeded {timeout_s:.0f} s; see {log_path}")
            process.wait()
        # `flwr run --stream` can stop streaming early on a busy SuperLink while the run goes on.
        wait_for_run_end(port, report_path, deadline)
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else None
        if report is not None and report.get("failed"):  # the ServerApp stopped the run (server/guard.py)
            raise HemexError(f"federation stopped: {report['failed']}; see {report_path}")
        if process.returncode != 0 or report is None:
            raise HemexError(f"federation failed ({last_error(log_path) or f'flwr exit {process.returncode}'}); "
                             f"see {log_path}")
        report["concurrent_sites"] = concurrent_sites  # how many site handlers shared the cores (traffic())
        return report
    finally:  # also on Ctrl-C or SIGTERM (common/cli/__init__.py): nothing of the run is left running
        if process is not None:
            stop(process)
        stop(superlink)
        reap_runtime(port)


def wait_for_run_end(port: int, report_path: Path, deadline: float) -> None:
    """Wait while the simulation runtime of our SuperLink is still working and has not written
    its report: `flwr run --stream` can stop streaming early on a busy SuperLink."""
    while time.monotonic() < deadline and not report_path.is_file() and runtime_pids(port):
        time.sleep(2)


def last_error(log_path: Path) -> str | None:
    """The last exception line the ServerApp logged, for a one-line failure message."""
    lines = [ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    errors = [ln for ln in lines if ("Error:" in ln or "Exception:" in ln) and not ln.startswith("File ")]
    return errors[-1][:300] if errors else None


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
