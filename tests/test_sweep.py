"""The smoke grid end to end: real Ray Tune + Ray Train, real MLflow (sqlite, and a server over HTTP)."""

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, listening_sockets, mlflow_server_at, session_members, stop_group, tmpfs_at
from mlflow import MlflowClient

from pipelines.cli import main
from sweeps.driver import run_sweep
from sweeps.grid import load_grid
from sweeps.report import reproduce_command
from sweeps.reproduce import reproduce

pytestmark = pytest.mark.ray


def _check_sweep(result, grid_name="smoke", in_process=True):
    grid = load_grid(grid_name)
    trials = grid.trials()
    cells = [(t.cell, t.value) for t in trials] + [(a["cell"], a["value"]) for t in trials for a in t.also]
    assert len(result["trials"]) == len(cells) and not any(t["error"] for t in result["trials"])
    # trials.json keeps each cell's factor value and its metric under distinct keys
    assert sorted(map(str, (t["value"] for t in result["trials"]))) == sorted(str(value) for _, value in cells)
    _check_readout_rows(result, grid)
    assert all(0.0 <= t["metric_value"] <= 1.0 and t["metric"] == grid.metric for t in result["trials"])
    assert all(0.0 <= t["attn_event_share"] <= 1.0 for t in result["trials"])  # the synthetic clips have events
    client = MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.params["grid.name"] == grid_name and parent.data.params["code_version"]
    cells, children = _tree(client, parent.info.run_id)
    _check_cells(result, grid, cells, children)
    trial_runs = [c for c in children if c.data.tags.get("asda.kind") == "sweep-trial"]
    baseline_runs = [c for c in children if c.data.tags.get("asda.cell") == "baseline"]
    assert len(trial_runs) == len(trials) and len(baseline_runs) == len(grid.seeds)
    assert len(children) == len(trials) + len(grid.seeds) * (1 + len(grid.tasks))  # a baseline probe per task too
    _check_tasks(result, grid, trial_runs)
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert parent.info.run_name == f"{grid_name} · {parent.data.tags['asda.sweep']}"
    for child in trial_runs:
        # named by cell and seed, and FINISHED only with its evaluation in it
        assert child.info.run_name == f"{child.data.tags['asda.cell']} · seed {child.data.tags['asda.seed']}"
        assert child.info.status == "FINISHED" and grid.metric in child.data.metrics
        assert child.data.params["train.in_process"] == str(in_process)  # the training path the trial took
        assert child.data.params["model.diff_lambda"] in ("0.0", "0.3")
        assert child.data.tags["factor.diff_lambda"] == child.data.params["model.diff_lambda"]
        assert 0.0 <= child.data.metrics["eval_accuracy"] <= 1.0
        assert "loss" in child.data.metrics
    for run in baseline_runs:  # the centre's model at random init, probed like the trials, once per seed
        assert run.data.tags["asda.checkpoint"] == "random-init"
        assert run.data.params["model.diff_lambda"] == str(grid.centre["diff_lambda"])
        assert 0.0 <= run.data.metrics["eval_accuracy"] <= 1.0
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.csv", "report/report.md", "report/summary.json", "report/factor_diff_lambda.png",
            "report/attention_lambda.png"} <= report
    assert "| diff_lambda | 0.0 |" in parent.data.tags["mlflow.note.content"]  # the main table on its page
    text = result["report"]["markdown"]
    assert "| diff_lambda | 0.0 |" in text and "| baseline | random-init |" in text and "σ_seed" in text
    summary = json.loads((Path(result["report"]["folder"]) / "summary.json").read_text())
    assert {"metric", "centre_mean", "centre_std", "sigma_seed", "baseline_random_init", "cells"} <= set(summary)
    assert summary["baseline_random_init"]["n"] == len(grid.seeds)
    assert all(0.0 <= c["attn_event_share"] <= 1.0 for c in summary["cells"])  # the event-share column
    # measured on every clip of the test split (32: fewer than 512), and what each cell cost
    assert all(c["attn_clips"] == 32 and len(c["attn_layers"]) == 2 for c in summary["cells"])
    assert all(c["cost"]["clips_per_s"] > 0 and c["cost"]["gflops_per_update"] > 0 and c["cost"]["params"] > 0
               and c["cost"]["peak_rss_mb"] > 100 and c["cost"]["loop_rss_mb"] >= 0 for c in summary["cells"])
    return cells + children


