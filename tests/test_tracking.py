"""What the platform prints about the tracking store never shows a credential, and a sweep's runs form the tree
parent -> cell -> seed, its cell runs carrying the report's numbers (a sqlite store, no Ray)."""

import json
import statistics

import pytest
from mlflow import MlflowClient

from pipelines import tracking
from sweeps import driver
from sweeps.grid import load_grid
from sweeps.report import BASELINE, STATE_FILE, build_report

# the smoke grid's cells with two seeds each: the grid's metric, eval_map and the task's score per seed
SCORES = {"centre": [(0.60, 0.40, 0.30), (0.64, 0.46, 0.34)],
          "diff_lambda=0.0": [(0.50, 0.30, 0.36), (0.58, 0.32, 0.40)],
          "readout=mean": [(0.55, 0.35, None), (0.57, 0.39, None)],  # scored from the centre's pretraining
          BASELINE: [(0.30, 0.20, 0.10), (0.34, 0.22, 0.12)]}


@pytest.mark.parametrize("uri, masked, link", [
    ("http://alice:s3cret@mlflow.example:5000", "http://alice:***@mlflow.example:5000", "http://mlflow.example:5000"),
    ("https://tok3n@mlflow.example", "https://***@mlflow.example", "https://mlflow.example"),
    ("postgresql://bob:pw@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_credentials_in_a_tracking_uri_are_masked_or_dropped(uri, masked, link):
    assert tracking.shown_uri(uri) == masked
    assert tracking.shown_uri(uri, credentials="") == link


@pytest.mark.parametrize("uri", ["http://alice:s3cret@mlflow.example:5000", "postgresql://bob:s3cret@db/mlflow"])
def test_the_ui_hint_never_prints_the_password(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert "s3cret" not in tracking.ui_command()


def sweep_tree(experiment: str, folder, failed: str | None = None) -> dict:
    """A sweep's runs as the driver makes them, without Ray: the smoke grid's parent and cell runs, each seed's run
    under its cell (a read-out cell's scores in the centre's runs as readout_mean/eval_*), the random-init
    baseline's under its own, then the report built into ``folder`` and logged, and the parent ended. ``failed``: a
    cell whose second seed failed. Returns the sweep's grid, state, rows, baseline rows and report."""
    grid = load_grid("smoke")
    state = {"sweep_id": f"smoke-{experiment}", "grid": grid.path, "fingerprint": grid.fingerprint()}
    state["parent_run_id"] = driver._parent_run(grid, state, experiment)
    state["cell_runs"] = driver._cell_runs(grid, state)
    client, cells = MlflowClient(), {c["cell"]: c for c in driver.grid_cells(grid)}
    rows, baseline = [], []
    for cell, seeds in SCORES.items():
        for seed, (accuracy, mean_ap, task) in enumerate(seeds):
            row = {"cell": cell, "factor": cells[cell]["factor"], "value": cells[cell]["value"], "seed": seed,
                   "metric": grid.metric, "metric_value": accuracy, "error": None, "tasks": {"short": task},
                   "evaluation": {"readout": cells[cell]["values"]["readout"]}}
            if cell == "readout=mean":
                row.update(shares_pretraining_of="centre", tasks={},
                           run_id=next(r["run_id"] for r in rows if r["cell"] == "centre" and r["seed"] == seed))
                client.log_metric(row["run_id"], "readout_mean/eval_accuracy", accuracy)
                client.log_metric(row["run_id"], "readout_mean/eval_map", mean_ap)
            else:
                kind = tracking.KIND_PROBE if cell == BASELINE else tracking.KIND_TRIAL
                row["run_id"] = client.create_run(
                    client.get_run(state["parent_run_id"]).info.experiment_id, run_name=f"{cell} · seed {seed}",
                    tags={tracking.TAG_PARENT: state["cell_runs"][cell], tracking.TAG_KIND: kind,
                          tracking.TAG_CELL: cell, tracking.TAG_SWEEP: state["sweep_id"],
                          tracking.TAG_SEED: str(seed)}).info.run_id
                client.log_metric(row["run_id"], "eval_accuracy", accuracy)
                client.log_metric(row["run_id"], "eval_map", mean_ap)
                tracking.end_run(row["run_id"], "FINISHED")
            if cell == failed and seed == 1:
                row.update(metric_value=None, error="RuntimeError: boom")
            (baseline if cell == BASELINE else rows).append(row)
    report = build_report(rows, grid, folder / "report", baseline=baseline, parent_run_id=state["parent_run_id"],
                          cell_runs=state["cell_runs"])
    tracking.end_run(state["parent_run_id"], "FAILED" if failed else "FINISHED")
    return {"grid": grid, "state": state, "rows": rows, "baseline": baseline, "report": report}


def _cells(client: MlflowClient, parent_run_id: str) -> dict:
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent_run_id}'")
    return {r.data.tags[tracking.TAG_CELL]: r for r in runs}


def test_a_sweeps_cell_runs_sit_between_its_parent_and_its_seeds_and_carry_the_reports_numbers(tracking_store,
                                                                                              tmp_path):
    tree = sweep_tree("tree", tmp_path, failed="diff_lambda=0.0")
    client, state = MlflowClient(), tree["state"]
    cells = _cells(client, state["parent_run_id"])
    assert {c: r.info.run_name for c, r in cells.items()} == {
        "centre": "centre", "diff_lambda=0.0": "diff_lambda=0.0", "readout=mean": "readout=mean",
        BASELINE: "random init"}
    assert {c: r.info.run_id for c, r in cells.items()} == state["cell_runs"]
    for run in cells.values():
        tags = run.data.tags
        assert tags[tracking.TAG_KIND] == tracking.KIND_CELL and tags[tracking.TAG_SWEEP] == state["sweep_id"]
        assert tags["factor.diff_lambda"] == run.data.params["factor.diff_lambda"]
        assert tags["factor.readout"] == run.data.params["factor.readout"]
    assert cells["diff_lambda=0.0"].data.params["factor.diff_lambda"] == "0.0"
    assert cells["readout=mean"].data.params == {"factor.diff_lambda": "0.3", "factor.readout": "mean"}
    assert cells[BASELINE].data.params == {"factor.diff_lambda": "0.3", "factor.readout": "cls"}
    assert cells["diff_lambda=0.0"].data.tags["asda.factor_value"] == "0.0"
    # a cell whose seed failed is FAILED, the others FINISHED once the report logged their numbers
    assert {c: r.info.status for c, r in cells.items()} == {"centre": "FINISHED", "diff_lambda=0.0": "FAILED",
                                                           "readout=mean": "FINISHED", BASELINE: "FINISHED"}
    seeds = client.search_runs([cells["centre"].info.experiment_id],
                               filter_string=f"tags.`{tracking.TAG_PARENT}` = '{state['cell_runs']['centre']}'")
    assert sorted(r.info.run_name for r in seeds) == ["centre · seed 0", "centre · seed 1"]

    centre, readout = cells["centre"].data.metrics, cells["readout=mean"].data.metrics
    assert centre["eval_accuracy_mean"] == pytest.approx(0.62) and centre["eval_accuracy_n"] == 2
    assert centre["eval_accuracy_std"] == pytest.approx(statistics.stdev([0.60, 0.64]))
    assert centre["eval_map_mean"] == pytest.approx(0.43) and centre["eval_accuracy_delta_vs_centre"] == 0.0
    assert "eval_accuracy_p_holm" not in centre  # the centre is no comparison
    assert centre["task_short/eval_accuracy_mean"] == pytest.approx(0.32)
    # the read-out cell: its own scores, read from the centre's runs, not the centre's
    assert readout["eval_accuracy_mean"] == pytest.approx(0.56) and readout["eval_map_mean"] == pytest.approx(0.37)
    assert readout["eval_accuracy_delta_vs_centre"] == pytest.approx(-0.06)
    summary = tree["report"]["summary"]
    row = next(c for c in summary["cells"] if c["value"] == "mean")
    assert readout["eval_accuracy_delta_vs_centre_se"] == pytest.approx(row["se_delta"])
    assert readout["eval_accuracy_p_holm"] == pytest.approx(row["p_holm"])
    failing = cells["diff_lambda=0.0"].data.metrics  # one seed scored: no spread, and no Δ's standard error
    assert failing["eval_accuracy_n"] == 1 and "eval_accuracy_std" not in failing
    assert failing["eval_accuracy_delta_vs_centre"] == pytest.approx(-0.10)
    base = cells[BASELINE].data.metrics
    assert base["eval_accuracy_mean"] == pytest.approx(summary["baseline_random_init"]["mean"]) == pytest.approx(0.32)
    assert base["eval_accuracy_delta_vs_centre"] == pytest.approx(-0.30)
    assert base["task_short/eval_accuracy_mean"] == pytest.approx(0.11)

    parent = client.get_run(state["parent_run_id"])
    note = parent.data.tags[tracking.TAG_NOTE]
    header = "| factor | value | eval_accuracy | n | Δ vs centre | p (Holm) | clear |"
    assert header in note and "| diff_lambda | 0.0 | 0.500 | 1 (1 failed) | -0.100 |" in note
    assert "| baseline | random-init |" in note and "| readout | mean |" in note
    assert cells["readout=mean"].data.tags[tracking.TAG_NOTE].splitlines()[::2] == [
        header, next(x for x in note.splitlines() if x.startswith("| readout | mean |"))]
    assert {"report/report.md", "report/summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                                                 "report")}


def test_a_resumed_sweep_keeps_its_cell_runs_and_rebuilding_the_report_refreshes_them(tracking_store, tmp_path):
    """Resuming reuses the cell runs sweep.json names (RUNNING again) and makes only a missing one anew; leftover
    seed runs are closed without touching the cells, an interruption closes the cells too, and `asda report`
    (build_report without run ids) logs the numbers and ends the cells again."""
    tree = sweep_tree("resume", tmp_path)
    client, state, grid = MlflowClient(), tree["state"], tree["grid"]
    client.delete_run(state["cell_runs"]["diff_lambda=0.0"])
    again = driver._cell_runs(grid, state)
    assert again["diff_lambda=0.0"] != state["cell_runs"]["diff_lambda=0.0"]
    kept = {c: r for c, r in again.items() if c != "diff_lambda=0.0"}
    assert kept == {c: r for c, r in state["cell_runs"].items() if c != "diff_lambda=0.0"}
    assert {client.get_run(r).info.status for r in again.values()} == {"RUNNING"}

    seed = next(r["run_id"] for r in tree["rows"] if r["cell"] == "centre")
    client.update_run(seed, status="RUNNING")  # left by a driver killed outright
    assert driver._close_orphans(state["parent_run_id"]) == ["centre · seed 0"]
    assert client.get_run(seed).info.status == "KILLED"
    assert {client.get_run(r).info.status for r in again.values()} == {"RUNNING"}
    closed = driver._close_orphans(state["parent_run_id"], grid.metric, cells=True)  # an interrupted sweep
    assert sorted(closed) == sorted(["centre", "diff_lambda=0.0", "readout=mean", "random init"])
    assert {client.get_run(r).info.status for r in again.values()} == {"KILLED"}

    (tmp_path / STATE_FILE).write_text(json.dumps({**state, "cell_runs": again, "finished": True}))
    build_report(tree["rows"], grid, tmp_path / "report", baseline=tree["baseline"])
    assert {client.get_run(r).info.status for r in again.values()} == {"FINISHED"}
    assert client.get_run(again["diff_lambda=0.0"]).data.metrics["eval_accuracy_mean"] == pytest.approx(0.54)


def test_a_tracking_store_that_refuses_the_cell_numbers_leaves_the_report_and_the_sweep_standing(
        tracking_store, tmp_path, capsys):
    """Run ids the store does not have (a reset store, a server that refuses): a warning that says what to run,
    the report's files written, no error."""
    grid = load_grid("smoke")
    rows = [{"cell": "centre", "factor": "centre", "value": None, "seed": 0, "metric": grid.metric,
             "metric_value": 0.6, "error": None, "run_id": "0" * 32}]
    report = build_report(rows, grid, tmp_path / "report", baseline=[], parent_run_id="1" * 32,
                          cell_runs={"centre": "2" * 32})
    out = capsys.readouterr().out
    assert "warning: MLflow refused the report for the parent run" in out and "asda report --sweep" in out
    assert (tmp_path / "report" / "summary.json").is_file() and report["summary"]["centre_mean"] == 0.6
    build_report(rows, grid, tmp_path / "cells", baseline=[], cell_runs={"centre": "2" * 32})
    assert "warning: MLflow refused the report for the cell runs" in capsys.readouterr().out


def test_settings_that_are_paths_are_tags_not_params(tracking_store):
    client = MlflowClient()
    experiment_id = tracking.setup("paths-as-tags")
    run_id = client.create_run(experiment_id).info.run_id
    tracking.log_params(client, run_id, {"train.data": "/data/prepared/esc50", "probe.checkpoint": "/r/final.pt",
                                         "grid.file": "/g/smoke.yaml", "train.storage": "/r", "train.seed": "0",
                                         "model.diff_lambda": "0.3", "data.target_length": "512"})
    run = client.get_run(run_id).data
    assert run.params == {"train.seed": "0", "model.diff_lambda": "0.3", "data.target_length": "512"}
    assert {k: run.tags[k] for k in ("train.data", "probe.checkpoint", "grid.file", "train.storage")} == {
        "train.data": "/data/prepared/esc50", "probe.checkpoint": "/r/final.pt", "grid.file": "/g/smoke.yaml",
        "train.storage": "/r"}


def test_processes_opening_a_new_sqlite_store_at_once_all_get_the_one_experiment(tmp_path):
    """Without the store's lock, three processes creating a new store's schema at once fail in SQLAlchemy or
    Alembic (two of three, measured); with it each one waits its turn."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"}
    code = "from pipelines import tracking; print(tracking.setup('asda'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {"1"}
