"""The tracking server going away during a sweep and coming back: the console says so once each way, an MLflow
call made meanwhile waits for the server and logs its metric once, and a call past the retry budget fails when
``retry_budget_s`` says it does. Against a real `mlflow server`, stopped and started again on the same port with
the same store."""

import contextlib
import re
import threading
import time

import pytest
from conftest import free_port, mlflow_server_at
from mlflow import MlflowClient

from pipelines import tracking_watch

POLL_S = 0.2


@pytest.fixture
def store(tmp_path, monkeypatch):
    """The sqlite store of the test's servers, its schema made here, and servers that start without MLflow's job
    runner, which these tests do not use: each halves the seconds a server takes to answer."""
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def _server(store: str, tmp_path, port: int, name: str):
    """A server of ``store`` on ``port``: started again, it is where its clients look for it, with their runs."""
    return mlflow_server_at(store, tmp_path / "artifacts", tmp_path / f"server-{name}.log", port=port)


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _log_meanwhile(client: MlflowClient, run_id: str, stamp: int, ended: dict) -> threading.Thread:
    """A trial's metric logged in a thread, as a trial logs while the sweep goes on; ``ended`` gets how long the
    call took and its error, if any."""
    started = time.monotonic()

    def log():
        try:
            client.log_metric(run_id, "eval_accuracy", 0.75, timestamp=stamp, step=3)
        except Exception as e:  # recorded: the test asserts there was none
            ended["error"] = e
        ended["s"] = time.monotonic() - started

    call = threading.Thread(target=log, daemon=True)
    call.start()
    return call


def test_a_server_away_and_back_is_said_once_each_way_and_a_metric_logged_meanwhile_is_kept_once(
        store, tmp_path, monkeypatch):
    """One outage: the watch says nothing while the server answers, one line when it stops (with the budget MLflow's
    settings give), one when it answers again; a metric logged meanwhile waits for it and is in the run once."""
    for name, value in (("MAX_RETRIES", "6"), ("BACKOFF_FACTOR", "1"), ("BACKOFF_JITTER", "0")):
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{name}", value)
    budget = tracking_watch.retry_budget_s()
    assert budget == 2 + 4 + 8 + 16 + 32
    port, lines, ended = free_port(), [], {}
    with contextlib.ExitStack() as server:
        uri = server.enter_context(_server(store, tmp_path, port, "first"))
        client = MlflowClient(uri)
        run_id, stamp = client.create_run(client.create_experiment("outage")).info.run_id, int(time.time() * 1000)
        with tracking_watch.watch_tracking(uri, every_s=POLL_S, out=lines.append, timeout_s=1.0):
            time.sleep(5 * POLL_S)
            assert lines == []  # nothing while it answers
            server.close()  # the server goes away
            _wait_for(lambda: lines)
            call = _log_meanwhile(client, run_id, stamp, ended)
            time.sleep(5 * POLL_S)
            assert len(lines) == 1 and call.is_alive(), lines  # said once; the call waits for the server
            server.enter_context(_server(store, tmp_path, port, "again"))
            _wait_for(lambda: len(lines) == 2)
            call.join(budget)
            time.sleep(5 * POLL_S)
        assert not [t for t in threading.enumerate() if t.name == "tracking-watch"]  # joined on the way out
        assert not call.is_alive() and "error" not in ended and ended["s"] < budget, ended
        logged = [(m.value, m.step, m.timestamp) for m in client.get_metric_history(run_id, "eval_accuracy")]
        assert logged == [(0.75, 3, stamp)]
        # A retry whose first attempt reached the server sends the same metric again: the store keeps it once.
        client.log_metric(run_id, "eval_accuracy", 0.75, timestamp=stamp, step=3)
        assert len(client.get_metric_history(run_id, "eval_accuracy")) == 1
    assert len(lines) == 2, lines
    down, up = lines
    assert down.startswith(f"tracking  {uri} does not answer since ")
    assert re.search(r"since \d\d:\d\d:\d\d: MLflow calls wait and retry for up to 62 s each before they fail", down)
    assert down.endswith("; finished trials are kept; the same command resumes the sweep")
    assert re.fullmatch(rf"tracking  {re.escape(uri)} answers again after \d+ s", up)


def test_a_call_fails_when_the_retry_budget_says_and_the_reason_names_the_server_and_the_budget(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    budget = tracking_watch.retry_budget_s()
    assert budget == 2 + 4
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    try:
        MlflowClient(uri).log_metric("0" * 32, "eval_accuracy", 0.75)
    except Exception as e:  # MLflow's MlflowException, whatever the cause
        assert "Max retries exceeded" in str(e)
    else:
        raise AssertionError("a call to a server that is not there returned")
    assert budget <= time.monotonic() - started < budget + 5  # refused attempts take milliseconds
    reason = tracking_watch.unreachable_reason(f"http://alice:s3cret@127.0.0.1:{uri.rsplit(':', 1)[1]}")
    assert "s3cret" not in reason and "alice:***@127.0.0.1" in reason and f"up to {budget:.0f} s" in reason


def test_the_retry_budget_with_mlflows_defaults(monkeypatch):
    """The numbers the console prints and the README gives when MLflow's HTTP settings are left alone: 7 retries
    sleeping 5, 9, 17, 33, 65 and 120 s at most (2 s doubling, up to 1 s of jitter, urllib3's 120 s ceiling), and
    8 attempts of up to 120 s each where none is refused."""
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)
    assert tracking_watch.retry_budget_s() == 5 + 9 + 17 + 33 + 65 + 120
    assert tracking_watch.retry_budget_s(timeouts=True) == 249 + 8 * 120


def test_a_store_without_a_server_is_not_watched():
    with tracking_watch.watch_tracking("sqlite:////tmp/mlflow.db", every_s=POLL_S, out=print):
        assert not [t for t in threading.enumerate() if t.name == "tracking-watch"]
