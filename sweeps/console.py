"""The sweep's terminal: one line per trial event (started, finished with its metric and time, failed with the
reason and where its log is) and an overall progress line with an ETA, as a Ray Tune callback. A trial Ray's
memory monitor killed says so ("out of memory (N GB used of M)", ``sweeps.memory.oom_reason``), and its MLflow
run gets the reason as a tag (TAG_FAILURE)."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from ray.tune import Callback

from pipelines import tracking
from pipelines.console import Progress, duration, plain, ray_has, resources_text

from .grid import Trial
from .memory import oom_reason

log = logging.getLogger(__name__)
TAG_FAILURE = "asda.failure"  # a trial's run: why its process was stopped ("out of memory (N GB used of M)")


def _name(trial) -> str:
    t = Trial(**trial.config["trial"])
    return f"{t.cell} seed {t.seed}"


WAIT_NOTICE_S = 60.0  # a sweep where no trial can start says why after this long, and again every as long


class SweepConsole(Callback):
    """Prints what happens to each trial, after each ending the sweep's progress (trials ended, ETA), and, when
    trials wait and none runs for ``wait_notice_s``, what they wait for (``waiting_line``)."""

    def __init__(self, total: int, metric: str, wait_notice_s: float = WAIT_NOTICE_S,
                 parent_run_id: str | None = None):
        """``parent_run_id``: the sweep's parent run, whose experiment and sweep id (its TAG_SWEEP) find a trial's
        run to tag when Ray's memory monitor kills the trial (none: nothing is tagged)."""
        self.total, self.metric, self.wait_notice_s = total, metric, wait_notice_s
        self.parent_run_id = parent_run_id
        self.progress = Progress(total, "trials")
        self.started: dict[str, float] = {}
        self.last_event = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_event < self.wait_notice_s:
            return
        pending = [t for t in trials if t.status == "PENDING"]
        running = [t for t in trials if t.status == "RUNNING"]
        if pending and not running:
            self._event(trials, waiting_line(pending, time.monotonic() - self.last_event))
        elif running:
            line = starved_line(running, time.monotonic() - self.last_event)
            if line:
                self._event(trials, line)
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
        reason = _reason(trial)
        self._event(trials, f"retrying  {_name(trial)} from its last checkpoint: {reason}")
        if reason.startswith(OOM):
            record_failure(self.parent_run_id, trial.config, f"{reason}; retried from its last checkpoint")

    def on_trial_complete(self, iteration, trials, trial, **info):
        took = duration(time.perf_counter() - self.started.get(trial.trial_id, time.perf_counter()))
        result = trial.last_result or {}
        value = result.get(self.metric)
        shown = f"{self.metric} {value:.3f}" if isinstance(value, float) else f"no {self.metric}"
        collapse = f"; COLLAPSED (collapse at {result['collapse']})" if result.get("collapse") else ""
        self._finished(trials, trial, f"finished  {_name(trial)}: {shown} in {took}{collapse}")

    def on_trial_error(self, iteration, trials, trial, **info):
        reason = _reason(trial)
        self._finished(trials, trial, f"failed    {_name(trial)}: {reason}; log {trial.path or '?'}/error.txt")
        if reason.startswith(OOM):
            record_failure(self.parent_run_id, trial.config, reason)

    def on_experiment_end(self, trials, **info):
        self.progress.finish()


def waiting_line(pending: list, waited_s: float) -> str:
    """Why no trial runs: how long the sweep has waited, what one pending trial asks of Ray and what Ray has free
    (a request no node can meet waits for ever on a cluster that does not grow)."""
    try:
        asks = pending[0].placement_group_factory.required_resources
    except Exception:
        asks = {}
    return (f"waiting   {len(pending)} trial(s) pending and none running for {duration(waited_s)}: a trial asks "
            f"{resources_text(asks)}; Ray has {ray_has()} (ray status shows the demands; a node that left takes "
            f"its resources with it)")


