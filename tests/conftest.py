import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

# --- helpers for tests that start their own servers and clusters (import them: from conftest import ...)

def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_members(sid: int) -> list[int]:
    """Processes whose session id is ``sid``: everything a command started with ``start_new_session`` spawned."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                members.append(int(entry.name))
    return members


def listening_sockets(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the processes ``pids`` hold (``ss -ltnpH``)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    wanted, found = set(pids), []
    for line in out.splitlines():
        fields = line.split()
        for pid in (int(p) for p in re.findall(r"pid=(\d+)", line)):
            if pid in wanted:
                found.append((pid, fields[3]))
    return found


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop the process group ``proc`` leads (started with ``start_new_session``): ``sig``, then SIGKILL."""
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def mlflow_server_at(backend_store_uri: str, artifacts: Path, log: Path, port: int | None = None):
    """An `mlflow server` on loopback in its own process group, stopped (the whole group) afterwards; on ``port``
    if given (a server started again where its clients look for it), else on a free one."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(artifacts), "--workers", "1"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # ~20 s on an idle 2-core machine; far longer under load
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {log.read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        stop_group(proc, signal.SIGTERM)


@pytest.fixture
def mlflow_server(tmp_path):
    with mlflow_server_at(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts",
                          tmp_path / "server.log") as url:
        yield url


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One small local Ray instance for the whole test session, stopped at its end (only the one we started)."""
    import os

    import ray

    os.environ.setdefault("RAY_ADDRESS", "")
    os.environ.pop("RAY_ADDRESS")  # tests never join a user's cluster
    # A test's run of a few updates can end within the default 5 s between system-metric samples, and MLflow
    # logs a sample only after one interval: Ray's workers inherit this, so even short runs log one.
    os.environ["ASDA_SYSTEM_METRICS_EVERY_S"] = "1"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_store(tmp_path_factory):
    """MLflow runs of the tests go to a throw-away sqlite store, never the repository's."""
    import os

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def synthetic_prepared(ray_local, tmp_path_factory):
    """A small prepared synthetic set (the embedded default's generator, fewer clips)."""
    from pipelines.data.prepare import prepare

    root = tmp_path_factory.mktemp("synthetic")
    prepare("synthetic", root / "raw", root / "prepared",
            options={"num_train": 64, "num_valid": 16, "num_test": 32, "seed": 1})
    return root / "prepared"


@pytest.fixture(scope="session")
def easy_synthetic(ray_local, tmp_path_factory):
    """The synthetic generator with loud events: a split a probe must get well above chance on."""
    from pipelines.data.prepare import prepare

    root = tmp_path_factory.mktemp("easy")
    prepare("synthetic", root / "raw", root / "prepared",
            options={"num_train": 320, "num_valid": 0, "num_test": 160, "seed": 2, "snr_min_db": 20.0,
                     "snr_max_db": 30.0})
    return root / "prepared"


@contextlib.contextmanager
def tmpfs_at(where: Path, size: str = "3m"):
    """A tmpfs of ``size`` mounted at ``where`` (made if missing); yields resize(size), or None where mounting is not
    permitted (not root); always unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        yield None
        return

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)

    try:
        yield resize
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)  # still busy: detach it now, free it later


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs at ``tmp_path/small``; yields (folder, resize(size)); skipped where it cannot be mounted."""
    where = tmp_path / "small"
    with tmpfs_at(where) as resize:
        if resize is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        yield where, resize
