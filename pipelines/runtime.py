"""Where things live and how Ray is reached: the embedded default (a local instance, paths inside the repository)
or whatever ``RAY_ADDRESS`` names. Nothing happens at import time."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT / "data"
# The files of a sweep's folder (results/sweeps/<grid>-<fingerprint>): written by the sweeps, read by asda export.
SWEEP_STATE_FILE = "sweep.json"  # its id, grid, MLflow parent and cell runs, whether it finished
SWEEP_TRIALS_FILE = "trials.json"  # one row per (cell, seed) once its trials are done
SWEEP_BASELINE_FILE = "baseline.json"  # the random-init rows, one per seed

log = logging.getLogger(__name__)


def code_version() -> str:
    """The git commit of the code that ran (with "+dirty" for local changes), or the package version."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return "asda-platform " + version("asda-platform")


def local_num_cpus() -> int:
    """Logical CPUs for a local instance: three times the cores (at least 4). On small machines Train workers and
    Tune trials otherwise take every CPU and Ray Data's read tasks (0.25 CPU each, one whole CPU to list files)
    starve."""
    return max(4, 3 * (os.cpu_count() or 1))


RUNNING_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # written by `ray start --head` (make ray-up)
_instance: dict[str, str | None] = {"url": None, "session_dir": None, "job_name": None}


def dashboard_url() -> str | None:
    """The Ray dashboard of the instance ``ensure_ray`` connected to or started (None if it has none or did not)."""
    return _instance["url"]


def job_name() -> str | None:
    """The name this process's job carries in the dashboard's Jobs list (None if ``ensure_ray`` gave it none)."""
    return _instance["job_name"]


def ray_logs() -> str:
    """Where the Ray instance ``ensure_ray`` reached writes its processes' output (on its head node)."""
    return str(Path(_instance["session_dir"] or "/tmp/ray/session_latest") / "logs")


def _remember(context, name: str | None) -> None:
    url = getattr(context, "dashboard_url", None)
    _instance["url"] = (url if url.startswith("http") else f"http://{url}") if url else None
    _instance["session_dir"] = (getattr(context, "address_info", None) or {}).get("session_dir")
    _instance["job_name"] = _listed_name(name)


SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a driver that `ray job submit` started


def _listed_name(name: str | None) -> str | None:
    """The name the dashboard's Jobs list shows for this driver's job: ``name``; for a driver `ray job submit`
    started, the list shows the submission instead, named by the submission's metadata (if at all)."""
    import json

    submitted = os.environ.get(SUBMITTED_JOB_ENV)
    return (json.loads(submitted).get("metadata") or {}).get(JOB_NAME_KEY) if submitted else name


