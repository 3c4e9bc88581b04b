"""A trial's memory is measured once per grid and sweep folder, caps how many trials run at once, and a trial that
Ray's memory monitor killed is named as out of memory, with the node's memory at the kill."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from model import ASDAConfig
from pipelines.pretrain import PretrainSettings
from sweeps import memory
from sweeps.memory import GB, TrialMemory, memory_cap, memory_line, oom_reason

REPO = Path(__file__).resolve().parents[1]
# Ray 2.60's raylet, word for word, as an OutOfMemoryError and a Tune trial's error file carry it (shortened).
RAY_OOM = ("1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: "
           "9f1d6197f02d435c3300ef25e5e659cadf019c36370833f5b9d1a814) was 22.91GB used / 23.54GB limit (0.973)\n"
           "OOM kill reason: Memory usage 24599519232B exceeded threshold of 24012392857B (95.0% of 25276203008B "
           "limit)\nRay killed 1 worker(s) based on the killing policy")


def _tiny(frames: int = 112) -> ASDAConfig:
    return dataclasses.replace(ASDAConfig.preset("tiny"), target_length=frames)


def test_the_cap_is_how_many_trials_fit_in_the_margin_of_free_memory_and_never_less_than_one():
    assert memory_cap(1 * GB, 20 * GB, margin=0.8) == 16
    assert memory_cap(1 * GB, 20 * GB, margin=0.5) == 10
    assert memory_cap(3 * GB, 10 * GB, margin=0.9) == 3  # 9 GB hold three, not 3.33
    assert memory_cap(30 * GB, 20 * GB) == 1  # one that does not fit alone still runs, alone
    assert memory_cap(1 * GB, 0) == 1
    with pytest.raises(ValueError, match="per_trial_bytes"):
        memory_cap(0, 20 * GB)


def test_a_trial_is_its_workers_and_where_it_does_not_train_itself_its_own_process_and_controller():
    assert TrialMemory.compose(2 * GB, GB // 2, 1, True, "x").per_trial == 2 * GB  # local mode: one process
    assert TrialMemory.compose(2 * GB, GB // 2, 4, False, "x").per_trial == 4 * 2 * GB + 2 * GB // 2


def test_the_header_line_names_the_peak_where_it_comes_from_the_free_memory_and_the_cap(monkeypatch):
    trial = TrialMemory.compose(int(1.3 * GB), GB // 2, 1, True, "measured: one update of the grid's model")
    monkeypatch.setattr(memory, "local_available", lambda: int(20.1 * GB))
    cap, line = memory_line(trial, local=True)
    assert cap == 12
    assert line == ("memory     one trial peaks at ~1.3 GB (measured: one update of the grid's model); 20.1 GB free "
                    "on this node: at most 12 at a time"), line
    cap, line = memory_line(trial, local=False, nodes=[10 * GB, 4 * GB])  # per node: 6 and 2
    assert cap == 8 and "2 node(s) with 14.0 GB of Ray memory (the largest 10.0 GB): at most 8 at a time" in line
    cap, line = memory_line(dataclasses.replace(trial, per_trial=40 * GB), local=True)
    assert cap == 1 and "not even one fits in 80% of it: one at a time" in line, line


def test_the_free_memory_of_this_machine_is_positive_and_below_its_total():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory.local_available() <= total


def test_one_update_of_the_tiny_model_is_measured_once_and_kept_in_the_sweep_folder(tmp_path, monkeypatch):
    settings = PretrainSettings(data="-", batch_size=4, workers=1, in_process=True)
    found = memory.trial_memory(_tiny(), settings, tmp_path)
    assert found.how.startswith("measured: one update of the 128-wide, 4-layer model with 4 students at batch 4, "
                                "112 frames"), found.how
    # torch, Ray and MLflow imported (~0.7 GB), then the model and one update on top of them
    assert 200 * 2**20 < found.overhead < found.per_worker < 4 * GB, found
    assert found.per_trial == found.per_worker  # in process: the trial is its one worker
    kept = json.loads((tmp_path / memory.MEMORY_FILE).read_text())
    assert len(kept) == 1 and next(iter(kept.values()))["spec"]["batch_size"] == 4

    def no_subprocess(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert memory.trial_memory(_tiny(), settings, tmp_path) == found  # a resumed sweep reads it back


def test_where_the_measurement_fails_the_estimate_stands_in_and_says_so_and_is_not_kept(tmp_path, monkeypatch):
    def fails(spec, **kwargs):
        raise memory.MeasureFailed("the measuring process failed (ImportError)")

    monkeypatch.setattr(memory, "measure_update", fails)
    settings = PretrainSettings(data="-", batch_size=4, workers=4)
    found = memory.trial_memory(_tiny(), settings, tmp_path)
    assert found.how.startswith("estimated from the model's size (0.9 M trained parameters); measuring failed: "
                                "the measuring process failed (ImportError)"), found.how
    assert found.per_trial == 4 * found.per_worker + 2 * found.overhead
    assert not (tmp_path / memory.MEMORY_FILE).exists()  # the next run measures again


def test_a_measurement_that_outgrows_its_limit_is_stopped_and_counts_as_at_least_that_much(tmp_path):
    settings = PretrainSettings(data="-", batch_size=4)
    started = time.monotonic()
    found = memory.trial_memory(_tiny(), settings, tmp_path, limit_bytes=64 * 2**20)  # its imports outgrow it
    assert time.monotonic() - started < 30
    assert "outgrew" in found.how and found.per_worker >= 64 * 2**20, found
    assert found.per_worker >= memory.estimate_from_size(_tiny(), settings).per_worker


def test_the_estimate_from_the_models_size_grows_with_the_students_batch_and_frames():
    settings = PretrainSettings(data="-", batch_size=8)
    base = memory.estimate_from_size(_tiny(), settings).per_worker
    assert memory.FALLBACK_OVERHEAD < base < 2 * GB
    assert memory.estimate_from_size(dataclasses.replace(_tiny(), num_students=8), settings).per_worker > base
    assert memory.estimate_from_size(_tiny(256), settings).per_worker > base
    assert memory.estimate_from_size(_tiny(), dataclasses.replace(settings, batch_size=16)).per_worker > base


def test_the_grids_heaviest_cell_is_measured_at_its_frames(tmp_path, monkeypatch):
    from sweeps.grid import load_grid

    seen = []
    monkeypatch.setattr(memory, "trial_memory", lambda config, settings, folder, **kw: seen.append(
        (config, settings)) or "measured")
    assert memory.grid_memory(load_grid("ablation"), tmp_path) == "measured"
    config, settings = seen[0]
    assert config.num_students == 8 and config.target_length == 256  # the most students; no card: the model's
    assert settings.batch_size == 8 and settings.in_process and settings.workers == 1


def test_a_sweep_measures_only_where_the_estimate_comes_near_the_free_memory(tmp_path, monkeypatch):
    """Twice the model-size estimate fits every trial the sweep wants at once: the estimate stands, said so, and
    no process is started; a sweep that wants more than fit is measured (here: the measurement's stand-in)."""
    from sweeps.grid import load_grid

    grid = load_grid("ablation")
    cap, line = memory.sweep_memory(grid, tmp_path, None, 2, local=True)
    assert cap >= 2 and "estimated from the model's size" in line and "2 at twice that fit, so it was not measured" \
        in line and not (tmp_path / memory.MEMORY_FILE).exists()
    measured = TrialMemory.compose(2 * GB, GB, 1, True, "measured: one update")
    monkeypatch.setattr(memory, "trial_memory", lambda *a, **k: measured)
    cap, line = memory.sweep_memory(grid, tmp_path, None, 10**6, local=True)
    assert "measured: one update" in line and cap == memory.memory_cap(2 * GB, memory.local_available())


def test_ray_s_out_of_memory_account_reads_as_out_of_memory_with_the_nodes_memory():
    from ray.exceptions import OutOfMemoryError, RayTaskError

    assert oom_reason(RAY_OOM) == "out of memory (22.9 GB used of 23.5)"
    assert oom_reason(OutOfMemoryError(RAY_OOM)) == "out of memory (22.9 GB used of 23.5)"
    assert oom_reason(OutOfMemoryError("killed")) == "out of memory"  # the type alone says it
    try:
        try:
            raise OutOfMemoryError(RAY_OOM)
        except OutOfMemoryError as exc:
            raise RuntimeError("Training failed") from exc
    except RuntimeError as wrapped:
        assert oom_reason(wrapped) == "out of memory (22.9 GB used of 23.5)"
    two = RAY_OOM.replace("22.91GB", "20.02GB") + "\n...\n" + RAY_OOM  # a retried trial's file: the latest counts
    assert oom_reason(two) == "out of memory (22.9 GB used of 23.5)"
    assert oom_reason(RayTaskError("f", "Traceback ...", ValueError("bad value"))) is None
    assert oom_reason("ValueError: bad value") is None and oom_reason(None) is None


# Its own Ray instance (the memory monitor reads its settings when Ray starts), with a threshold every node is
# above: Ray's memory monitor kills any worker that runs a task, here the trial's actor. The console's lines and
# the tag on the trial's run are what a sweep's driver shows and records.
_KILLED_TRIAL = textwrap.dedent("""
    import sys, time
    from pipelines.console import set_verbose
    set_verbose(False)
    import ray
    from mlflow import MlflowClient
    from ray import tune
    from pipelines import tracking
    from sweeps.console import SweepConsole, TAG_FAILURE

    client = MlflowClient(tracking.tracking_uri())
    experiment = tracking.setup("oom")
    parent = client.create_run(experiment, tags={tracking.TAG_SWEEP: "oom-1"}).info.run_id
    run = client.create_run(experiment, tags={tracking.TAG_SWEEP: "oom-1", tracking.TAG_CELL: "centre",
                                              tracking.TAG_SEED: "0", tracking.TAG_KIND: tracking.KIND_TRIAL})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[1])

    def hold(config):
        block = bytearray(256 * 2**20)
        time.sleep(60)

    trial = {"cell": "centre", "factor": "centre", "value": None, "seed": 0, "overrides": {}}
    tune.Tuner(hold, param_space={"trial": trial}, run_config=tune.RunConfig(
        name="oom", storage_path=sys.argv[2], verbose=0, failure_config=tune.FailureConfig(max_failures=1),
        callbacks=[SweepConsole(1, "m", parent_run_id=parent)])).fit()
    print("tag:", client.get_run(run.info.run_id).data.tags.get(TAG_FAILURE), flush=True)
    ray.shutdown()
""")


@pytest.mark.ray
def test_a_trial_rays_memory_monitor_killed_reads_out_of_memory_and_its_run_says_so(tmp_path, tmp_path_factory):
    from conftest import session_members, stop_group

    env = {**os.environ, "RAY_memory_usage_threshold": "0.001", "RAY_memory_monitor_refresh_ms": "50",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    ray_dir = tmp_path_factory.mktemp("oom")  # short: Ray's socket paths inside it have at most 107 bytes
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_TRIAL, str(ray_dir), str(tmp_path / "tune")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_group(proc)
        for pid in session_members(proc.pid):  # what the script's Ray instance left, and nothing else
            os.kill(pid, signal.SIGKILL)
    oom = r"out of memory \(\d+\.\d GB used of \d+\.\d\)"
    assert re.search(rf"retrying  centre seed 0 from its last checkpoint: {oom}\n", out), out
    assert re.search(rf"failed    centre seed 0: {oom}; log ", out), out
    assert re.search(rf"tag: {oom}\n", out), out  # the last failure's reason, on the trial's RUNNING run
    assert "(raylet)" not in out and "its process failed" not in out, out
