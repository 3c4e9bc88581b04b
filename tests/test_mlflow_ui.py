"""The MLflow UI opens the platform's runs where a researcher expects them: checked in a real headless Chromium
against a real `mlflow server`."""

import shutil
import subprocess

import pytest
from mlflow import MlflowClient

from pipelines import tracking


def _rendered(url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran, in headless Chromium."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine; .ci/run installs Debian's chromium")
    result = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=20000", "--window-size=1400,900", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_sweeps_link_opens_its_parent_run_with_child_runs_and_the_experiment_on_its_runs_table(
        mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment_id = tracking.setup("ui-check")
    client = MlflowClient()
    assert client.get_experiment(experiment_id).tags[tracking.TAG_EXPERIMENT_KIND] == tracking.EXPERIMENT_KIND
    parent = client.create_run(experiment_id, run_name="sweep-ui-check",
                               tags={tracking.TAG_KIND: tracking.KIND_SWEEP}).info.run_id
    child = client.create_run(experiment_id, run_name="ui-check-centre-s0",
                              tags={tracking.TAG_PARENT: parent, tracking.TAG_KIND: tracking.KIND_TRIAL}).info.run_id
    client.log_metric(child, "eval_accuracy", 0.5)
    for run_id in (child, parent):
        tracking.end_run(run_id, "FINISHED")

    url = tracking.run_url(parent)
    assert url.startswith(f"{mlflow_server}/#/experiments/{experiment_id}/runs/{parent}")
    page = _rendered(url, tmp_path)
    assert "sweep-ui-check" in page and "Child runs" in page and "ui-check-centre-s0" in page, page[-3000:]

    runs_table = _rendered(f"{mlflow_server}/#/experiments/{experiment_id}?{tracking.UI_MODEL_TRAINING}", tmp_path)
    assert "Run Name" in runs_table and "sweep-ui-check" in runs_table, runs_table[-3000:]
