"""What a person sees in the terminal: one line per event and a progress bar, while Ray's own output (progress bars
of Ray Data, Tune's tables, worker logs) goes to Ray's log files unless ``--verbose`` asks for it here."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

# Set before Ray starts, so that every Ray process it starts (trials, Train workers, Ray Data tasks) inherits them.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's reporter that, at verbose=0, prints nothing of its own
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_COLOR_PREFIX": "0",  # what Ray still prints here (a worker that died) comes without colour codes
}
QUIET_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "mlflow")
_state = {"verbose": False, "progress": False}


def set_verbose(verbose: bool) -> None:
    """Quiet (the default): Ray's and Ray Data's output stays in Ray's log files. Verbose: everything, here."""
    _state["verbose"] = verbose
    keep_ray_messages_in_logs(not verbose)
    if verbose:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    try:  # first: importing ray.data sets its logger to DEBUG with a console handler
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    except ImportError:
        pass
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:  # its log file keeps the rest
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.ERROR)
    # "Token authentication is enabled": the sweep's header says so, with where the token is.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # A failed trial's traceback: the sweep prints one line with the reason and where the whole error is.
    logging.getLogger("ray.tune.execution.tune_controller").setLevel(logging.CRITICAL)


RAY_MESSAGES_FILE = "driver_messages.log"  # in Ray's log folder: what Ray had the quiet driver print
# Ray Tune's own account, on the driver, of trials that failed (the sweep's console has a line for each):
# "Trials did not complete: [...]", "Failed to fetch metrics for 1 trial(s)"; and of its state's writes that
# failed, with their tracebacks every few seconds (a full disk: the sweep says so in one line, naming the folder).
RAY_DRIVER_LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis", "ray.train._internal.syncer",
                      "ray.tune.execution.experiment_state")


def keep_ray_messages_in_logs(quiet: bool = True) -> None:
    """Quiet: the lines Ray prints on a driver of its own accord go to RAY_MESSAGES_FILE in Ray's log folder
    instead of this terminal; not quiet: to the terminal again. ``log_to_driver=False`` stops the workers' output
    only: every driver also runs Ray's error listener (``ray._private.worker.listen_error_messages``, started by
    ray.init whatever log_to_driver says), which prints the messages the raylet and Ray's other processes publish
    to drivers ("(raylet) WARNING: 6 PYTHON worker processes have been started on node ...", a task that cannot
    be scheduled, a Ray process that died) to stdout through ``worker.print_to_stdstream``; the raylet writes
    them to its own log too (raylet.out), and this keeps the driver's copy beside it. The listener looks the
    function up at each message, so replacing it takes effect at once; it is the only caller while
    ``log_to_driver`` is off. Tune's loggers of RAY_DRIVER_LOGGERS go to the same file."""
    worker = sys.modules.get("ray._private.worker")  # not imported: nothing was replaced, nothing to restore
    if quiet and worker is None:
        try:
            from ray._private import worker
        except ImportError:
            return
    if worker is None:
        return
    original = getattr(worker.print_to_stdstream, "printed_by", worker.print_to_stdstream)
    worker.print_to_stdstream = _to_ray_logs if quiet else original
    _to_ray_logs.printed_by = original
    for name in RAY_DRIVER_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, _RayLogsHandler)]:
            logger.removeHandler(handler)
        if quiet:
            logger.addHandler(_RayLogsHandler())
        logger.propagate = not quiet


def _to_ray_logs(data: dict, ignore_prefix: bool = False) -> None:
    """``worker.print_to_stdstream`` of a quiet driver: the lines into RAY_MESSAGES_FILE, named by their source."""
    _append_ray_messages(f"({data.get('pid')})", data.get("lines", []))


class _RayLogsHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _append_ray_messages(f"{record.levelname} {record.name}", self.format(record).splitlines())


def _append_ray_messages(source: str, lines: list[str]) -> None:
    """Append ``lines`` to RAY_MESSAGES_FILE in the log folder of the Ray instance this driver is connected to,
    where that folder is on this machine (not on a remote cluster's head); nothing otherwise."""
    try:
        folder = sys.modules["ray._private.worker"].global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - not connected (yet)
        return
    if not folder or not os.path.isdir(folder):
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(os.path.join(folder, RAY_MESSAGES_FILE), "a") as fh:
            fh.writelines(f"{stamp} {source} {plain(line)}\n" for line in lines)
    except OSError:
        pass


def is_verbose() -> bool:
    return _state["verbose"]


