"""The sweep's terminal: one line per trial event (started, finished with its metric and time, failed with the
reason and where its log is) and an overall progress line with an ETA, as a Ray Tune callback."""

from __future__ import annotations

import time

from ray.tune import Callback

from pipelines.console import Progress, duration, plain

from .grid import Trial


def _name(trial) -> str:
    t = Trial(**trial.config["trial"])
    return f"{t.cell} seed {t.seed}"


WAIT_NOTICE_S = 60.0  # a sweep where no trial can start says why after this long, and again every as long


class SweepConsole(Callback):
    """Prints what happens to each trial, after each ending the sweep's progress (trials ended, ETA), and, when
    trials wait and none runs for ``wait_notice_s``, what they wait for (``waiting_line``)."""

    def __init__(self, total: int, metric: str, wait_notice_s: float = WAIT_NOTICE_S):
        self.total, self.metric, self.wait_notice_s = total, metric, wait_notice_s
        self.progress = Progress(total, "trials")
        self.started: dict[str, float] = {}
        self.last_event = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_event < self.wait_notice_s:
            return
        pending = [t for t in trials if t.status == "PENDING"]
        if pending and not any(t.status == "RUNNING" for t in trials):
            self._event(trials, waiting_line(pending, time.monotonic() - self.last_event))
        self.last_event = time.monotonic()

    def _event(self, trials, text: str, ending=None) -> None:
        self.last_event = time.monotonic()
        ended = _ended(trials, ending)
        if self.progress.tty:
            print("\r\033[K", end="")
        print(f"[{ended}/{self.total}] {text}", flush=True)
        if self.progress.tty:
            self.progress.update(ended)

    def _finished(self, trials, trial, text: str) -> None:
        self._event(trials, text, ending=trial)
        if not self.progress.tty:
            print(self.progress.line(_ended(trials, trial)), flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.perf_counter()
        self._event(trials, f"started   {_name(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._event(trials, f"retrying  {_name(trial)} from its last checkpoint: {_reason(trial)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        took = duration(time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter()))
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.3f}" if isinstance(value, float) else f"no {self.metric}"
        collapse = f"; COLLAPSED (collapse at {result['collapse']})" if result.get("collapse") else ""
        self._finished(trials, trial, f"finished  {_name(trial)}: {shown} in {took}{collapse}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trials, trial, f"failed    {_name(trial)}: {_reason(trial)}; log {trial.path or '?'}/error.txt")

    def on_experiment_end(self, trials, **info):
        self.progress.finish()


def waiting_line(pending: list, waited_s: float) -> str:
    """Why no trial runs: how long the sweep has waited, what one pending trial asks of Ray and what Ray has free
    (a request no node can meet waits for ever on a cluster that does not grow)."""
    import ray

    try:
        asks = pending[0].placement_group_factory.required_resources
    except Exception:
        asks = {}
    free = {k: round(v, 2) for k, v in ray.available_resources().items() if k in ("CPU", "GPU", "memory")}
    total = {k: round(v, 2) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    return (f"waiting   {len(pending)} trial(s) pending and none running for {duration(waited_s)}: a trial asks "
            f"{_resources(asks)}; Ray has {_resources(free)} free of {_resources(total)} (ray status shows the "
            f"demands; a node that left takes its resources with it)")


def _resources(found: dict) -> str:
    return ", ".join(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}" for k, v in sorted(found.items()))


def baseline_line(row: dict, cached: bool = False) -> str:
    """The random-init baseline's line for one seed: its metric (or why it failed), like a trial's."""
    name = f"baseline ({row['value']}) seed {row['seed']}"
    if row.get("error"):
        return f"failed    {name}: {row['error']}"
    value, metric = row.get("metric_value"), row.get("metric")
    shown = f"{metric} {value:.3f}" if isinstance(value, float) else f"no {metric}"
    took = "(cached)" if cached else f"in {duration((row.get('timing') or {}).get('eval_s') or 0.0)}"
    return f"finished  {name}: {shown} {took}"


def _ended(trials, ending=None) -> int:
    """Trials that have ended, ``ending`` included (Tune calls back before it marks the trial)."""
    return sum(t.status in ("TERMINATED", "ERROR") or t is ending for t in trials)


def _reason(trial) -> str:
    """The last line of a trial's error: the exception and its message, without Ray's wrapping."""
    try:
        error = trial.get_error()
    except Exception:
        error = None
    if error is None:  # not recorded yet: Tune is about to start the trial again
        return "its process failed (the reason is in the trial's log under Ray's logs)"
    lines = [line for line in plain(str(error)).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
