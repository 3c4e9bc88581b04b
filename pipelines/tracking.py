"""MLflow: where runs go and how configs become params.

``MLFLOW_TRACKING_URI`` wins; otherwise an absolute-path sqlite store inside the repository (``mlruns/``), with
artifacts next to it. Absolute, because Ray Train workers chdir into their run directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .runtime import REPO_ROOT

LOCAL_STORE = REPO_ROOT / "mlruns"
DEFAULT_EXPERIMENT = "asda"
MAX_PARAM_LENGTH = 6000


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    return uri == f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def setup(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point mlflow at the tracking store and make sure ``experiment`` exists; returns its id."""
    import mlflow

    uri = tracking_uri()
    if is_local_store(uri):
        LOCAL_STORE.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # A server chooses its own artifact store; the local store keeps artifacts beside the database.
    location = (LOCAL_STORE / "artifacts").as_uri() if is_local_store(uri) else None
    try:
        return mlflow.create_experiment(experiment, artifact_location=location)
    except Exception:  # created concurrently by another process
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


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


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (the REST API caps a batch at 100)."""
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def end_run(run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def ui_command() -> str:
    """The command that shows this store in the MLflow UI."""
    uri = tracking_uri()
    if is_local_store(uri):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   (or: make mlflow-ui)"
    return f"open {uri} in a browser"
