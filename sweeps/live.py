"""The sweep's parent run describes the sweep while it runs: a table of the cells so far (seeds finished, the
metric's mean ± std over them), rewritten as each trial ends, so the MLflow UI shows where a sweep stands before
its report exists. The report replaces it with the full table (``report.parent_note``) at the end."""

from __future__ import annotations

import statistics
from typing import Any

from ray.tune import Callback

from pipelines import tracking

from .grid import Trial


def progress_note(grid_name: str, metric: str, total: int, values: dict[str, list[float]], ended: int,
                  failed: int) -> str:
    """The parent's description while the sweep runs: ``ended`` of ``total`` trials have ended, ``failed`` of them
    failed; ``values`` maps a cell to its finished seeds' metric (a read-out cell's come with its centre trial)."""
    lines = [f"**Ablation {grid_name}, running**: {ended} of {total} trials ended"
             + (f" ({failed} failed)" if failed else "") + f". `{metric}` so far, mean ± std over the seeds that "
             "finished; the report's table, with the random-init baseline, Δ vs the centre and its verdicts, "
             "replaces this when the sweep ends.", "", f"| cell | seeds | {metric} |", "|---|---|---|"]
    for cell, found in sorted(values.items(), key=lambda item: (item[0] != "centre", item[0])):
        spread = f" ± {statistics.stdev(found):.3f}" if len(found) > 1 else ""
        lines.append(f"| {cell} | {len(found)} | {statistics.fmean(found):.3f}{spread} |")
    return "\n".join(lines)


class LiveNote(Callback):
    """Rewrites the parent run's description after each trial ends (``progress_note``); a tracking store that
    refuses it costs the description, never the sweep."""

    def __init__(self, parent_run_id: str, grid_name: str, metric: str, total: int):
        self.parent_run_id, self.grid_name, self.metric, self.total = parent_run_id, grid_name, metric, total
        self.values: dict[str, list[float]] = {}
        self.ended = self.failed = 0
        self.counted_earlier = False

    def on_step_begin(self, iteration, trials, **info):
        """A resumed sweep's trials that ended before it was stopped count too (Tune calls no ending for them)."""
        if self.counted_earlier:
            return
        self.counted_earlier = True
        for trial in trials:
            if trial.status == "TERMINATED":
                self._count(trial)
            elif trial.status == "ERROR":
                self.ended, self.failed = self.ended + 1, self.failed + 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._count(trial)
        self._write()

    def _count(self, trial) -> None:
        result: dict[str, Any] = trial.last_result or {}
        own = Trial(**trial.config["trial"])
        scored = {own.cell: result.get(self.metric), **{cell: (m or {}).get(self.metric)
                                                         for cell, m in (result.get("also") or {}).items()}}
        for cell, value in scored.items():
            if isinstance(value, int | float):
                self.values.setdefault(cell, []).append(float(value))
        self.ended += 1

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1
        self.failed += 1
        self._write()

    def _write(self) -> None:
        from mlflow import MlflowClient

        note = progress_note(self.grid_name, self.metric, self.total, self.values, self.ended, self.failed)
        try:
            MlflowClient().set_tag(self.parent_run_id, "mlflow.note.content", note[: tracking.NOTE_LIMIT])
        except Exception:  # the tracking server is away: the next trial's end writes it again
            pass
