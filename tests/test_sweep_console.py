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
