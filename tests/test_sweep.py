"""The smoke grid end to end: real Ray Tune + Ray Train, real MLflow (sqlite, and a server over HTTP)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sweeps.driver import run_sweep
from sweeps.grid import load_grid

pytestmark = pytest.mark.ray


def _check_sweep(result, grid_name="smoke"):
    grid = load_grid(grid_name)
    trials = grid.trials()
    assert len(result["trials"]) == len(trials) and not any(t["error"] for t in result["trials"])
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["grid.name"] == grid_name and parent.data.params["code_version"]
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(trials)
    for child in children:
        assert child.data.params["model.diff_lambda"] in ("0.0", "0.3")
        assert child.data.tags["factor.diff_lambda"] == child.data.params["model.diff_lambda"]
        assert 0.0 <= child.data.metrics["eval_accuracy"] <= 1.0
        assert "loss" in child.data.metrics
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.csv", "report/report.md", "report/factor_diff_lambda.png",
            "report/attention_lambda.png"} <= report
    assert "| diff_lambda | 0.0 |" in result["report"]["markdown"]
    return children


def test_smoke_grid_end_to_end_with_nested_runs_and_report(ray_local, tracking_store, tmp_path):
    result = run_sweep("smoke", storage=tmp_path)
    children = _check_sweep(result)
    # Running the same grid again resumes it: nothing is redone.
    again = run_sweep("smoke", storage=tmp_path)
    assert again["parent_run_id"] == result["parent_run_id"]
    client = MlflowClient()
    after = client.search_runs([children[0].info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(after) == len(children)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """An `mlflow server` on loopback in its own process group, stopped (the whole group) afterwards."""
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240  # ~20 s on an idle 2-core machine; far longer under load
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_smoke_grid_logs_to_an_mlflow_server_over_http(ray_local, mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = run_sweep("smoke", storage=tmp_path)
    children = _check_sweep(result)
    # What the test reads back came over HTTP from the server, and the artifacts live in its store.
    assert all(c.info.artifact_uri.startswith("mlflow-artifacts:") for c in children)
    assert any((tmp_path / "server-artifacts").rglob("report.md"))
