"""The multi-node path, for real on this machine: `make ray-up WORKERS=1` (a head plus a second node over loopback),
a sweep submitted with `ray job submit -- make sweep ...` whose two Train workers land on different nodes, then
`asda sweep` run directly against the same cluster. Every process the test starts is stopped by id afterwards."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, session_members

from pipelines.runtime import auth_token_path

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _clean_env(**extra) -> dict:
    """This environment without a cluster or tracking store of the user's; clients use the token `make ray-up`
    keeps in ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "RAY_AUTH_MODE": "token", **extra}


def _free_port_pair() -> int:
    """A port p with p + 1 free as well (the head's and the second node's dashboard agents)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture
def make_ray_up():
    """`make ray-up WORKERS=1` on free ports; yields (gcs address, dashboard URL). 3 CPUs per node: one 2-CPU
    Train worker fits on each, leaving a CPU per node for Ray Data's tasks."""
    with _ray_up(3) as found:
        yield found


@contextlib.contextmanager
def _ray_up(cpus: int):
    """`make ray-up WORKERS=1` with ``cpus`` CPUs per node, on free ports; yields (gcs address, dashboard URL) and
    stops every process it started afterwards."""
    port, dashboard, agents = free_port(), free_port(), _free_port_pair()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    proc = subprocess.Popen(
        ["make", "-C", str(REPO), "ray-up", "WORKERS=1", f"RAY_CPUS={cpus}", f"WORKER_CPUS={cpus}",
         f"RAY_PORT={port}", f"RAY_DASHBOARD_PORT={dashboard}", f"RAY_AGENT_PORT={agents}",
         f"RAY_TEMP_DIR={temp_dir}"],
        env=_clean_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        for pid in session_members(proc.pid):  # what `make ray-up` spawned, and nothing else
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_sweep_across_two_nodes_and_asda_sweep_joins_the_same_cluster(
        make_ray_up, synthetic_prepared, tmp_path):
    from mlflow import MlflowClient

    address, dashboard = make_ray_up
    grid = yaml.safe_load(open(REPO / "sweeps" / "grids" / "smoke.yaml"))
    grid["name"] = "two-node"
    grid["data"] = {"prepared": str(synthetic_prepared)}
    grid["train"].update(workers=2, cpus_per_worker=2.0)
    grid["factors"] = {"diff_lambda": [0.3]}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "sweeps"

    started = time.time()
    submit = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--submission-id", "asda-two-node",
              "--runtime-env-json", json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": tracking}}),
              "--", "make", "-C", str(REPO), "sweep", f"GRID={grid_file}", f"ARGS=--storage {storage}"]
    for _ in range(15):  # the head's job agent registers a little after `ray start` returns
        job = subprocess.run(submit, env=_clean_env(), capture_output=True, text=True, timeout=900)
        if "No available agent" not in job.stderr:
            break
        time.sleep(2)
    log = job.stdout[-4000:] + job.stderr[-3000:]
    assert job.returncode == 0 and "succeeded" in job.stdout, log
    print(f"ray job submit, one two-worker trial: {time.time() - started:.0f} s")

    workers = [json.loads(p.read_text()) for p in storage.rglob("workers/rank*.json")]
    assert len(workers) == 2, log
    assert len({w["node_id"] for w in workers}) == 2, workers  # one Train worker on each node

    client = MlflowClient(tracking)

    def trial_runs():
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        return [r for r in runs if r.data.tags.get("asda.kind") == "sweep-trial"]  # not the random-init baseline

    children = trial_runs()
    assert len(children) == 1 and 0.0 <= children[0].data.metrics["eval_accuracy"] <= 1.0

    # The same grid run directly against the cluster joins it and resumes: the finished trial is not redone.
    direct = subprocess.run([str(BIN / "asda"), "sweep", "--grid", str(grid_file), "--storage", str(storage)],
                            env=_clean_env(RAY_ADDRESS=address, MLFLOW_TRACKING_URI=tracking),
                            capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stdout[-3000:] + direct.stderr[-3000:]
    assert "resuming" in direct.stdout and "| diff_lambda | 0.3 |" in direct.stdout
    assert len(trial_runs()) == 1
    # Joined over RAY_ADDRESS, the sweep's job is listed by the sweep's name in the cluster's dashboard.
    sweep_id = re.search(r"^sweep (\S+) \(grid two-node\)", direct.stdout, re.M).group(1)
    assert f"job 'asda sweep {sweep_id}'" in direct.stdout
    token = auth_token_path().read_text().strip()
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    jobs = json.loads(urllib.request.urlopen(request, timeout=60).read())
    named = [j for j in jobs if (j.get("metadata") or {}).get("job_name") == f"asda sweep {sweep_id}"]
    assert [(j["type"], j["status"]) for j in named] == [("DRIVER", "SUCCEEDED")], jobs


def test_a_cluster_that_does_not_answer_is_refused_within_seconds_naming_its_address_and_how_to_go_on(tmp_path):
    """A stale /tmp/ray/ray_current_cluster (a `make ray-up` head that died) or a RAY_ADDRESS that answers nothing:
    the command stops within seconds, saying which address and what to do, instead of waiting in ray.init for good."""
    port = free_port()  # nothing listens there
    stale = tmp_path / "ray_current_cluster"
    stale.write_text(f"127.0.0.1:{port}\n")
    code = ("from pathlib import Path\nimport pipelines.runtime as runtime\n"
            f"runtime.RUNNING_CLUSTER_FILE = Path({str(stale)!r})\nruntime.ensure_ray()")
    started = time.monotonic()
    found = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 30
    assert found.returncode != 0 and "ClusterUnreachable" in found.stderr
    assert f"the Ray cluster at 127.0.0.1:{port} (named by {stale} (written by `make ray-up`)) does not answer" in \
        found.stderr and f"remove the file (rm {stale})" in found.stderr

    started = time.monotonic()
    cli = subprocess.run([sys.executable, "-m", "pipelines.cli", "probe", "--random-init"], cwd=tmp_path,
                         env=_clean_env(RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert f"the Ray cluster at 127.0.0.1:{port} (named by RAY_ADDRESS) does not answer" in cli.stderr


def _ray_head(temp_dir: str, *command: str) -> subprocess.Popen:
    port, dashboard, agent = free_port(), free_port(), free_port()
    return subprocess.Popen(
        [*command, f"RAY_PORT={port}", f"RAY_DASHBOARD_PORT={dashboard}", f"RAY_AGENT_PORT={agent}", "RAY_CPUS=2",
         f"RAY_TEMP_DIR={temp_dir}"],
        env=_clean_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _alive(pids: list[int]) -> list[int]:
    from pipelines.local_cluster import _alive as alive

    return [p for p in pids if alive(p)]


def test_make_ray_down_stops_the_cluster_make_ray_up_started_and_no_other_ray_on_the_machine():
    """Another local Ray instance on the machine (another user's, here one more `make ray-up` on other ports and
    another temp folder) keeps running when `make ray-down` stops ours; ours is gone, its record and cluster file
    with it."""
    ours_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    other_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ours = _ray_head(ours_dir, "make", "-C", str(REPO), "ray-up")
    other = _ray_head(other_dir, "make", "-C", str(REPO), "ray-up")
    try:
        for proc in (ours, other):
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
        ours_pids, other_pids = session_members(ours.pid), session_members(other.pid)
        assert _alive(ours_pids) and _alive(other_pids)
        port = next(a for a in ours.args if a.startswith("RAY_PORT=")).split("=")[1]
        record = Path(ours_dir) / f"ray-up-{port}.record"
        assert record.is_file()
        down = subprocess.run(["make", "-C", str(REPO), "ray-down", f"RAY_PORT={port}", f"RAY_TEMP_DIR={ours_dir}"],
                              env=_clean_env(), capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "other Ray processes left running" in down.stdout
        assert _alive(ours_pids) == [] and sorted(_alive(other_pids)) == sorted(other_pids)
        assert not record.exists()
        again = subprocess.run(["make", "-C", str(REPO), "ray-down", f"RAY_PORT={port}", f"RAY_TEMP_DIR={ours_dir}"],
                               env=_clean_env(), capture_output=True, text=True, timeout=120)
        assert again.returncode != 0 and "nothing stopped" in again.stderr
    finally:
        for proc in (ours, other):
            for pid in session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(other_dir, ignore_errors=True)


def _node_loss_grid(tmp_path: Path, synthetic_prepared: Path) -> Path:
    """Two cells of one seed, each trial 2 CPUs in its own process: one per 3-CPU node, 60 updates with a
    checkpoint every 5 (16 batches an epoch: a checkpoint mid-epoch), no second task."""
    grid = yaml.safe_load(open(REPO / "sweeps" / "grids" / "smoke.yaml"))
    grid.update(name="node-loss", data={"prepared": str(synthetic_prepared)}, tasks=[],
                factors={"diff_lambda": [0.0, 0.3]})
    grid["train"].update(steps=60, checkpoint_every=5, log_every=5, cpus_per_worker=2.0)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _raylet_of(pid: int) -> tuple[int, bool]:
    """(the raylet that started the Ray worker ``pid``, whether it is the head node's)."""
    raylet = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return raylet, b"node:__internal_head__" in Path(f"/proc/{raylet}/cmdline").read_bytes()


def _kill_the_other_nodes_raylet(storage: Path, deadline_s: float = 300) -> None:
    """Once the trial on the head-less node has a checkpoint and is still training: SIGKILL its node's raylet."""
    deadline = time.time() + deadline_s
    while time.time() < deadline:
        for pid_file in storage.glob("*/runs/*/workers/rank0.pid"):
            run = pid_file.parent.parent
            try:
                raylet, head = _raylet_of(int(pid_file.read_text()))
            except (OSError, ValueError):
                continue
            if not head and list(run.glob("checkpoint_*/model.pt")) and not (run / "final.pt").exists():
                os.kill(raylet, signal.SIGKILL)
                return
        time.sleep(0.2)
    raise AssertionError(f"no trial trained on the second node with a checkpoint within {deadline_s} s")


@pytest.mark.slow
def test_a_node_lost_mid_sweep_has_its_trial_retried_elsewhere_to_the_numbers_of_an_undisturbed_run(
        synthetic_prepared, tmp_path):
    """`make ray-up WORKERS=1`, a trial on each node; the second node's raylet killed while its trial trains.
    The trial is retried on the head from its checkpoint; the sweep ends with every trial in trials.json, its
    pretraining loss and metric equal to those of the same grid swept again undisturbed."""
    grid = _node_loss_grid(tmp_path, synthetic_prepared)
    with _ray_up(3) as (address, _):
        env = _clean_env(RAY_ADDRESS=address, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
        sweep = [str(BIN / "asda"), "sweep", "--grid", str(grid), "--max-concurrent", "2", "--storage"]
        proc = subprocess.Popen([*sweep, str(tmp_path / "lost")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            _kill_the_other_nodes_raylet(tmp_path / "lost")
            out, _ = proc.communicate(timeout=900)
        finally:
            for pid in session_members(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert proc.returncode == 0, out[-4000:]
        assert "retrying  diff_lambda=" in out or "retrying  centre" in out, out[-4000:]
        again = subprocess.run([*sweep, str(tmp_path / "undisturbed")], env=env, capture_output=True, text=True,
                               timeout=900)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]

    def numbers(storage: Path) -> dict:
        rows = json.loads(next(storage.glob("*/trials.json")).read_text())
        return {(r["cell"], r["seed"]): (r["pretrain_loss"], r["metric_value"]) for r in rows}

    lost = numbers(tmp_path / "lost")
    assert len(lost) == 2 and all(loss == loss and metric is not None for loss, metric in lost.values()), lost
    assert lost == numbers(tmp_path / "undisturbed")
