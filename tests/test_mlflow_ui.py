"""The MLflow UI opens the platform's runs where a researcher expects them: checked in a real headless Chromium
against a real `mlflow server`."""

import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from mlflow import MlflowClient

from pipelines import tracking


def _rendered(url: str, tmp_path, screenshot: Path | None = None, height: int = 900) -> str:
    """The page's DOM after its scripts ran, in headless Chromium (a window ``height`` pixels high); with
    ``screenshot``, also a PNG of it there."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine; .ci/run installs Debian's chromium")
    shot = [f"--screenshot={screenshot}"] if screenshot else []
    result = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=20000", f"--window-size=1400,{height}", *shot, "--dump-dom", url],
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


def test_a_sweeps_page_lists_its_cells_a_cells_page_its_seeds_and_compare_shows_each_cells_spread(
        mlflow_server, monkeypatch, tmp_path):
    """The tree parent -> cell -> seed as the driver and the report make it (``test_tracking.sweep_tree``: no Ray),
    on a real server, seen in a real browser; a screenshot of the cells compared is left in the test's folder."""
    from test_tracking import sweep_tree

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    state = sweep_tree("ui-cells", tmp_path)["state"]
    cells = state["cell_runs"]
    page = _rendered(tracking.run_url(state["parent_run_id"]), tmp_path, tmp_path / "parent.png", 1600)
    assert "Child runs" in page and "Δ vs centre" in page, page[-3000:]  # its description: the main table
    assert all(name in page for name in ("diff_lambda=0.0", "readout=mean", "random init")), page[-3000:]
    page = _rendered(tracking.run_url(cells["centre"]), tmp_path, tmp_path / "cell.png", 1600)
    assert "Child runs" in page and "centre · seed 0" in page and "centre · seed 1" in page, page[-3000:]
    assert "Δ vs centre" in page and "smoke · smoke-ui-cells" in page, page[-3000:]  # its line; its parent

    experiment_id = MlflowClient().get_run(cells["centre"]).info.experiment_id
    runs = quote(json.dumps(list(cells.values())))
    url = f"{mlflow_server}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}"
    page = _rendered(url, tmp_path, tmp_path / "compare-cells.png", 2400)
    for shown in ("random init", "diff_lambda=0.0", "eval_accuracy_mean", "eval_accuracy_std",
                  "eval_accuracy_delta_vs_centre", "factor.diff_lambda"):
        assert shown in page, (shown, page[-3000:])
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in ("parent", "cell", "compare-cells"))


def test_the_link_a_sweep_ends_with_lists_that_sweeps_runs_alone_best_first_with_the_metric_and_the_cells_spread(
        mlflow_server, monkeypatch, tmp_path):
    """The last line `asda sweep` prints opens the runs table filtered to the sweep, sorted by its metric, with the
    metric and the cells' mean, std and n as columns (a view saved on the experiment); a run of another sweep in
    the same experiment is not listed."""
    from test_tracking import sweep_tree

    from sweeps.driver import sweep_links

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    state = sweep_tree("ui-view", tmp_path)["state"]
    client = MlflowClient()
    experiment_id = client.get_run(state["parent_run_id"]).info.experiment_id
    other = client.create_run(experiment_id, run_name="other sweep · seed 0",
                              tags={tracking.TAG_SWEEP: "smoke-other", tracking.TAG_KIND: tracking.KIND_TRIAL})
    client.log_metric(other.info.run_id, "eval_accuracy", 0.99)
    tracking.end_run(other.info.run_id, "FINISHED")
    parent_line, last = sweep_links(state, "eval_accuracy")
    assert parent_line.endswith(tracking.run_url(state["parent_run_id"])) and last.startswith("MLflow: ")
    page = _rendered(last.removeprefix("MLflow: "), tmp_path, tmp_path / "sweep-runs.png", 1100)
    assert "centre · seed 0" in page and "diff_lambda=0.0 · seed 1" in page and "random init" in page, page[-3000:]
    assert "other sweep" not in page, page[-3000:]
    for column in ("eval_accuracy", "eval_accuracy_mean", "eval_accuracy_std"):
        assert column in page, (column, page[-3000:])
    assert (tmp_path / "sweep-runs.png").stat().st_size > 10_000