def _tree(client, parent_run_id: str) -> tuple[list, list]:
    """A sweep's cell runs (under its parent run) and its seeds' runs (under the cell runs)."""
    experiment = [client.get_run(parent_run_id).info.experiment_id]

    def under(run_id: str) -> list:
        return client.search_runs(experiment, filter_string=f"tags.mlflow.parentRunId = '{run_id}'")

    cells = under(parent_run_id)
    return cells, [run for cell in cells for run in under(cell.info.run_id)]


def _check_cells(result, grid, cells, seeds) -> None:
    """One run per cell of the grid and one for the random-init baseline, between the parent and the seeds' runs:
    a trial's run under its own cell's, the baseline's probes under "random init", none under a read-out cell
    (its seeds are the centre's runs, whose readout_<r>/eval_* it aggregates); each FINISHED with the report's
    mean and count of the grid's metric."""
    by_cell = {c.data.tags["asda.cell"]: c for c in cells}
    names = {t.cell for t in grid.trials()} | {a["cell"] for t in grid.trials() for a in t.also}
    assert set(by_cell) == names | {"baseline"} and len(cells) == len(names) + 1
    assert by_cell["baseline"].info.run_name == "random init" and by_cell["centre"].info.run_name == "centre"
    table = {r["cell"]: r for r in result["report"]["table"]} | {"baseline": result["report"]["baseline"]}
    for cell, run in by_cell.items():
        assert run.info.status == "FINISHED" and run.data.tags["asda.kind"] == "cell", cell
        assert run.data.metrics[f"{grid.metric}_mean"] == pytest.approx(table[cell]["mean"])
        assert run.data.metrics[f"{grid.metric}_n"] == table[cell]["n"] == len(grid.seeds)
        under = [s for s in seeds if s.data.tags["mlflow.parentRunId"] == run.info.run_id]
        shared = any(r.get("shares_pretraining_of") for r in result["trials"] if r["cell"] == cell)
        expected = 0 if shared else len(grid.seeds) * (1 + len(grid.tasks)) if cell == "baseline" else len(grid.seeds)
        assert len(under) == expected and all(s.data.tags.get("asda.cell", cell) == cell for s in under), cell
        assert shared or run.data.metrics["eval_map_mean"] == pytest.approx(
            sum(s.data.metrics["eval_map"] for s in under if "eval_map" in s.data.metrics) / len(grid.seeds))
    for value in grid.factors.get("readout", []):
        if value != grid.centre_evaluation["readout"]:  # the read-out's own eval_map, from the centre's runs
            centre = [s for s in seeds if s.data.tags.get("asda.cell") == "centre"]
            assert by_cell[f"readout={value}"].data.metrics["eval_map_mean"] == pytest.approx(
                sum(s.data.metrics[f"readout_{value}/eval_map"] for s in centre) / len(centre))


def _check_tasks(result, grid, trial_runs) -> None:
    """Every trial's encoder is probed on each task: its run carries task_<name>/<metric>, its row the score, and
    the report a table per task and the best value of each factor on each."""
    for task in grid.tasks:
        name, metric = task["name"], task["metric"]
        for child in trial_runs:
            assert 0.0 <= child.data.metrics[f"task_{name}/{metric}"] <= 1.0
            assert child.data.params[f"task.{name}.readout"] == "cls"
        pretrained = [r for r in result["trials"] if not r.get("shares_pretraining_of")]
        assert all(0.0 <= r["tasks"][name] <= 1.0 for r in pretrained)
        assert all(0.0 <= r["tasks"][name] <= 1.0 for r in result["baseline"])
        assert f"## Task {name}: `{metric}`" in result["report"]["markdown"]
        assert {b["task"] for b in result["report"]["summary"]["best_by_task"]} == {"main", name}


