"""A two-node Ray cluster on loopback (a head plus a second `ray start --address`) runs a sweep trial whose two
Train workers land on different nodes. Every process the test starts is stopped by id afterwards."""

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

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """Processes whose session id is ``sid``: everything one `ray start` spawned."""
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


@pytest.fixture
def two_node_cluster(tmp_path):
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    starts = []

    def start(*args):
        proc = subprocess.Popen([str(BIN / "ray"), "start", *args, "--num-cpus=3", "--disable-usage-stats"],
                                env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out, _ = proc.communicate(timeout=180)
        starts.append(proc.pid)
        assert proc.returncode == 0, out

    try:
        start("--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
              f"--temp-dir={temp_dir}")
        start(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1")
        yield f"127.0.0.1:{port}"
    finally:
        for sid in starts:  # stop what these `ray start` calls spawned, and nothing else
            for pid in _session_members(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_sweep_trial_spreads_its_workers_over_two_nodes(two_node_cluster, synthetic_prepared, tmp_path):
    grid = yaml.safe_load(open(Path(__file__).parents[1] / "sweeps" / "grids" / "smoke.yaml"))
    grid["name"] = "two-node"
    grid["data"] = {"prepared": str(synthetic_prepared)}
    # 3 CPUs per node: one 2-CPU worker fits on each, leaving a CPU per node for Ray Data's tasks.
    grid["train"].update(workers=2, cpus_per_worker=2.0)
    grid["factors"] = {"diff_lambda": [0.3]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = {**os.environ, "RAY_ADDRESS": two_node_cluster,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    started = time.time()
    run = subprocess.run([str(BIN / "asda"), "sweep", "--grid", str(path), "--storage", str(tmp_path / "sweeps")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    workers = [json.loads(p.read_text()) for p in (tmp_path / "sweeps").rglob("workers/rank*.json")]
    assert len(workers) == 2
    assert len({w["node_id"] for w in workers}) == 2, workers
    print(f"two-node sweep trial: {time.time() - started:.0f} s")