def starved_line(running: list, waited_s: float) -> str | None:
    """Why running trials may make no progress, or None: Ray has less CPU free than one Ray Data task takes, so
    the reads that feed the trials' training and evaluation wait (a node that left takes its CPUs, and the trials
    it held, retried elsewhere, take the rest)."""
    import ray

    from pipelines.data.feed import DATA_TASK_CPUS

    free = ray.available_resources().get("CPU", 0.0)
    if free >= DATA_TASK_CPUS:
        return None
    total = ray.cluster_resources().get("CPU", 0.0)
    return (f"waiting   {len(running)} trial(s) running and none has ended for {duration(waited_s)}, with Ray's CPUs "
            f"all taken: {free:g} free of {total:g}, and a Ray Data task that feeds a trial takes "
            f"{DATA_TASK_CPUS:g} (a node that left takes its CPUs; ray status shows the pending demands; "
            f"--max-concurrent lower leaves them room)")


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


OOM = "out of memory"  # how ``sweeps.memory.oom_reason`` starts


def _reason(trial) -> str:
    """Why a trial's process stopped: "out of memory (N GB used of M)" where Ray's memory monitor killed it, else
    the last line of its latest error (the exception and its message, without Ray's wrapping)."""
    error = _latest_failure(_error_text(trial))
    full = _disk_full(trial, error)
    if full:
        return full
    if error is None:  # not recorded anywhere yet
        return "its process failed (the reason is in the trial's log under Ray's logs)"
    oom = oom_reason(error)
    if oom:
        return oom
    lines = [line for line in plain(error).strip().splitlines() if line.strip()]
    return _sentences(lines[-1].strip()) if lines else "its process failed"


def _disk_full(trial, error: str | None) -> str | None:
    """"no space left on device under <the trial's folder>: N free" where the trial failed for want of space (an
    error that says so, or one torch.save gives, or none Tune could write, on a file system that is nearly full),
    else None."""
    from pipelines.disk import disk_full_message, nearly_full, says_disk_full

    where = getattr(trial, "path", None) or getattr(trial, "local_path", None)
    if not where:
        return None
    if says_disk_full(error, where) if error is not None else nearly_full(where):
        return disk_full_message(where, advice="").replace(" writing ", " under ", 1)
    return None


def _sentences(line: str, limit: int = 200) -> str:
    """``line`` cut to its whole sentences within ``limit`` characters (Ray's account of a dead worker runs on
    for several hundred, its likely causes after the facts), or to ``limit`` where it has no sentence end."""
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[:end + 1] if end > 0 else line[:limit]


def _error_text(trial) -> str | None:
    """The trial's error file: Tune writes it (every failure appended) into the trial's folder on the driver
    (``error_file``) as it handles the failure, and copies it to the trial's storage (``get_error``) only at its
    next sync, so while Tune calls back the storage's copy is often not there yet."""
    local = getattr(trial, "error_file", None)
    try:
        if local and Path(local).is_file():
            return Path(local).read_text(errors="replace")
    except OSError:
        pass
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - the storage is not readable: no reason rather than no line
        return None
    return None if error is None else str(error)


def _latest_failure(text: str | None) -> str | None:
    """The last failure of an error file whose failures are each headed "Failure # N (occurred at ...)"."""
    if text is None:
        return None
    parts = re.split(r"^Failure # \d+ \(occurred at [^)]*\)\s*$", text, flags=re.M)
    return parts[-1] if parts[-1].strip() else text


def record_failure(parent_run_id: str | None, config: dict, reason: str) -> str | None:
    """Tag the trial's RUNNING run (its sweep, cell and seed tags; the sweep's id and experiment are its parent
    run's) with ``reason`` (TAG_FAILURE); returns the run's id, or None where there is none or the tracking store
    is away. The console prints its line first, and a tracking failure never fails it."""
    if not parent_run_id:
        return None
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        parent = client.get_run(parent_run_id)
        trial = Trial(**config["trial"])
        tags = {tracking.TAG_SWEEP: parent.data.tags.get(tracking.TAG_SWEEP, ""), tracking.TAG_CELL: trial.cell,
                tracking.TAG_SEED: str(trial.seed), tracking.TAG_KIND: tracking.KIND_TRIAL}
        where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) + " and attributes.status = 'RUNNING'"
        runs = client.search_runs([parent.info.experiment_id], filter_string=where, max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            return None
        client.set_tag(runs[0].info.run_id, TAG_FAILURE, reason)
        return runs[0].info.run_id
    except Exception as exc:  # noqa: BLE001 - a tracking failure costs the tag, never the console
        log.debug("could not tag the trial's run with %r: %s", reason, exc)
        return None
