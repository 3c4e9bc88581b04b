"""Whether the MLflow tracking server answers, said in the sweep's terminal.

When a tracking server goes away during a sweep, every MLflow call of every trial waits and retries (MLflow's own
policy: urllib3's exponential backoff, set by ``MLFLOW_HTTP_REQUEST_*``) and nothing says why the sweep stalls.
``watch_tracking`` polls the server's ``/health`` in a daemon thread and prints one line when it stops answering,
with how long each call keeps retrying (``retry_budget_s``), and one when it answers again. A call that the server
takes within that time returns as if nothing happened and logs its metric once: a retry whose first attempt did
reach the server sends the same metric (key, value, timestamp, step) again, which MLflow's store keeps once, since
those are its primary key. A call past the budget fails with ``unreachable_reason``'s text.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from .tracking import shown_uri

POLL_EVERY_S = 5.0  # between two health checks
HEALTH_TIMEOUT_S = 3.0  # a server slower than this to say it is healthy counts as not answering
# What a gateway answers for a server behind it that is gone: not an answer of the server's.
GATEWAY_DOWN = (502, 503, 504)


def _say(line: str) -> None:
    print(line, flush=True)


def retry_budget_s(*, timeouts: bool = False) -> float:
    """The longest one MLflow HTTP call keeps retrying before it fails, from MLflow's settings as the installed
    MLflow applies them (``mlflow.utils.request_utils``: a urllib3 ``Retry`` with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
    retries and ``..._BACKOFF_FACTOR`` / ``..._BACKOFF_JITTER``). After the k-th failed attempt urllib3 sleeps
    nothing for k = 1, else ``factor * 2**(k-1)`` plus up to ``jitter``, at most ``Retry.DEFAULT_BACKOFF_MAX``; the
    attempt after the last retry fails the call. That sum is the budget for a server that refuses connections (its
    process is gone, its host up); ``timeouts=True`` adds ``MLFLOW_HTTP_REQUEST_TIMEOUT`` for every attempt, the
    bound where each one waits out its timeout (a host gone from the network, a server that hangs)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_BACKOFF_JITTER,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    from urllib3.util import Retry

    retries = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()
    factor, jitter = MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(), MLFLOW_HTTP_REQUEST_BACKOFF_JITTER.get()
    most = getattr(Retry, "DEFAULT_BACKOFF_MAX", 120.0)
    slept = sum(min(most, factor * 2 ** (k - 1) + jitter) for k in range(2, retries + 1))
    return float(slept + (retries + 1) * MLFLOW_HTTP_REQUEST_TIMEOUT.get() if timeouts else slept)


def _budget_text() -> str:
    """The retry budget as the console says it: for a refused connection, and where every attempt times out."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    return (f"MLflow calls wait and retry for up to {retry_budget_s():.0f} s each before they fail (up to "
            f"{retry_budget_s(timeouts=True):.0f} s if each of its {MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1} "
            f"attempts waits out the {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s timeout; MLFLOW_HTTP_REQUEST_* set these)")


class TrackingUnreachable(ConnectionError):
    """The tracking server stayed away past the retry budget (its message: ``unreachable_reason``). Nothing in the
    command is wrong: ``asda`` prints the one line and exits 1; the same command resumes once the server answers."""


def unreachable_reason(uri: str) -> str:
    """Why an MLflow call against ``uri`` failed once it ran past the retry budget: for a caller to raise or print
    in place of urllib3's "Max retries exceeded" (credentials in ``uri`` masked)."""
    return (f"the MLflow tracking server {shown_uri(uri)} did not answer within the retry budget: "
            f"{_budget_text()}; finished trials are kept, and the same command resumes the sweep once it answers")


def answers(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Whether the tracking server at ``uri`` answers ``GET <uri>/health`` within ``timeout_s``. Any HTTP answer
    counts (a server behind a login may refuse the request: it still answers), but a gateway's 502/503/504 (the
    server behind it is gone); TLS is checked as MLflow's client checks it (``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_SERVER_CERT_PATH``)."""
    import requests
    from mlflow.environment_variables import MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH

    verify = MLFLOW_TRACKING_SERVER_CERT_PATH.get() or not MLFLOW_TRACKING_INSECURE_TLS.get()
    try:
        response = requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s, verify=verify)
    except requests.RequestException:
        return False
    return response.status_code not in GATEWAY_DOWN


def down_line(uri: str, since: float) -> str:
    """The console line for a server that stopped answering at ``since`` (epoch seconds)."""
    return (f"tracking  {shown_uri(uri)} does not answer since {time.strftime('%H:%M:%S', time.localtime(since))}: "
            f"{_budget_text()}; finished trials are kept; the same command resumes the sweep")


def up_line(uri: str, down_s: float) -> str:
    """The console line for a server that answers again after ``down_s`` seconds."""
    return f"tracking  {shown_uri(uri)} answers again after {down_s:.0f} s"


def _watch(uri: str, every_s: float, timeout_s: float, out: Callable[[str], None], stop: threading.Event) -> None:
    """The watching thread: a health check now and every ``every_s`` until ``stop``; a line on each change."""
    down_since: float | None = None  # time.time() of the first check that got no answer, while it lasts
    while True:
        up = answers(uri, timeout_s)
        if stop.is_set():  # the context has ended while a check was waiting: that check says nothing
            return
        if not up and down_since is None:
            down_since = time.time()
            out(down_line(uri, down_since))
        elif up and down_since is not None:
            out(up_line(uri, time.time() - down_since))
            down_since = None
        if stop.wait(every_s):
            return


@contextlib.contextmanager
def watch_tracking(uri: str, every_s: float = POLL_EVERY_S, out: Callable[[str], None] = _say,
                   timeout_s: float = HEALTH_TIMEOUT_S) -> Iterator[None]:
    """While inside, a daemon thread checks that the tracking server at ``uri`` answers and calls ``out`` with
    one line when it stops answering (``down_line``: the time, the retry budget, what is kept) and one when it
    answers again (``up_line``); nothing while it stays up. Only for http(s) URIs: a sqlite or file store has no
    server to go away, so it watches nothing. The thread is stopped and joined on the way out."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(uri, every_s, timeout_s, out, stop), name="tracking-watch",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