def show_progress(show: bool = True) -> None:
    """Progress bars for runs started from this process (the commands turn them on; sweep trials do not)."""
    _state["progress"] = show


def run_progress(run_id: str, steps: int, collapse_tag: str | None = None):
    """A context that shows a training run's progress bar while it runs, if progress bars are on; a
    ``collapse_tag`` that appears on the run is printed once (``collapse_line``) as it appears."""
    import contextlib

    return RunProgress(run_id, steps, collapse_tag=collapse_tag) if _state["progress"] else contextlib.nullcontext()


def collapse_line(where: str, name: str | None = None) -> str:
    """The one line that says a pretraining run collapsed; ``where``: its update and measure."""
    return (f"collapse: {name + ' ' if name else ''}at {where}: the encoder gives nearly one output for every "
            f"clip (MLflow tag asda.collapsed = true)")


def shows_progress() -> bool:
    """Whether runs started from this process show a progress bar (which also prints a collapse as it happens)."""
    return _state["progress"]


def progress(total: float, what: str) -> Progress | None:
    """A progress line, if progress bars are on."""
    return Progress(total, what) if _state["progress"] else None


def plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours the names of its processes)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def resources_text(found: dict) -> str:
    """Ray resources as a console reads them: "CPU 2, GPU 1, memory 3.5 GiB"."""
    return ", ".join(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}" for k, v in sorted(found.items()))


def ray_has() -> str:
    """What Ray has free now of what it has: "CPU 1.5, memory 3.0 GiB free of CPU 4, memory 8.0 GiB"."""
    import ray

    def kept(found: dict) -> dict:
        return {k: round(v, 2) for k, v in found.items() if k in ("CPU", "GPU", "memory")}

    return f"{resources_text(kept(ray.available_resources()))} free of {resources_text(kept(ray.cluster_resources()))}"


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def bar(done: float, total: float, width: int = 24) -> str:
    filled = int(width * min(1.0, done / total)) if total else width
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Progress:
    """A progress line with an ETA: redrawn in place on a terminal, printed at each tenth otherwise."""

    def __init__(self, total: float, what: str):
        self.total, self.what = total, what
        self.started = time.perf_counter()
        self._last_tenth = -1

    @property
    def stream(self):  # looked up on use, so that a Progress pickles (Tune pickles its callbacks)
        return sys.stdout

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def line(self, done: float, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - done) if done else float("nan")
        eta_text = duration(eta) if done and self.total > done else ("—" if not done else "0:00")
        return (f"{bar(done, self.total)} {done:g}/{self.total:g} {self.what}  {duration(elapsed)} elapsed, "
                f"ETA {eta_text}{'  ' + extra if extra else ''}")

    def update(self, done: float, extra: str = "") -> None:
        tenth = int(10 * done / self.total) if self.total else 10
        if self.tty:
            self.stream.write("\r\033[K" + self.line(done, extra))
            self.stream.flush()
        elif tenth > self._last_tenth:
            self._last_tenth = tenth
            print(self.line(done, extra), file=self.stream, flush=True)

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class RunProgress:
    """A training run's progress bar (update, loss, clips/s), read from its MLflow run every few seconds: the
    same for a worker in this process and a worker group across a cluster."""

    def __init__(self, run_id: str, steps: int, every_s: float = 2.0, collapse_tag: str | None = None):
        self.run_id, self.progress = run_id, Progress(steps, "updates")
        self.every_s, self._stop = every_s, threading.Event()
        self.collapse_tag, self._collapse_shown = collapse_tag, False
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> RunProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._show()
        self.progress.finish()

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            self._show()

    def _show(self) -> None:
        from mlflow import MlflowClient

        try:
            run = MlflowClient().get_run(self.run_id)
            history = MlflowClient().get_metric_history(self.run_id, "loss")
        except Exception:  # the store is busy or briefly unreachable: try again at the next tick
            return
        metrics, collapse = run.data.metrics, run.data.tags.get(self.collapse_tag or "")
        if collapse and not self._collapse_shown:  # the run's collapse guard tripped (pipelines.pretrain)
            self._collapse_shown = True
            print(("\n" if self.progress.tty else "") + collapse_line(collapse), flush=True)
        if history:
            step = max(m.step for m in history)
            self.progress.update(step, f"loss {metrics.get('loss', float('nan')):.4f}  "
                                       f"{metrics.get('clips_per_s', float('nan')):.1f} clips/s")
