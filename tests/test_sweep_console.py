"""The sweep's terminal never waits in silence: trials that cannot start are named with what they ask of Ray."""

import pytest

pytestmark = pytest.mark.ray


def _never_runs(config):
    return {"m": 1.0}


def test_trials_that_cannot_start_are_reported_with_what_they_ask_and_what_ray_has(ray_local, tmp_path, capsys):
    from ray import tune

    from sweeps.console import SweepConsole

    trainable = tune.with_resources(_never_runs, {"CPU": 64})  # more than the 4 CPUs of the test's instance
    tuner = tune.Tuner(trainable, param_space={"trial": {"cell": "centre", "factor": "centre", "value": None,
                                                         "seed": 0, "overrides": {}}},
                       tune_config=tune.TuneConfig(num_samples=1, time_budget_s=6),
                       run_config=tune.RunConfig(name="waiting", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[SweepConsole(1, "m", wait_notice_s=2.0)]))
    tuner.fit()
    out = capsys.readouterr().out
    assert "waiting   1 trial(s) pending and none running for 0:0" in out, out
    assert "a trial asks CPU 64; Ray has CPU" in out and "free of CPU 4" in out, out


def _holds_every_cpu(config):
    import time

    time.sleep(8)
    return {"m": 1.0}


def test_running_trials_that_leave_ray_data_no_cpu_are_reported(ray_local, tmp_path, capsys):
    """A trial holding every CPU of the instance (as trials retried onto the nodes left after one is lost can):
    the reads that would feed it wait for a CPU, and the console says so each minute (here each 2 s)."""
    import sys

    from ray import cloudpickle, tune

    from sweeps.console import SweepConsole

    trainable = tune.with_resources(_holds_every_cpu, {"CPU": 4})  # the 4 CPUs of the test's instance
    tuner = tune.Tuner(trainable, param_space={"trial": {"cell": "centre", "factor": "centre", "value": None,
                                                         "seed": 0, "overrides": {}}},
                       run_config=tune.RunConfig(name="starved", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[SweepConsole(1, "m", wait_notice_s=2.0)]))
    module = sys.modules[__name__]  # not importable on Ray's workers: the trainable travels by value
    cloudpickle.register_pickle_by_value(module)
    try:
        tuner.fit()
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    out = capsys.readouterr().out
    assert "waiting   1 trial(s) running and none has ended for 0:0" in out, out
    assert "with Ray's CPUs all taken: 0 free of 4, and a Ray Data task that feeds a trial takes 0.25" in out, out


def test_under_tune_the_parent_runs_description_follows_the_trials_as_they_end(ray_local, tracking_store,
                                                                                tmp_path):
    from mlflow import MlflowClient
    from ray import tune

    from pipelines import tracking
    from sweeps.live import LiveNote

    def _scores(config):  # defined here: pickled by value, as the trial processes cannot import the test module
        return {"m": 0.5 + 0.1 * config["trial"]["seed"]}

    client = MlflowClient()
    parent = client.create_run(tracking.setup("live-tune"), run_name="live · tune").info.run_id
    trials = [{"cell": "centre", "factor": "centre", "value": None, "seed": s, "overrides": {}} for s in (0, 1)]
    tuner = tune.Tuner(_scores, param_space={"trial": tune.grid_search(trials)},
                       run_config=tune.RunConfig(name="live", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[LiveNote(parent, "live", "m", total=2)]))
    tuner.fit()
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "2 of 2 trials ended" in note and "| centre | 2 | 0.550 ± 0.071 |" in note, note


def test_on_a_quiet_driver_what_ray_publishes_to_drivers_goes_to_rays_logs_not_the_terminal(ray_local, monkeypatch,
                                                                                             capsys):
    """The raylet's warnings reach a driver through Ray's error listener, which log_to_driver=False leaves on."""
    import logging
    import time
    from pathlib import Path

    from ray._private import utils, worker

    from pipelines import console

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # put back afterwards
    for name in console.RAY_DRIVER_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        monkeypatch.setattr(logging.getLogger(name), "handlers", [])
    console.keep_ray_messages_in_logs(True)
    messages = Path(worker.global_worker.node.get_logs_dir_path()) / console.RAY_MESSAGES_FILE
    text = "WARNING: 9 PYTHON worker processes have been started on node: test"
    utils.publish_error_to_driver("worker_pool_large", text, worker.global_worker.gcs_client)
    logging.getLogger("ray.tune.tune").error("Trials did not complete: [t]")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and text not in (messages.read_text() if messages.exists() else ""):
        time.sleep(0.1)
    kept = messages.read_text()
    assert f"(raylet) {text}" in kept and "ERROR ray.tune.tune Trials did not complete: [t]" in kept, kept
    out = capsys.readouterr()
    assert text not in out.out + out.err and "Trials did not complete" not in out.out + out.err

    console.keep_ray_messages_in_logs(False)  # --verbose: the terminal again
    utils.publish_error_to_driver("worker_pool_large", text + " again", worker.global_worker.gcs_client)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "again" not in capsys.readouterr().out:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "the listener did not print once verbose again"
    assert "again" not in messages.read_text()


