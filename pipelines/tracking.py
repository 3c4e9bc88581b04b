"""MLflow: where runs go and how configs become params.

``MLFLOW_TRACKING_URI`` wins; otherwise an absolute-path sqlite store inside the repository (``mlruns/``), with
artifacts next to it. Absolute, because Ray Train workers chdir into their run directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .runtime import REPO_ROOT

LOCAL_STORE = REPO_ROOT / "mlruns"
# MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends, credentials and all; the platform prints
# its own links with them dropped (run_url). Every process that logs imports this module first.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
DEFAULT_EXPERIMENT = "asda"
MAX_PARAM_LENGTH = 6000

LOCAL_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the local store
# MLflow 3's experiment kind: a model-training experiment, whose page is its runs table, not the GenAI overview.
# The 3.17 UI takes the kind from its GenAI / Model training switch while that switch is shown, and the switch
# follows the page address: links carry UI_MODEL_TRAINING so that they open on the runs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_MODEL_TRAINING = "workflowType=machine_learning"

# --- the names of every tag and param the platform writes (filters in the UI and in tests use these)
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: nests a run under a sweep's run (sweep -> cell -> seed)
TAG_NOTE = "mlflow.note.content"  # MLflow's own: the run's description (markdown) on its page
TAG_RUN_NAME = "asda.run_name"  # a training run's name: the same name again resumes the run
TAG_KIND = "asda.kind"  # one of the KIND_* values
TAG_CODE_VERSION = "asda.code_version"
TAG_DATA = "asda.data"  # the data set's name, from its card
TAG_CHECKPOINT = "asda.checkpoint"  # what a probe evaluated ("random-init" for the baseline)
TAG_SWEEP = "asda.sweep"  # the sweep id
TAG_GRID = "asda.grid"
TAG_CELL = "asda.cell"  # e.g. "centre", "diff_lambda=0.5"
TAG_FACTOR = "asda.factor"  # the factor a trial varies ("centre", "factorial")
TAG_FACTOR_VALUE = "asda.factor_value"
TAG_SEED = "asda.seed"
TAG_COLLAPSED = "asda.collapsed"  # a pretraining run: "true" once its collapse guard tripped, "false" if it never did
TAG_COLLAPSE = "asda.collapse"  # where and why it tripped: "update 120: utterance_rank 1.4 < 3"
TAG_FACTOR_PREFIX = "factor."  # factor.<ASDAConfig field>: that factor's value in the trial

KIND_PRETRAIN, KIND_FINETUNE, KIND_PROBE = "pretrain", "finetune", "probe"
KIND_SWEEP, KIND_TRIAL = "sweep", "sweep-trial"
KIND_CELL = "cell"  # a sweep's cell: its seed runs nest under it, and it carries their mean, spread and Δ

PARAM_MODEL = "model."  # + an ASDAConfig field
PARAM_TRAIN = "train."  # + a training settings field
PARAM_PROBE = "probe."  # + a ProbeSettings field
PARAM_GRID = "grid."  # + name, file, fingerprint, design, metric, trials, factors
PARAM_DATA_CLIPS = "data.clips"
PARAM_DATA_CLASSES = "data.classes"
PARAM_ALPHA_EFFECTIVE = "loss.alpha_effective"  # the utterance term's weight per element (ASDAConfig.alpha_effective)
PARAM_DATA_TARGET_LENGTH = "data.target_length"  # frames per clip the encoder was fed (SPEC §9)
PARAM_TASK = "task."  # + a sweep task's name + "." + a ProbeSettings field: a task's probe in a trial's run
METRIC_TASK = "task_"  # + the task's name + "/" + a probe metric
PARAM_FINETUNE_LOSS = "finetune.loss"
PARAM_FINETUNE_EVAL_SPLIT = "finetune.eval_split"
PARAM_CODE_VERSION = "code_version"
PARAM_FACTOR = "factor."  # + a factor's name: a cell run's value of it
# A cell run's metrics: <metric> + one of these, over its seeds (the report's numbers; unknown ones not logged)
METRIC_MEAN, METRIC_STD, METRIC_N = "_mean", "_std", "_n"  # the sample standard deviation
METRIC_DELTA, METRIC_DELTA_SE, METRIC_P = "_delta_vs_centre", "_delta_vs_centre_se", "_p_holm"
NOTE_LIMIT = 5000  # characters of a run's description that every MLflow server takes (3.x takes 8000)


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return uri == f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, an exclusive lock on ``<database>.lock`` while held: the first process to open a new
    sqlite store creates its schema (and a newer MLflow migrates an older one), and two doing it at once fail in
    SQLAlchemy or Alembic. Other stores (a tracking server, its database) handle their own concurrency."""
    import fcntl

    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point mlflow at the tracking store and make sure ``experiment`` exists; returns its id. A sqlite store is
    first opened under ``store_lock``, so processes starting at once (a sweep's trials, two commands) create or
    migrate its schema one at a time."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):
        return _experiment(experiment, uri)


def _experiment(experiment: str, uri: str) -> str:
    """The id of ``experiment`` in the store at ``uri``, created (as a model-training experiment) if missing."""
    import mlflow

    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        # A server chooses its own artifact store; the local store keeps artifacts beside the database.
        location = (LOCAL_STORE / "artifacts").as_uri() if is_local_store(uri) else None
        try:
            return mlflow.create_experiment(experiment, artifact_location=location,
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another process
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                raise
    if found.tags.get(TAG_EXPERIMENT_KIND) is None:  # made elsewhere, or by an older version of the platform
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return found.experiment_id


def shown_uri(uri: str, *, credentials: str = "***") -> str:
    """``uri`` safe to print or store: the password (or a token in the user part) replaced by ``credentials``;
    with ``credentials=""`` the user part is dropped (a link for a browser, which asks for them itself)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc:
        return uri
    user, host = parts.netloc.rsplit("@", 1)
    name = user.split(":", 1)[0]
    netloc = host if not credentials else (f"{name}:{credentials}@{host}" if ":" in user else f"{credentials}@{host}")
    return urlunsplit(parts._replace(netloc=netloc))


SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # an experiment tag the UI opens as a saved view (?viewStateShareKey=)


def sweep_view_url(parent_run_id: str, sweep_id: str, metric: str, runs_expanded: list[str] = ()) -> str:
    """A link to the runs table of one sweep alone, best ``metric`` first and its columns shown: the cells' mean,
    spread and n, the cell, seed and kind. Saved as a view of the sweep's experiment (the UI's "share" mechanism:
    an experiment tag holding the view's state, which the link names), since the table's columns cannot be set
    through the URL itself; ``runs_expanded``: runs shown with their children (the parent, the cells)."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    columns = [f"metrics.`{name}`" for name in (metric, f"{metric}_mean", f"{metric}_std", f"{metric}_n",
                                                 f"{metric}_delta_vs_centre")]
    columns += [f"tags.`{name}`" for name in (TAG_CELL, TAG_SEED, TAG_KIND)]
    state = {"searchFilter": f"tags.`{TAG_SWEEP}` = '{sweep_id}'", "orderByKey": f"metrics.`{metric}`",
             "orderByAsc": False, "selectedColumns": columns,
             "runsExpanded": {run_id: True for run_id in [parent_run_id, *runs_expanded]}}
    client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + sweep_id, json.dumps(state))
    return f"{_ui_base()}/#/experiments/{experiment_id}/runs?viewStateShareKey={sweep_id}&{UI_MODEL_TRAINING}"


