"""Driver side of every Ray Train run (pretraining, fine-tuning): settings, checks before Ray starts, the MLflow
run, and ``TorchTrainer(...).fit()`` with the resources this machine or cluster allows."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from model import ASDAConfig

from . import console, tracking, worker
from .placement import waiting_for_workers
from .runtime import REPO_ROOT

DEFAULT_STORAGE = REPO_ROOT / "results"


@dataclass(frozen=True)
class TrainSettings:
    """What every Ray Train run needs besides the model. Training is measured in optimiser updates."""

    data: str  # a prepared folder (asda prepare)
    steps: int = 300
    batch_size: int = 8  # clips per worker per update
    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 30
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 4.0
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # Ray logical CPUs per worker; default: derived from the instance
    threads_per_worker: int | None = None  # torch threads; default: physical cores / workers on a local instance
    max_failures: int = 1  # worker deaths survived (restart from the last checkpoint)
    in_process: bool = False  # one CPU worker run in this process (Ray Train's local mode): no worker group
    split: str = "train"
    target_length: int | None = None  # frames per clip fed to the encoder; None: the data set's (its card)
    name: str | None = None  # run name: running the same name again resumes that run
    storage: str = str(DEFAULT_STORAGE)
    experiment: str = tracking.DEFAULT_EXPERIMENT
    parent_run_id: str | None = None  # nest the MLflow run under a sweep's run

    # Fields a subclass may leave None until its run resolves them (fine-tuning's recipe); checked when set.
    OPEN: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        def given(name: str) -> bool:
            return not (name in self.OPEN and getattr(self, name) is None)

        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field.name}={value!r} is not allowed: expected a finite number")
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "workers"):
            value = getattr(self, name)
            if given(name) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not allowed: expected a positive integer")
        for name in ("warmup_steps", "max_failures"):
            if given(name) and getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: expected an integer >= 0")
        if given("lr") and not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not allowed: expected a positive number")
        if given("min_lr_ratio") and not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is not allowed: expected a number in [0, 1]")
        off = "grad_clip" in self.OPEN and self.grad_clip == 0  # a run that may train unclipped (fine-tuning)
        if given("grad_clip") and not (self.grad_clip > 0 or off):
            raise ValueError(f"grad_clip={self.grad_clip!r} is not allowed: expected a positive number")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r} is not allowed: expected > 0")
        if self.in_process and (self.workers != 1 or self.use_gpu):
            raise ValueError(f"in_process=True is not allowed with workers={self.workers}, use_gpu={self.use_gpu}: "
                             f"it runs one CPU worker inside this process")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ValueError(f"name={self.name!r} is not allowed: expected a non-empty name without '/'")

    def resolved(self, kind: str):
        """Absolute paths (workers chdir) and a concrete run name."""
        from .data.storage import normalise

        return dataclasses.replace(self, data=str(normalise(self.data)), storage=str(Path(self.storage).resolve()),
                                   name=self.name or time.strftime(f"{kind}-%Y%m%d-%H%M%S"))


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every Train worker of a run. Built (and so validated) on the driver, sent as
    ``to_dict()``, rebuilt in the worker with ``cls(**cfg)``; subclasses add what their loop needs."""

    SETTINGS: ClassVar[type] = TrainSettings

    model: ASDAConfig
    settings: TrainSettings
    run_id: str | None
    tracking_uri: str
    run_dir: str
    threads: int
    report_to_tune: bool = False  # in process: each checkpoint's metrics also go to the Tune trial (ASHA)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", ASDAConfig.from_dict(self.model))
        if isinstance(self.settings, dict):
            object.__setattr__(self, "settings", self.SETTINGS(**self.settings))
        if not isinstance(self.settings, self.SETTINGS):
            raise TypeError(f"{type(self).__name__}.settings must be {self.SETTINGS.__name__}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the update and the last good checkpoint."""


class NoBatchError(ValueError):
    """A worker's shard gave no full batch in an epoch: the run stopped instead of spinning."""


class CollapseError(RuntimeError):
    """A pretraining run with ``stop_on_collapse`` stopped at its collapse guard; the message names the update,
    the measure and the last good checkpoint."""


def check_data(settings: TrainSettings, folds: list[int] | None = None) -> dict:
    """The prepared data exists, is intact and can fill one update; returns its card. No Ray needed.
    ``folds``: only these folds of the split are used (cross-validation)."""
    from .data.card import load_card
    from .data.feed import verify_shards

    card = load_card(settings.data)
    if settings.split not in card["splits"]:
        raise ValueError(f"split {settings.split!r} not in {settings.data}; it has {sorted(card['splits'])}")
    verify_shards(settings.data, card)
    available = card["splits"][settings.split]
    what = f"split {settings.split!r}"
    if folds is not None:
        per_fold = card.get("folds", {}).get(settings.split, {})
        available = sum(per_fold.get(str(f), 0) for f in folds)
        what += f" folds {list(folds)}"
    if available < settings.batch_size * settings.workers:
        raise ValueError(f"{what} of {settings.data} has {available} clips, fewer than one "
                         f"update needs ({settings.batch_size} per worker x {settings.workers} workers)")
    if settings.use_gpu and not (torch.cuda.is_available() or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--use-gpu given but no GPU is visible here and no RAY_ADDRESS names a cluster")
    from .runtime import starts_own_instance

    if settings.cpus_per_worker and not settings.in_process and starts_own_instance():
        from .placement import READ_PLANNING_CPUS, check_local_room
        from .runtime import local_num_cpus

        check_local_room(settings.workers, settings.cpus_per_worker, local_cpus=local_num_cpus(),
                         cores=os.cpu_count() or 1, spare=READ_PLANNING_CPUS)
    return card


def resources(settings: TrainSettings) -> tuple[float, int]:
    """(Ray CPUs per worker, torch threads per worker). On a local instance (2x logical CPUs, see runtime) the
    workers take half the logical CPUs so that Ray Data's tasks always find room."""
    from .runtime import local_num_cpus

    local = not os.environ.get("RAY_ADDRESS")
    cpus = settings.cpus_per_worker or (max(0.5, local_num_cpus() / 2 / settings.workers) if local else 1.0)
    threads = settings.threads_per_worker or (max(1, (os.cpu_count() or 1) // settings.workers) if local
                                              else max(1, int(cpus)))
    return cpus, threads


def start_tracking(config: ASDAConfig, settings: TrainSettings, card: dict, *, kind: str, length: int,
                   extra_params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run of a training, or find the one of the same name to continue it. ``length``: the
    frames per clip the run feeds its encoder, logged (SPEC §9) with the share of them that is padding, which
    is also printed as a warning where it is more than half."""
    import yaml
    from mlflow import MlflowClient

    from .data.card import padding_note
    from .runtime import code_version

    padding, warning = padding_note(card, settings.split, length)
    if warning:
        print(warning, file=sys.stderr, flush=True)

    experiment_id = tracking.setup(settings.experiment)
    client = MlflowClient()
    run_id = tracking.find_run(settings.experiment, settings.name)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {tracking.TAG_RUN_NAME: settings.name, tracking.TAG_KIND: kind, tracking.TAG_CODE_VERSION: code_version(),
            tracking.TAG_DATA: card["name"], **(tags or {})}
    if settings.parent_run_id:
        tags[tracking.TAG_PARENT] = settings.parent_run_id
    run_id = client.create_run(experiment_id, run_name=settings.name, tags=tags).info.run_id
    params = {**tracking.flatten(config.to_dict(), tracking.PARAM_MODEL),
              **tracking.flatten(dataclasses.asdict(settings), tracking.PARAM_TRAIN),
              tracking.PARAM_DATA_CLIPS: str(card["num_clips"]),
              tracking.PARAM_DATA_CLASSES: str(len(card["class_names"])),
              tracking.PARAM_DATA_TARGET_LENGTH: str(length), **padding, **(extra_params or {})}
    tracking.log_params(client, run_id, params)
    client.log_text(run_id, config.to_yaml(), "config/model.yaml")
    client.log_text(run_id, yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False), "config/train.yaml")
    return run_id


def _data_config(datasets: dict, workers: int):
    """How Ray Train hands ``datasets`` to the workers, keeping a run reproducible.

    Ray Train replaces a dataset's execution options with the driver's global ones (where order is not
    preserved), so each dataset's own options go in explicitly: the feed's rows arrive in its seeded order
    whatever task finishes first. Locality-aware splitting hands a block to whichever worker shares its node, so
    which rank trains on which clips would follow where tasks happened to run: it is off. One worker reads the
    whole dataset: no split, so no SplitCoordinator actor.
    """
    from ray.train import DataConfig

    return DataConfig(datasets_to_split=[] if workers == 1 else "all",
                      execution_options={name: ds.context.execution_options for name, ds in datasets.items()},
                      enable_shard_locality=False)


def fit(loop_fn: Callable[[dict], Any], worker_type: type[WorkerConfig], *, config: ASDAConfig,
        settings: TrainSettings, run_id: str, datasets: dict, report_to_tune: bool = False, **fields: Any):
    """``TorchTrainer(loop_fn).fit()`` with this project's conventions; returns the Ray Train Result.

    The workers get ``worker_type(model=config, settings=settings, run_id=..., **fields)``. With
    ``settings.in_process`` the one worker runs in this process (Ray Train's local mode: no controller, no worker
    group, no dataset split); otherwise a worker group runs DDP with Ray Train's checkpointing and recovery.
    ``report_to_tune``: intermediate results reach the Tune trial this runs in (for ASHA). A worker that stopped
    the run on purpose leaves a note that becomes NonFiniteLossError (non-finite loss), NoBatchError or
    CollapseError.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .runtime import ensure_ray

    ensure_ray()
    cpus, threads = resources(settings)
    run_dir = Path(settings.storage) / settings.name
    worker.clear_stop(run_dir)  # a note from an earlier attempt of this run must not end this one
    handed = worker_type(model=config, settings=settings, run_id=run_id, tracking_uri=tracking.tracking_uri(),
                         run_dir=str(run_dir), threads=threads, report_to_tune=report_to_tune and settings.in_process,
                         **fields)
    callbacks = []
    if report_to_tune and not settings.in_process:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        loop_fn,
        train_loop_config=handed.to_dict(),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=(ScalingConfig(num_workers=0) if settings.in_process else
                        ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                      resources_per_worker={"CPU": cpus})),
        run_config=RunConfig(name=settings.name, storage_path=settings.storage,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=worker.KEEP_CHECKPOINTS),
                             callbacks=callbacks),
        datasets=datasets,
        dataset_config=_data_config(datasets, settings.workers),
    )
    waiting = (contextlib.nullcontext() if settings.in_process else
               waiting_for_workers(run_dir, settings.workers, cpus, settings.use_gpu))
    try:
        with console.run_progress(run_id, settings.steps, tracking.TAG_COLLAPSE), waiting:
            result = trainer.fit()
    except Exception:
        tracking.end_run(run_id, "FAILED")
        raise
    stopped = worker.read_stop(run_dir)
    if stopped:
        tracking.end_run(run_id, "FAILED")
        error = {worker.STOP_NO_BATCH: NoBatchError, worker.STOP_COLLAPSE: CollapseError}.get(
            stopped.get("kind"), NonFiniteLossError)
        raise error(stopped["reason"])
    return result
