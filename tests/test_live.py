"""While a sweep runs, its parent run's description shows the cells so far (sweeps.live), on a real sqlite store."""

from types import SimpleNamespace

from mlflow import MlflowClient

from pipelines import tracking
from sweeps.live import LiveNote, progress_note


def _trial(cell: str, seed: int, value, also=None):
    trial = {"cell": cell, "factor": "centre" if cell == "centre" else "diff_lambda", "value": None, "seed": seed,
             "overrides": {}}
    return SimpleNamespace(config={"trial": trial}, last_result={"eval_accuracy": value, "also": also or {}})


def test_the_parent_run_shows_each_cells_finished_seeds_as_trials_end(tracking_store):
    experiment_id = tracking.setup("live-note")
    client = MlflowClient()
    parent = client.create_run(experiment_id, run_name="smoke · live").info.run_id
    live = LiveNote(parent, "smoke", "eval_accuracy", total=4)
    live.on_trial_complete(0, [], _trial("centre", 0, 0.6, also={"readout=mean": {"eval_accuracy": 0.5}}))
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "1 of 4 trials ended" in note and "| centre | 1 | 0.600 |" in note and "| readout=mean | 1 | 0.500 |" in note
    live.on_trial_complete(0, [], _trial("centre", 1, 0.64))
    live.on_trial_error(0, [], _trial("diff_lambda=0.0", 0, None))
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "3 of 4 trials ended (1 failed)" in note and "| centre | 2 | 0.620 ± 0.028 |" in note


def test_a_trial_without_the_metric_is_counted_but_not_averaged():
    note = progress_note("smoke", "eval_accuracy", 3, {"centre": [0.5]}, ended=2, failed=0)
    assert "2 of 3 trials ended" in note and note.splitlines()[-1] == "| centre | 1 | 0.500 |"