def _ui_base() -> str:
    """The MLflow UI's address: the tracking server's, or where ``ui_command()`` serves a store."""
    uri = tracking_uri()
    return shown_uri(uri, credentials="").rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def run_url(run_id: str) -> str:
    """Where a run opens in the MLflow UI: on the tracking server, or where ``ui_command()`` serves a store."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    return f"{_ui_base()}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODEL_TRAINING}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"a.b": "value"} with values as MLflow param strings."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


# Settings whose value is a path (``train.data``, ``probe.checkpoint``, ``grid.file``, ...): nobody plots or compares
# runs by a path, and as params they crowd the compare view and become parallel-coordinates axes. They are logged as
# tags of the same name instead.
PATH_SETTINGS = ("data", "storage", "checkpoint", "resume", "file", "source")


def is_path_setting(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PATH_SETTINGS


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (the REST API caps a batch at 100); a path-valued setting (PATH_SETTINGS) as a tag of
    the same name."""
    from mlflow.entities import Param, RunTag

    items = [Param(k, v) for k, v in params.items() if not is_path_setting(k)]
    tags = [RunTag(k, v) for k, v in params.items() if is_path_setting(k)]
    for i in range(0, max(len(items), len(tags)), 100):
        client.log_batch(run_id, params=items[i:i + 100], tags=tags[i:i + 100])


def log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    """Log metrics at step 0 in batches (the REST API caps a batch at 1000)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def find_run(experiment: str, name: str) -> str | None:
    """The id of the training run named ``name`` (its TAG_RUN_NAME) in ``experiment``, or None."""
    from mlflow import MlflowClient

    found = MlflowClient().get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = MlflowClient().search_runs([found.experiment_id], filter_string=f"tags.`{TAG_RUN_NAME}` = '{name}'",
                                      max_results=1)
    return runs[0].info.run_id if runs else None


def mark_collapse(run_id: str) -> str | None:
    """A finished pretraining run's verdict: where its collapse guard tripped (TAG_COLLAPSE), or None, in which
    case the run is tagged ``asda.collapsed = false`` (the guard watched it and it never tripped)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = client.get_run(run_id).data.tags
    if tags.get(TAG_COLLAPSED) == "true":
        return tags.get(TAG_COLLAPSE, "collapsed")
    client.set_tag(run_id, TAG_COLLAPSED, "false")
    return None


def end_run(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def ui_command() -> str:
    """How to see this store in the MLflow UI."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {shown_uri(uri, credentials='')} in a browser"
    if is_local_store(uri):
        return f"make mlflow-ui, then open {LOCAL_UI}"
    return f"mlflow ui --backend-store-uri {shown_uri(uri)} --host 127.0.0.1 --port 5000, then open {LOCAL_UI}"