def test_the_reason_is_read_from_the_error_file_tune_has_just_written_and_an_oom_kill_tags_the_run(
        tracking_store, tmp_path):
    """Tune writes a failure into the trial's folder on the driver before it calls back; its storage's copy
    (``get_error``) comes at the next sync. An OOM kill also tags the trial's RUNNING run."""
    from types import SimpleNamespace

    from mlflow import MlflowClient
    from test_memory import RAY_OOM

    from pipelines import tracking
    from sweeps import console

    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at 2026-01-01_00-00-00)\nValueError: bad value\n"
                          f"Failure # 2 (occurred at 2026-01-01_00-01-00)\n{RAY_OOM}\n")
    trial = SimpleNamespace(error_file=str(error_file), get_error=lambda: None, config={"trial": {
        "cell": "alpha=1.0", "factor": "alpha", "value": 1.0, "seed": 1, "overrides": {"alpha": 1.0}}})
    assert console._reason(trial) == "out of memory (22.9 GB used of 23.5)"
    error_file.write_text(f"Failure # 1 (occurred at 2026-01-01_00-00-00)\n{RAY_OOM}\n"
                          "Failure # 2 (occurred at 2026-01-01_00-01-00)\nTraceback ...\nValueError: bad value\n")
    assert console._reason(trial) == "ValueError: bad value"  # the latest failure, not an earlier one
    died = ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit "
            "detail: Worker unexpectedly exits with a connection error code 2. End of file. Some common causes "
            "include: (1) the process was killed by the OOM killer due to high memory usage, (2) ray stop --force")
    error_file.write_text(f"Failure # 1 (occurred at 2026-01-01_00-00-00)\n{died}\n")
    assert console._reason(trial) == died[:died.index(" Some common")]  # its facts, not Ray's guesses
    assert console._reason(SimpleNamespace(error_file=None, get_error=lambda: None)).startswith(
        "its process failed")

    client = MlflowClient()
    experiment = tracking.setup("failure-tag")
    parent = client.create_run(experiment, tags={tracking.TAG_SWEEP: "s-1"}).info.run_id
    tags = {tracking.TAG_SWEEP: "s-1", tracking.TAG_CELL: "alpha=1.0", tracking.TAG_SEED: "1",
            tracking.TAG_KIND: tracking.KIND_TRIAL}
    other = client.create_run(experiment, tags={**tags, tracking.TAG_SEED: "0"}).info.run_id
    run = client.create_run(experiment, tags=tags).info.run_id
    assert console.record_failure(parent, trial.config, "out of memory (22.9 GB used of 23.5)") == run
    assert client.get_run(run).data.tags[console.TAG_FAILURE] == "out of memory (22.9 GB used of 23.5)"
    assert console.TAG_FAILURE not in client.get_run(other).data.tags
    assert console.record_failure("no-such-run", trial.config, "out of memory") is None  # never raises
    assert console.record_failure(None, trial.config, "out of memory") is None


class _FailedTrial:
    """What the console reads of a failed Tune trial: its folder and its error file."""

    def __init__(self, path, error_file=None):
        self.path, self.error_file = str(path), error_file and str(error_file)

    def get_error(self):
        return None


def test_a_trial_that_failed_for_want_of_space_says_so_naming_its_folder_and_the_space_free(small_disk, tmp_path):
    """torch.save's full disk says only "unexpected pos": on a full file system the trial's line names the space;
    a trial whose error Tune could not even write says the same; elsewhere the error stands as it is."""
    from sweeps.console import _reason

    mnt, _ = small_disk
    (mnt / "filler").write_bytes(b"\0" * (3 * 2**20 - 64 * 1024))  # the tmpfs all but full
    error = tmp_path / "error.txt"
    error.write_text("Failure # 1 (occurred at 2026-12-05)\nRuntimeError: [enforce fail at inline_container.cc:672]"
                     " . unexpected pos 840640 vs 840528\n")
    reason = _reason(_FailedTrial(mnt / "trial", error))
    assert reason.startswith(f"no space left on device under {mnt}/trial: ") and f"KB free on {mnt}" in reason
    assert _reason(_FailedTrial(mnt / "trial")).startswith("no space left on device under ")
    assert "unexpected pos" in _reason(_FailedTrial(tmp_path / "trial", error))  # plenty of space there