def _check_readout_rows(result, grid) -> None:
    """A read-out cell is an evaluation of the centre's pretraining: its row shares the centre's run and
    checkpoint, and that run carries its metric as readout_<r>/<metric>, paired by seed in the report."""
    rows = {(r["cell"], r["seed"]): r for r in result["trials"]}
    for value in grid.factors.get("readout", []):
        if value == grid.centre_evaluation["readout"]:
            continue
        for seed in grid.seeds:
            row, centre = rows[(f"readout={value}", seed)], rows[("centre", seed)]
            assert (row["run_id"], row["checkpoint"]) == (centre["run_id"], centre["checkpoint"])
            logged = MlflowClient().get_run(row["run_id"]).data.metrics
            assert logged[f"readout_{value}/{grid.metric}"] == row["metric_value"] != centre["metric_value"]
        assert f"| readout | {value} |" in result["report"]["markdown"]


@pytest.mark.slow  # `make test-all`; in `make test` test_cluster's job-submit sweep trains a trial on this path
def test_smoke_grid_on_the_distributed_path_reports_where_each_trials_time_went(ray_local, tracking_store):
    """The Train worker-group path (what workers > 1 and GPUs use), through `asda bench sweep`."""
    from bench.sweep import bench_sweep

    report = bench_sweep("smoke", path="distributed")
    assert report["path"] == "distributed" and report["total"]["trials"] == 2
    for trial in report["trials"]:
        assert trial["error"] is None
        assert 0 < trial["train_loop_s"] < trial["wall_s"] and trial["eval_s"] > 0
        assert trial["overhead_s"] == pytest.approx(trial["wall_s"] - trial["train_loop_s"] - trial["eval_s"])
    assert report["total"]["machine_cpu_s"] > 0 and report["total"]["wall_s"] > 0