def auth_token_path() -> Path:
    """The file Ray reads its authentication token from (the dashboard asks for this token)."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def token_hint() -> str:
    """How to get the token the Ray dashboard asks for."""
    return f"it asks for a token: the contents of {auth_token_path()} (or run `ray get-auth-token`)"


def _private_token() -> None:
    """The token is a secret: readable by its owner only (Ray writes it with the umask's mode)."""
    path = auth_token_path()
    if path.is_file() and path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": the node address stays loopback
JOB_NAME_KEY = "job_name"  # the job metadata key the dashboard's Jobs list shows in its Name column
AGENT_PORT = 52365  # Ray's default port of a node's dashboard agent (ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT)
PORT_TRIES = 50  # how far past a taken default port a free one is looked for, as Ray does for the dashboard's


def starts_own_instance() -> bool:
    """Whether ``ensure_ray`` would start a Ray instance of this process's own (``local_num_cpus`` CPUs): not
    connected yet, no RAY_ADDRESS and no cluster file of `make ray-up`."""
    import ray

    return not (ray.is_initialized() or os.environ.get("RAY_ADDRESS") or RUNNING_CLUSTER_FILE.is_file())


def ensure_ray(num_cpus: int | None = None, job_name: str | None = None):
    """Connect to ``RAY_ADDRESS`` if set, else to a cluster started here with ``make ray-up``, else start (once)
    a local instance. ``job_name`` names this driver's job in the dashboard's Jobs list (its Name column shows the
    ``job_name`` key of the job's metadata; a job submitted with `ray job submit` shows the submission's metadata
    instead). Connected already, nothing changes. Returns the ray module."""
    import ray

    from .console import is_verbose, set_verbose

    if ray.is_initialized():
        _private_token()
        return ray
    set_verbose(is_verbose())  # quiet unless asked: set before any Ray process starts, so they all inherit it
    options = {"log_to_driver": is_verbose(), "logging_level": logging.INFO if is_verbose() else logging.WARNING}
    if job_name:
        from ray.job_config import JobConfig

        options["job_config"] = JobConfig(metadata={JOB_NAME_KEY: job_name})
    address = os.environ.get("RAY_ADDRESS")
    if not address and RUNNING_CLUSTER_FILE.is_file():
        check_answers(RUNNING_CLUSTER_FILE.read_text().strip(), f"{RUNNING_CLUSTER_FILE} (written by `make ray-up`)",
                      "start that cluster again (make ray-up), or remove the file (rm "
                      f"{RUNNING_CLUSTER_FILE}) to run on a Ray instance of this command's own")
        try:
            _remember(ray.init(address="auto", **options), job_name)
            _ray_data_actors_here()
            log.info("joined the Ray cluster started on this machine")
            return ray
        except (ConnectionError, RuntimeError):
            pass  # a stale file from a cluster that is gone
    # Workers run with the driver's interpreter and the project installed editable, so they import the same code;
    # the working directory is not shipped (it holds data and the venv).
    if address:
        check_answers(address, "RAY_ADDRESS", "start the cluster, correct RAY_ADDRESS, or unset it to run on a "
                                              "local Ray instance")
        log.info("connecting to the Ray cluster at %s", address)
        _remember(ray.init(address=address, **options), job_name)
        _ray_data_actors_here()
    else:
        _remember(_start_local(ray, num_cpus or local_num_cpus(), options), job_name)
    _private_token()
    return ray


def _ray_data_actors_here() -> None:
    """Start Ray Data's two cluster-wide actors (its stats actor and its autoscaling coordinator) on this driver's
    node before any other process of the job uses Ray Data. Each is created, detached, by the first process that
    needs it and pinned to that process's node (a hard node affinity): where that is a sweep trial on another
    node, losing that node loses them for good, and every Ray Data read and evaluation left on the cluster then
    waits on them. The driver's node (the head, for a sweep submitted or joined there) is one the cluster cannot
    lose and go on. Private functions of Ray Data: where they are missing, nothing is done."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as exc:
        log.debug("Ray Data's cluster-wide actors are left to Ray Data: %s", exc)
        return
    try:
        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    except Exception as exc:  # noqa: BLE001 - Ray Data starts them itself when first used, as before
        log.warning("could not start Ray Data's cluster-wide actors on this node: %s", exc)


def _start_local(ray, num_cpus: int, options: dict):
    """Start this process's own Ray instance (stopped when the process ends); returns ray.init's context."""
    # No spot instances here: Train V2's preemption watcher would only be one more process per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Only this machine needs the instance, so every server Ray starts (GCS, raylet, object manager, agents,
    # workers) listens on loopback. Ray on Linux replaces a loopback node address with the machine's reachable
    # one; this switch (Ray's single-machine mode, the default on macOS and Windows) keeps the node on
    # 127.0.0.1, and the processes the instance starts inherit it.
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray._private import ray_constants  # read once at import, which has happened: this process too

    ray_constants.ENABLE_RAY_CLUSTER = False
    with _dashboard_agent_port(free_port_from(AGENT_PORT)):
        return ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, **options)


def free_port_from(port: int, tries: int = PORT_TRIES) -> int:
    """``port`` if nothing listens on it on loopback, else the next free one above it (as Ray moves its dashboard
    from a taken 8265), else one the system picks."""
    import socket

    for candidate in [*range(port, min(port + tries, 65536)), 0]:
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, candidate))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError("no free TCP port on loopback")


@contextlib.contextmanager
def _dashboard_agent_port(port: int):
    """While ray.init starts a local instance: its node's dashboard agent listens on ``port``. The agent serves
    the node's log files (and the state API's data) to the dashboard; ray.init has no argument for its port
    (`ray start` has --dashboard-agent-listen-port) and always asks for 52365, so on a machine where another Ray
    instance's agent holds 52365 ours cannot listen and every log view of the dashboard says "Failed to load".
    The port goes into the node's parameters, which ray.init builds from ``ray._private.parameter.RayParams``;
    the other agent ports (gRPC, metrics export, runtime env) are left to the system there already."""
    from ray._private import parameter

    original = parameter.RayParams

    class WithAgentPort(original):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = WithAgentPort
    try:
        yield port
    finally:
        parameter.RayParams = original


def dashboard_logs_problem() -> str | None:
    """Why the dashboard cannot show the logs of the instance ``ensure_ray`` reached, or None when it can. Each
    node's dashboard agent serves that node's log files to the dashboard; an agent whose port another process
    holds (another Ray instance's agent on the same machine) cannot listen, its node registers the port as -1, and
    the dashboard's log views say "Failed to load" or "No files found". A check for the sweep's header: when the
    instance cannot be asked, it says nothing."""
    import ray

    try:
        silent = [n for n in ray.nodes() if n.get("Alive") and int(n.get("DashboardAgentListenPort") or 0) <= 0]
    except Exception as exc:  # noqa: BLE001 - the header's check never fails the command
        log.debug("could not ask the Ray instance about its dashboard agents: %s", exc)
        return None
    if not silent:
        return None
    nodes = ", ".join(sorted({str(n.get("NodeManagerAddress")) for n in silent}))
    return (f"the dashboard agent of node(s) {nodes} could not listen on its port (another process, such as "
            f"another Ray instance's agent, holds it), so the dashboard's log views stay empty")


class ClusterUnreachable(ValueError):
    """The Ray cluster an address names does not answer (a ValueError: the command refuses it, exit status 2)."""


CONNECT_TIMEOUT_S = 3.0  # how long an address's port may take to accept a connection before it counts as gone


def check_answers(address: str, named_by: str, how: str) -> None:
    """ClusterUnreachable, naming ``address``, who named it and ``how`` to go on, unless its GCS port accepts a TCP
    connection within CONNECT_TIMEOUT_S; left to Ray are addresses that are no host:port (``auto``, ``ray://``):
    ray.init would otherwise wait for a stale cluster for good."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterUnreachable(f"the Ray cluster at {address} (named by {named_by}) does not answer "
                                 f"({exc.strerror or exc}): {how}") from None


@contextlib.contextmanager
def stop_signals(sigterm_as_sigint: bool = False):
    """While a command runs: SIGINT and SIGTERM stop it as Ctrl+C does, and the dict yielded names the signal that
    came. By default both raise KeyboardInterrupt here; ``sigterm_as_sigint`` turns SIGTERM into a SIGINT to this
    process instead, for code with its own SIGINT handler (Ray Tune stops its trials and saves its state).
    Install after connecting to Ray: connecting installs Ray's own SIGTERM handler."""
    received: dict[str, int] = {}

    def on_signal(signum, frame):
        received["signum"] = signum
        if sigterm_as_sigint and signum == signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
