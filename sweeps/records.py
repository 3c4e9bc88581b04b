"""The sweep's own record of its finished trials: one JSON file per trial in ``<sweep>/records/``, written (aside,
then renamed) the moment Tune reports the trial complete. With trials.json and MLflow it is the sweep's truth;
Tune's own state (``<sweep>/tune``) only speeds a resume. A Tune state cut off mid-write (a full disk) or lost
costs the sweep nothing finished: the trials these files name are not run again."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .grid import Trial

RECORDS_DIR = "records"
# What Tune adds to every result and the sweep does not keep (the config is the record's own "trial").
TUNE_KEYS = ("config", "trial_id", "experiment_tag", "date", "timestamp", "pid", "hostname", "node_ip",
             "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint")


class TrialRecords(Callback):
    """Writes ``<folder>/records/<trial slug>.json`` = {"trial", "metrics"} for each trial that completes with
    the grid's ``metric`` (a trial stopped early by ASHA has none, and is not a finished trial)."""

    def __init__(self, folder: Path, metric: str):
        self.folder, self.metric = Path(folder), metric

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if result.get(self.metric) is None:
            return
        write(self.folder, trial.config["trial"], result)


def write(folder: Path, trial: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """One trial's record, complete or absent: written beside its place and renamed into it."""
    kept = {k: v for k, v in metrics.items() if k not in TUNE_KEYS}
    path = Path(folder) / RECORDS_DIR / f"{Trial(**trial).slug()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(json.dumps({"trial": trial, "metrics": kept}, indent=1, default=str))
    os.replace(staging, path)
    return path


def recorded(folder: Path) -> dict[str, dict[str, Any]]:
    """slug -> {"trial", "metrics"} of every finished trial the sweep recorded. A file that does not read (written
    by hand, or by a disk that lost it) is named on stderr and left out: its trial runs again."""
    found = {}
    for path in sorted((Path(folder) / RECORDS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            found[Trial(**record["trial"]).slug()] = record
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"  ignoring  {path}: it does not read as a trial's record ({type(exc).__name__}); that trial "
                  f"runs again", file=sys.stderr, flush=True)
    return found


class RecordedResult:
    """A recorded trial in the shape of a Tune result (``metrics``, ``config``, ``error``), so that the sweep
    collects it with the trials Tune ran."""

    def __init__(self, record: dict[str, Any]):
        self.metrics, self.config, self.error = record["metrics"], {"trial": record["trial"]}, None