def _retry_grid(tmp_path, data, steps: int = 40) -> Path:
    grid = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "grids" / "smoke.yaml").read_text())
    grid.update(name="retry", data={"prepared": str(data)}, factors={"diff_lambda": [0.3]})
    grid["train"].update(steps=steps, checkpoint_every=4, log_every=4, max_failures=1)
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _sweep_command(grid: Path, storage: Path, env: dict) -> subprocess.Popen:
    """`asda sweep` as a user starts it, in a session of its own (stop_group stops all it started)."""
    return subprocess.Popen([str(Path(sys.executable).with_name("asda")), "sweep", "--grid", str(grid),
                             "--storage", str(storage)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _first_checkpoint(storage: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list(storage.glob("*/runs/*/checkpoint_*/model.pt")):
        time.sleep(0.2)


def _joining(ray_local) -> dict:
    return {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}


def test_a_killed_in_process_trial_is_retried_by_tune_and_resumes_from_its_checkpoint_on_a_quiet_console(
        ray_local, tracking_store, synthetic_prepared, tmp_path):
    """`asda sweep` as a user runs it: the trial trains in its own process; SIGKILL it after its first checkpoint
    and Tune's FailureConfig runs it again, from that checkpoint. The terminal shows one line per event and none
    of Ray's own output."""
    storage = tmp_path / "sweeps"
    proc = _sweep_command(_retry_grid(tmp_path, synthetic_prepared), storage, _joining(ray_local))
    try:
        _first_checkpoint(storage)
        run_dir = next(storage.glob("*/runs/*")).resolve()
        os.kill(int((run_dir / "workers" / "rank0.pid").read_text()), signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        stop_group(proc, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    assert "retrying  centre seed 0 from its last checkpoint" in out, out[-3000:]
    assert "[1/1] finished  centre seed 0: eval_accuracy" in out
    assert "\x1b[" not in out and "Dataset" not in out and "Trial name" not in out, out[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1].startswith("MLflow: ") and "workflowType=machine_learning" in lines[-1]
    assert "viewStateShareKey=retry-" in lines[-1] and "/runs/" in lines[-2]  # the sweep's runs; its parent
    run = MlflowClient().search_runs(MlflowClient().get_experiment_by_name("asda").experiment_id,
                                     filter_string="tags.`asda.cell` = 'centre' and tags.`asda.sweep` LIKE 'retry-%'")
    resumed = MlflowClient().get_metric_history(run[0].info.run_id, "resumed_from_step")
    assert max(m.value for m in resumed) >= 4, resumed  # the second attempt started from a checkpoint
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == ["checkpoint_0000036", "checkpoint_0000040"]


def _stopped_by(signum: int, proc: subprocess.Popen, out: str, storage: Path) -> tuple[Path, dict]:
    """What a one-trial sweep stopped mid-trial by ``signum`` must leave: exit 128 + signum, the printed resume
    command, no result for the trial, the trial's run, the cell runs and the parent KILLED. Returns its folder and
    state."""
    assert proc.returncode == 128 + signum, out[-3000:]
    name = signal.Signals(signum).name
    assert f"stopped by {name}: 0 of 1 trials finished" in out and "resume it with: asda sweep --grid" in out
    folder = next(p for p in storage.iterdir() if p.is_dir())  # beside it: the sweep's lock
    assert json.loads((folder / "trials.json").read_text()) == []  # nothing unfinished passes for a result
    state = json.loads((folder / "sweep.json").read_text())
    client = MlflowClient()
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    cells, seeds = _tree(client, state["parent_run_id"])
    assert {c.info.run_id for c in cells} == set(state["cell_runs"].values()) == {
        state["cell_runs"]["centre"], state["cell_runs"]["baseline"]}  # the one cell, and the baseline's
    assert {c.info.status for c in cells + seeds} == {"KILLED"}
    assert [s.data.tags["asda.cell"] for s in seeds] == ["centre"]  # the trial's run, under its cell's
    return folder, state


def test_a_stopped_sweep_is_marked_killed_and_the_plain_command_resumes_it(ray_local, tracking_store,
                                                                           synthetic_prepared, tmp_path):
    """SIGTERM to `asda sweep` mid-trial: exit 143, no result for the unfinished trial, its run and the parent
    KILLED, and the printed command; the same command again finishes the sweep in the same folder."""
    storage = tmp_path / "sweeps"
    grid = _retry_grid(tmp_path, synthetic_prepared, steps=1000)  # still training when the signal comes
    proc = _sweep_command(grid, storage, _joining(ray_local))
    try:
        _first_checkpoint(storage)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_group(proc, signal.SIGKILL)
    folder, state = _stopped_by(signal.SIGTERM, proc, out, storage)
    client = MlflowClient()
    again = run_sweep(grid, storage=storage)
    assert again["dir"] == str(folder) and again["parent_run_id"] == state["parent_run_id"]
    assert again["trials"][0]["metric_value"] is not None
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    # the same cell runs, FINISHED with the resumed trial's numbers; the trial's run still under its cell's
    assert json.loads((folder / "sweep.json").read_text())["cell_runs"] == state["cell_runs"]
    cells, seeds = _tree(client, state["parent_run_id"])
    assert {c.info.status for c in cells} == {"FINISHED"} and len(cells) == 2
    centre = client.get_run(state["cell_runs"]["centre"]).data.metrics
    assert centre["eval_accuracy_mean"] == again["trials"][0]["metric_value"] and centre["eval_accuracy_n"] == 1


def test_a_sweep_whose_driver_was_killed_outright_closes_its_orphaned_runs_and_resumes(
        ray_local, tracking_store, synthetic_prepared, tmp_path, capsys):
    """SIGKILL to the driver of `asda sweep` (nothing of it can clean up): its trial run and the parent stay
    RUNNING. The plain command again picks that unfinished sweep, marks the orphaned run KILLED and says so,
    then runs the trial to the end in the same run: one run per trial, nothing left RUNNING."""
    storage = tmp_path / "sweeps"
    grid = _retry_grid(tmp_path, synthetic_prepared, steps=40)  # the first checkpoint comes at update 4
    proc = _sweep_command(grid, storage, _joining(ray_local))
    try:
        _first_checkpoint(storage)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        stop_group(proc, signal.SIGKILL)
    folder = next(p for p in storage.iterdir() if p.is_dir())  # beside it: the sweep's lock
    state = json.loads((folder / "sweep.json").read_text())
    client = MlflowClient()
    experiment = [client.get_run(state["parent_run_id"]).info.experiment_id]
    trials = f"tags.`asda.sweep` = '{state['sweep_id']}' and tags.`asda.kind` = 'sweep-trial'"
    orphans = client.search_runs(experiment, filter_string=trials)
    assert [r.info.status for r in orphans] == ["RUNNING"] and not state.get("finished")
    cells, _ = _tree(client, state["parent_run_id"])
    assert {c.info.status for c in cells} == {"RUNNING"} and len(cells) == 2  # the centre's and the baseline's
    again = run_sweep(grid, storage=storage)
    out = capsys.readouterr().out
    assert f"closed     1 run(s) an earlier driver left RUNNING (marked KILLED; the trials start again): " \
           f"{orphans[0].info.run_name}" in out, out[-3000:]
    assert again["dir"] == str(folder) and again["parent_run_id"] == state["parent_run_id"]
    assert again["trials"][0]["metric_value"] is not None
    cells, runs = _tree(client, state["parent_run_id"])
    trial_runs = [r for r in runs if r.data.tags.get("asda.kind") == "sweep-trial"]
    assert [r.info.run_id for r in trial_runs] == [orphans[0].info.run_id]  # the trial resumed its own run
    assert {c.info.run_id for c in cells} == set(state["cell_runs"].values())  # and the cells theirs
    assert {r.info.status for r in cells + runs} == {"FINISHED"}
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"


def test_a_sweep_on_its_own_ray_instance_listens_on_loopback_only_and_stops_cleanly_on_ctrl_c(
        tracking_store, synthetic_prepared, tmp_path):
    """`asda sweep` with no RAY_ADDRESS starts its own Ray instance: while a trial trains, no process of the
    command (driver, GCS, raylet, agents, workers, trials) listens on anything but 127.0.0.1. Ctrl+C then (SIGINT
    to the command's whole process group, as a terminal sends it) stops it as SIGTERM does: exit 130, the trial's
    run and the parent KILLED, no result for the trial, and the command that resumes it."""
    storage = tmp_path / "sweeps"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the sweep starts its own instance
    proc = _sweep_command(_retry_grid(tmp_path, synthetic_prepared, steps=5000), storage, env)  # still training
    try:
        _first_checkpoint(storage)
        sockets = listening_sockets(session_members(proc.pid))
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop_group(proc, signal.SIGKILL)
    assert len(sockets) >= 3, sockets  # GCS, raylet, dashboard at least: the check saw the instance
    loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
    exposed = [(pid, address) for pid, address in sockets if not address.startswith(loopback)]
    assert not exposed, exposed
    _stopped_by(signal.SIGINT, proc, out, storage)


def test_smoke_grid_end_to_end_with_nested_runs_and_report(ray_local, tracking_store, tmp_path, capsys):
    from pipelines.runtime import auth_token_path

    result = run_sweep("smoke", storage=tmp_path)
    children = _check_sweep(result)
    assert auth_token_path().stat().st_mode & 0o777 == 0o600  # the dashboard's token is its owner's alone
    # One trial again, as the report's command says, standalone: the same weights and numbers to the bit (its
    # read-out cells included), its runs outside the sweep's tree.
    assert reproduce_command(result["dir"], "centre", 0) in (Path(result["dir"]) / "report" / "report.md").read_text()
    rerun = reproduce(result["dir"], "centre", 0)
    assert rerun["matched"], rerun["compared"]
    assert {c["what"] for c in rerun["compared"]} >= {"encoder weights", "pretrain_loss", "readout=mean: eval_accuracy"}
    assert MlflowClient().get_run(rerun["run_id"]).data.tags.get("mlflow.parentRunId") is None
    # the baseline's runs are named after their cell run
    assert {MlflowClient().get_run(r["run_id"]).info.run_name for r in result["baseline"]} == {"random init · seed 0"}
    # Running the same grid again resumes it: nothing is redone.
    again = run_sweep("smoke", storage=tmp_path)
    assert again["parent_run_id"] == result["parent_run_id"]
    assert [r["run_id"] for r in again["baseline"]] == [r["run_id"] for r in result["baseline"]]  # cached
    cells, seeds = _tree(MlflowClient(), result["parent_run_id"])
    assert {r.info.run_id for r in cells + seeds} == {r.info.run_id for r in children}
    # Tune's state cut off mid-write (as a full disk leaves it): the sweep's own records keep every finished
    # trial, so the same command resumes it, says so, trains nothing again and ends with the same numbers.
    state_file = next((Path(result["dir"]) / "tune").glob("experiment_state-*.json"))
    state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    damaged = run_sweep("smoke", storage=tmp_path)
    assert "does not read" in capsys.readouterr().out
    assert _numbers(damaged) == _numbers(result) and damaged["parent_run_id"] == result["parent_run_id"]
    assert {t["run_id"] for t in damaged["trials"]} == {t["run_id"] for t in result["trials"]}
    assert MlflowClient().get_run(result["parent_run_id"]).info.status == "FINISHED"
    # A disk that filled before Tune first saved its state leaves tuner.pkl alone: set aside too, not restored
    # into a Tune that would start its trials over without their settings.
    (Path(result["dir"]) / "tune").mkdir()
    shutil.copy(next(Path(result["dir"]).glob("tune.damaged-*/tuner.pkl")), Path(result["dir"]) / "tune")
    bare = run_sweep("smoke", storage=tmp_path)
    assert "is incomplete (no experiment_state-*.json)" in capsys.readouterr().out
    assert _numbers(bare) == _numbers(result)
    # The same grid from scratch, one trial at a time instead of two: the same numbers to the bit (each trial's
    # torch thread count is the grid's, not a share of the cores). Where a tmpfs can be mounted, into 3 MB: the
    # disk fills, the sweep stops with one line naming its folder and the space free, its runs FAILED; with space
    # again the same command resumes it to those same numbers.
    with tmpfs_at(tmp_path / "alone", "3m") as resize:
        if resize is not None:
            capsys.readouterr()
            assert main(["sweep", "--grid", "smoke", "--storage", str(tmp_path / "alone"),
                         "--max-concurrent", "1"]) == 1
            err = capsys.readouterr().err
            assert f"asda sweep: error: no space left on device writing {tmp_path / 'alone'}/smoke-" in err, err
            assert "free on" in err and "every finished trial is kept" in err and "Traceback" not in err, err
            state = json.loads(next((tmp_path / "alone").glob("*/sweep.json")).read_text())
            assert MlflowClient().get_run(state["parent_run_id"]).info.status == "FAILED"
            resize("64m")
        alone = run_sweep("smoke", storage=tmp_path / "alone", max_concurrent=1)
    assert _numbers(alone) == _numbers(result)


def _numbers(result) -> dict:
    return {(t["cell"], t["seed"]): (t["pretrain_loss"], t["metric_value"]) for t in result["trials"]} | {
        ("baseline", r["seed"]): r["metric_value"] for r in result["baseline"]}


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on loopback (its own data folder, port and process group); yields a URI."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine; .ci/run installs Debian's postgresql")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the PostgreSQL server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="asda-pg-", dir="/tmp"))
    if run_as:
        shutil.chown(data, user="postgres")
    port = free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "asda", "-A", "trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(
        [*run_as, str(bindir / "postgres"), "-D", str(data / "db"), "-h", "127.0.0.1", "-p", str(port),
         "-k", str(data), "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import psycopg

        deadline = time.time() + 120
        while True:
            try:
                conn = psycopg.connect(host="127.0.0.1", port=port, user="asda", dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql://asda@127.0.0.1:{port}/mlflow"
    finally:
        stop_group(proc, signal.SIGINT)  # PostgreSQL's fast shutdown
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow  # the PostgreSQL-backed test below covers the same HTTP path in the fast suite
def test_smoke_grid_logs_to_an_mlflow_server_over_http_and_says_when_it_goes_away_and_comes_back(
        ray_local, tmp_path, monkeypatch):
    """`asda sweep` against an MLflow server that stops for ~10 s after the first checkpoint and comes back on the
    same port with the same store: the terminal says so once each way, the trials wait and finish, every metric
    is logged once, and the sweep's runs are complete. (MLflow's backoff factor 1 instead of 2, so that calls waiting on the
    server retry within seconds of its return.)"""
    store, artifacts, port = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts", free_port()
    with mlflow_server_at(store, artifacts, tmp_path / "server.log", port=port) as url:
        env = {**_joining(ray_local), "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
        proc = subprocess.Popen([str(Path(sys.executable).with_name("asda")), "sweep", "--grid", "smoke",
                                 "--storage", str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        _first_checkpoint(tmp_path)
    try:
        time.sleep(10)
        with mlflow_server_at(store, artifacts, tmp_path / "server-again.log", port=port):
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-4000:]
            lines = out.splitlines()
            assert len([x for x in lines if f"tracking  {url} does not answer since " in x]) == 1, out[-4000:]
            assert len([x for x in lines if f"tracking  {url} answers again after " in x]) == 1, out[-4000:]
            monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
            result = run_sweep("smoke", storage=tmp_path)  # finished: nothing is redone
            children = _check_sweep(result)
            client = MlflowClient()
            for trial in result["trials"]:
                steps = [m.step for m in client.get_metric_history(trial["run_id"], "loss")]
                assert steps and len(steps) == len(set(steps)), steps  # each logged once
    finally:
        stop_group(proc, signal.SIGKILL)
    # What the test reads back came over HTTP from the server, and the artifacts live in its store.
    assert all(c.info.artifact_uri.startswith("mlflow-artifacts:") for c in children)
    assert any((tmp_path / "server-artifacts").rglob("report.md"))


def test_smoke_grid_logs_to_a_postgresql_backed_mlflow_server_read_back_over_rest(
        ray_local, postgres, tmp_path, monkeypatch, capsys):
    """Through a tracking URI with credentials in it (the server ignores them), which must never reach the
    screen, a file of the sweep, a run's params or Ray's session files."""
    secret = "s3cret-4a7f"
    with mlflow_server_at(postgres, tmp_path / "server-artifacts", tmp_path / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", f"http://alice:{secret}@"))
        result = run_sweep("smoke", storage=tmp_path / "sweeps")
        printed = capsys.readouterr()
        assert secret not in printed.out + printed.err and printed.out.strip()
        _check_sweep(result)
        # Read the nested runs back through the REST API itself, not the client library: parent -> cell -> seed.
        parent = result["parent_run_id"]
        experiment = _get(url, f"runs/get?run_id={parent}")["run"]["info"]["experiment_id"]
        cells = _search(url, experiment, f"tags.mlflow.parentRunId = '{parent}'")
        runs = [r for c in cells for r in _search(url, experiment, f"tags.mlflow.parentRunId = '{c['info']['run_id']}'")]
        grid = load_grid("smoke")  # the trials, and the baseline's probe with each seed, on the grid and each task
        assert len(cells) == 4  # centre, diff_lambda=0.0, readout=mean and the random-init baseline
        means = [{m["key"]: m["value"] for m in c["data"]["metrics"]}["eval_accuracy_mean"] for c in cells]
        assert all(0.0 <= v <= 1.0 for v in means) and secret not in json.dumps([c["data"] for c in cells])
        assert len(runs) == len(grid.trials()) + len(grid.seeds) * (1 + len(grid.tasks))
        for run in runs:
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            scored = [v for k, v in metrics.items() if k.endswith("eval_accuracy")]  # a task's: task_<name>/...
            assert scored and all(0.0 <= v <= 1.0 for v in scored)
            assert secret not in json.dumps(run["data"])  # params and tags
    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    holding = [str(f) for folder in (tmp_path / "sweeps", session) for f in folder.rglob("*")
               if f.is_file() and not f.is_symlink() and secret.encode() in f.read_bytes()]
    assert not holding, holding
    # The runs live in PostgreSQL: the server's tables hold them, not a file next to it.
    import psycopg

    conn = psycopg.connect(postgres)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs")
            assert cur.fetchone()[0] == len(runs) + len(cells) + 1  # the trials, their cells and the parent
    finally:
        conn.close()


def _get(url: str, path: str) -> dict:
    return json.load(urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}", timeout=30))


def _search(url: str, experiment_id: str, filter_string: str) -> list[dict]:
    body = json.dumps({"experiment_ids": [experiment_id], "filter": filter_string}).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", data=body,
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=30)).get("runs", [])  # none: the key is left out


def test_a_collapsing_cell_is_warned_of_before_it_starts_and_marked_in_the_console_the_runs_and_the_report(
        ray_local, tracking_store, synthetic_prepared, tmp_path, capsys):
    """Real trials: the release's sums at alpha 10 (160x the frame term per element) collapse within 40 updates,
    alpha 0 does not (tests/test_training.py measures both alone)."""
    grid = yaml.safe_load((Path(__file__).parents[1] / "sweeps" / "grids" / "smoke.yaml").read_text())
    grid.update(name="collapse", data={"prepared": str(synthetic_prepared)}, centre={"alpha": 0.0},
                factors={"alpha": [0.0, 10.0]})
    grid["model"]["overrides"]["loss_reduction"] = "release"
    grid["train"].update(steps=40, batch_size=8, lr=0.001, warmup_steps=4, log_every=10, checkpoint_every=40)
    path = tmp_path / "collapse.yaml"
    path.write_text(yaml.safe_dump(grid))
    result = run_sweep(path, storage=tmp_path / "sweeps")
    out = capsys.readouterr().out
    assert "warning: cell alpha=10.0: the utterance term weighs 160x the frame term" in out
    fallen = next(r for r in result["trials"] if r["cell"] == "alpha=10.0")
    healthy = next(r for r in result["trials"] if r["cell"] == "centre")
    assert fallen["collapse"].startswith("update ") and healthy["collapse"] is None
    assert f"COLLAPSED (collapse at {fallen['collapse']})" in out
    assert MlflowClient().get_run(fallen["run_id"]).data.tags["asda.collapsed"] == "true"
    assert MlflowClient().get_run(healthy["run_id"]).data.tags["asda.collapsed"] == "false"
    summary = json.loads((Path(result["dir"]) / "report" / "summary.json").read_text())
    collapsed = {c["value"]: c["collapsed"] for c in summary["cells"]}
    assert collapsed == {0.0: 0, 10.0: 1} and summary["collapsed_trials"] == ["alpha=10.0 seed 0"]
    assert "(**1 collapsed**)" in (Path(result["dir"]) / "report" / "report.md").read_text()


@pytest.mark.parametrize("stopped_by, status", [(RuntimeError("a fault"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_sweep_that_stops_on_an_error_leaves_no_run_of_it_running(tracking_store, stopped_by, status):
    """Whatever stops the driver once its parent run exists (the baseline, the report, the tracking store), the
    parent run and the runs still running under it end FAILED (KILLED for Ctrl+C), never RUNNING; finished runs
    keep their status."""
    from pipelines import tracking
    from sweeps.driver import _parent_closed_on_failure

    experiment = tracking.setup("stopped-sweep")  # before the client: it reads the tracking URI when created
    client = MlflowClient()
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    under = {tracking.TAG_PARENT: parent}
    cell = client.create_run(experiment, run_name="cell", tags={**under, "asda.kind": "cell"}).info.run_id
    trial = client.create_run(experiment, run_name="seed", tags={tracking.TAG_PARENT: cell,
                                                                 "asda.kind": "sweep-trial"}).info.run_id
    done = client.create_run(experiment, run_name="done", tags={**under, "asda.kind": "probe"}).info.run_id
    client.set_terminated(done, "FINISHED")
    with pytest.raises(type(stopped_by)), _parent_closed_on_failure({"parent_run_id": parent}):
        raise stopped_by
    assert [client.get_run(r).info.status for r in (parent, cell, trial, done)] == [status] * 3 + ["FINISHED"]


def test_a_tune_state_without_its_experiment_state_or_cut_off_is_not_resumed_from(tmp_path):
    """A full disk can stop Tune after tuner.pkl and before its first experiment_state-*.json, or midway through
    one: either way the state is named as not resumable (Tune would start its trials over without their
    settings), while a whole one, or none at all, is resumed from as it is."""
    from sweeps.driver import _tune_state_problem

    tune = tmp_path / "tune"
    assert _tune_state_problem(tune) is None
    tune.mkdir()
    assert "no tuner.pkl" in _tune_state_problem(tune)
    (tune / "tuner.pkl").write_bytes(b"\x80\x05N.")
    assert "no experiment_state-*.json" in _tune_state_problem(tune)
    (tune / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    assert "does not read" in _tune_state_problem(tune)
    (tune / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert _tune_state_problem(tune) is None
