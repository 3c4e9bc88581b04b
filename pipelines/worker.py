"""The worker side of every Ray Train run: one step loop, one checkpointer, rank-0 MLflow logging.

Pretraining and fine-tuning differ only in their ``TrainingJob`` (how batches are drawn, what one update does, what
is logged, what happens at the end). Both run the same loop, in the manner of torchtitan's ``Trainer.train``:

    step, epoch = checkpointer.restore(checkpointer.latest(), seed)
    run_steps(job, checkpointer, logger, steps=..., log_every=..., start=(step, epoch))
        # per batch: out = job.step(batch); checkpointer.save(step, epoch, metrics)

The driver side (settings, checks, ``TorchTrainer.fit``) is ``training.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from model import ASDAConfig, read_state, save_checkpoint
from model.checkpoint import corruption

CHECKPOINT_PREFIX = "checkpoint_"  # + the update, 7 digits: a checkpoint folder in the run folder
CHECKPOINT_FILE = "model.pt"  # rank 0's training state inside a checkpoint folder
KEEP_CHECKPOINTS = 2  # the newest checkpoint folders a run keeps
METRICS_FILE = "metrics.json"  # rank 0's: the metrics its update reported, inside a checkpoint folder
FINAL_FILE = "final.pt"  # a pretraining run's portable weights, next to its checkpoints
STOP_FILE = "stopped.json"
SYSTEM_METRICS_EVERY_S = 5  # seconds between system-metric samples; the environment's ASDA_SYSTEM_METRICS_EVERY_S wins

# Why a worker ended its run on purpose (the driver turns each into its own error).
STOP_NON_FINITE = "non_finite"
STOP_NO_BATCH = "no_batch"
STOP_COLLAPSE = "collapse"


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """lr multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train_api(in_process: bool):
    """Ray Train's per-worker calls (``report``, ``get_context``) for this worker.

    In process (local mode) inside a Tune trial, Ray 2.60's public ``ray.train.report`` and ``get_context`` refuse
    to run (they tell Tune users to call ``ray.tune`` instead), although local mode supports them: the same
    utilities are then reached one level down, where the public functions would have sent the call.
    """
    import ray.train

    if not in_process:
        return ray.train
    from ray.train.v2._internal.execution.train_fn_utils import get_train_fn_utils

    return get_train_fn_utils()


def start_worker(threads: int | None, run_dir: str, in_process: bool) -> tuple[int, int, torch.device]:
    """Common start of every worker loop: (rank, world size, device), threads pinned, pid and node recorded."""
    import ray.train.torch

    ctx = train_api(in_process).get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if threads:  # the driver decides how many cores each worker may use
        torch.set_num_threads(threads)
    write_pid(run_dir, rank)
    return rank, world, ray.train.torch.get_device()


def wrap_ddp(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """DistributedDataParallel when there is more than one rank; the model itself otherwise."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def write_pid(run_dir: str | Path, rank: int) -> None:
    """Record which process on which node is which rank: for operators (and the recovery and multi-node tests)
    to find a worker."""
    import socket

    import ray

    folder = Path(run_dir, "workers")
    folder.mkdir(parents=True, exist_ok=True)
    Path(folder, f"rank{rank}.pid").write_text(str(os.getpid()))
    where = {"pid": os.getpid(), "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id()}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(where))


class RankZeroLogger:
    """MLflow from rank 0 only (SQLite stores lock under concurrent writers); a no-op on other ranks."""

    def __init__(self, tracking_uri: str, run_id: str | None, enabled: bool, system_metrics: bool = True):
        self.mlflow = None
        if enabled and run_id is not None:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            # CPU, memory (and GPU) every SYSTEM_METRICS_EVERY_S seconds, each sample logged as it is taken.
            mlflow.set_system_metrics_sampling_interval(
                float(os.environ.get("ASDA_SYSTEM_METRICS_EVERY_S") or SYSTEM_METRICS_EVERY_S))
            mlflow.set_system_metrics_samples_before_logging(1)
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            self.mlflow = mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def tags(self, tags: dict[str, str]) -> None:
        if self.mlflow is not None:
            self.mlflow.set_tags(tags)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


# --------------------------------------------------------------------------------------------------- stopping


def record_stop(run_dir: str | Path, kind: str, reason: str, **details: Any) -> None:
    """Leave a note for the driver: the run stopped early on purpose (``kind`` says why)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    note = {"kind": kind, "reason": reason, "time": time.time(), **details}
    Path(run_dir, STOP_FILE).write_text(json.dumps(note))


def clear_stop(run_dir: str | Path) -> None:
    Path(run_dir, STOP_FILE).unlink(missing_ok=True)


def read_stop(run_dir: str | Path) -> dict | None:
    path = Path(run_dir, STOP_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


# --------------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_checkpoint(path: str | Path | None) -> str | None:
    """A pretraining run folder (its final.pt), a Ray Train checkpoint folder (its model.pt) or a file."""
    if path is None:
        return None
    path = Path(path).resolve()
    for candidate in (path / FINAL_FILE, path / CHECKPOINT_FILE, path):
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"no checkpoint at {path} (expected a .pt file, or a folder with {FINAL_FILE} or "
                     f"{CHECKPOINT_FILE})")


class Checkpointer:
    """The one checkpointing component of every worker loop: restore, save at the interval and at the last update,
    and the stop record that names the last good checkpoint.

    A checkpoint is a Ray Train checkpoint folder: rank 0 writes the training state (``model.checkpoint``'s format
    plus optimiser, scheduler, step, epoch and ``extra``), every rank its own RNG state (masks differ per rank).
    """

    def __init__(self, *, rank: int, run_dir: str, every: int, last_step: int, model: torch.nn.Module,
                 optimiser: torch.optim.Optimizer, scheduler, config: ASDAConfig, extra: dict[str, Any] | None = None,
                 in_process: bool = False, report_to_tune: bool = False, report: Callable[..., None] | None = None):
        self.rank, self.run_dir, self.every, self.last_step = rank, run_dir, every, last_step
        self.model, self.optimiser, self.scheduler, self.config = model, optimiser, scheduler, config
        self.extra = extra or {}
        # In process (Ray Train's local mode) nothing persists or finds checkpoints for us: they are written to
        # the run folder and found there again. report_to_tune: each checkpoint's metrics also go to the Tune
        # trial this runs in (what TuneReportCallback does on the distributed path), for ASHA.
        self.in_process, self.report_to_tune = in_process, report_to_tune
        self._report = report
        self.resumed_from = 0  # the step training continued from (0 for a fresh start)
        self.epoch_batches = 0  # batches of its epoch the restored run had trained on (skipped when it goes on)
        self.last_checkpoint: str | None = None
        self._restored = None

    def latest(self):
        """The checkpoint to continue from, or None: Ray Train's, or in process the run folder's newest."""
        import ray.train

        if not self.in_process:
            return ray.train.get_checkpoint()
        found = sorted(p for p in Path(self.run_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / CHECKPOINT_FILE).is_file())
        for folder in reversed(found):  # newest first; a corrupt one gives way to the one before it
            problem = corruption(folder / CHECKPOINT_FILE)
            if problem is None:
                return ray.train.Checkpoint.from_directory(str(folder))
            print(f"{problem}: continuing from the checkpoint before it", file=sys.stderr, flush=True)
        if found:
            raise ValueError(f"every checkpoint of {self.run_dir} is corrupt ({', '.join(p.name for p in found)}); "
                             f"delete them to start the run over")
        return None

    def restore(self, checkpoint, seed: int) -> tuple[int, int]:
        """Continue from a Ray Train checkpoint (or start at update 0); returns (step, epoch).

        The RNG continues from this rank's saved state; where there is none it is reseeded with
        ``seed + 1000 * rank + step``, so masks and augmentation differ per rank, reproducibly.
        """
        step, epoch, rng = 0, 0, None
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state = read_state(Path(folder) / CHECKPOINT_FILE)  # checked against its saved sha256
                rng_path = Path(folder) / f"rng_rank{self.rank}.pt"
                rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
            self.model.load_state_dict(state["model"])
            self.optimiser.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            step, epoch = state["step"], state["epoch"]
            self.epoch_batches = int(state.get("epoch_batches", 0))
            self.last_checkpoint = Path(checkpoint.path).name
            self._restored = checkpoint
        self.resumed_from = step
        if rng is not None:
            set_rng_state(rng)
        else:
            torch.manual_seed(seed + 1000 * self.rank + step)
        return step, epoch

    def save(self, step: int, epoch: int, metrics: dict[str, float], epoch_batches: int = 0) -> None:
        """At every ``every``-th update and at the last: a checkpoint reported to Ray Train with ``metrics``;
        ``epoch_batches``: the batches of ``epoch`` trained on so far, which a run restored from it skips, so that
        it goes on with the batch an undisturbed run would train on next. ``ray.train.report`` is a barrier: every
        rank calls it."""
        if step % self.every and step != self.last_step:
            return
        import ray.train

        name = f"{CHECKPOINT_PREFIX}{step:07d}"
        metrics = {"step": step, "epoch": epoch, "resumed_from_step": self.resumed_from, **metrics}
        report = self._report or train_api(self.in_process).report
        if self.in_process:
            folder = self._write_in_run_folder(name, step, epoch, metrics, epoch_batches)
            report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name)
            if self.report_to_tune:
                import ray.tune

                ray.tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as tmp:  # Ray Train copies it into the run folder
                self._write(Path(tmp), step, epoch, metrics, epoch_batches)
                report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        self.last_checkpoint = name

    def _write(self, folder: Path, step: int, epoch: int, metrics: dict[str, Any] | None = None,
               epoch_batches: int = 0) -> None:
        if self.rank == 0:
            save_checkpoint(folder / CHECKPOINT_FILE, self.model, self.config, optimizer=self.optimiser.state_dict(),
                            scheduler=self.scheduler.state_dict(), step=step, epoch=epoch,
                            epoch_batches=epoch_batches, **self.extra)
            # what the update reported, reported again by a run restored from this checkpoint with nothing
            # left to train (its loss would otherwise be missing from the run's result)
            (folder / METRICS_FILE).write_text(json.dumps(metrics or {}, default=float))
        torch.save(rng_state(), folder / f"rng_rank{self.rank}.pt")

    def _write_in_run_folder(self, name: str, step: int, epoch: int, metrics: dict[str, Any],
                             epoch_batches: int) -> Path:
        """run_dir/name, complete or absent (written aside, then renamed); the newest KEEP_CHECKPOINTS are kept."""
        folder, staging = Path(self.run_dir) / name, Path(self.run_dir) / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._write(staging, step, epoch, metrics, epoch_batches)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        for old in sorted(Path(self.run_dir).glob(f"{CHECKPOINT_PREFIX}*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def finished_already(self, step: int, epoch: int) -> None:
        """The run was complete when restored. Ray Train knows its last checkpoint; in process it is reported
        again, so that the run's result names it."""
        if self.in_process and self._restored is not None:
            report = self._report or train_api(True).report
            with self._restored.as_directory() as folder:
                saved = Path(folder) / METRICS_FILE
                metrics = json.loads(saved.read_text()) if saved.is_file() else {}
            report({**metrics, "step": step, "epoch": epoch, "resumed_from_step": step}, checkpoint=self._restored,
                   checkpoint_dir_name=self.last_checkpoint)

    def stop(self, step: int, kind: str, reason: str) -> dict[str, Any]:
        """End the run on purpose: rank 0 leaves the note the driver raises from; returns the worker's result."""
        reason = f"{reason}; last good checkpoint: {self.last_checkpoint or 'none'}"
        if self.rank == 0:
            record_stop(self.run_dir, kind, reason, step=step, last_checkpoint=self.last_checkpoint)
        return {"stopped": reason, "step": step, "resumed_from_step": self.resumed_from}


# --------------------------------------------------------------------------------------------------- the loop


@dataclass
class StepOutput:
    """What one update gives the loop: its loss and gradient norm (0-d tensors; a non-finite norm ends the run),
    the clips it trained on across all ranks, and whatever else the job logs from it."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    clips: int
    values: dict[str, Any] = field(default_factory=dict)


class TrainingJob(Protocol):
    """What differs between pretraining and fine-tuning; everything else is ``run_steps``."""

    def batches(self, epoch: int) -> Iterable[dict[str, torch.Tensor]]: ...

    def step(self, batch: dict[str, torch.Tensor]) -> StepOutput: ...

    def metrics(self, out: StepOutput) -> dict[str, float]: ...

    def finish(self) -> dict[str, float]: ...

    def no_batch_reason(self) -> str: ...

    def stop_reason(self) -> str | None: ...  # asked after each log step: why the run should end now, or None


class ClipRate:
    """Clips per second since the last time it was read."""

    def __init__(self) -> None:
        self.clips, self.start = 0, time.perf_counter()

    def add(self, clips: int) -> None:
        self.clips += clips

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.clips / max(now - self.start, 1e-9)
        self.clips, self.start = 0, now
        return rate


def run_steps(job: TrainingJob, checkpointer: Checkpointer, logger: RankZeroLogger, *, steps: int, log_every: int,
              start: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Train from ``start`` = (step, epoch) to ``steps`` updates: per batch, a step call and a checkpointer call.

    Metrics go to MLflow every ``log_every`` updates and at the last, where ``job.finish()`` adds its own (the
    fine-tuning evaluation) and the loop adds what it cost: wall and CPU time (``train_loop_s``,
    ``train_loop_cpu_s``), clips per second over the whole loop (``train_loop_clips_per_s``) and the process's peak
    memory (``peak_rss_mb``, and ``peak_gpu_mb`` on a GPU). A non-finite gradient norm, or an epoch that yields no batch, ends the run with a
    stop record (see ``Checkpointer.stop``) instead of spinning or training on.
    """
    from .cost import PeakMemory

    step, epoch = start
    skip = checkpointer.epoch_batches  # of the first epoch: trained on before the checkpoint it restored
    rate, metrics, loop_clips = ClipRate(), {}, 0
    peak = PeakMemory(getattr(job, "device", None))
    started, started_cpu = time.perf_counter(), time.process_time()
    if step >= steps:
        checkpointer.finished_already(step, epoch)
    try:
        while step < steps:
            seen = skip
            for batch in itertools.islice(job.batches(epoch), skip, None):
                seen += 1
                step += 1
                out = job.step(batch)
                if not torch.isfinite(out.grad_norm):  # identical on every rank: gradients are all-reduced
                    return checkpointer.stop(step, STOP_NON_FINITE, f"non-finite loss/gradient at update {step} "
                                                                    f"(loss {out.loss.item():.4g})")
                rate.add(out.clips)
                loop_clips += out.clips
                peak.sample()
                if step % log_every == 0 or step == steps:
                    metrics = {**job.metrics(out), "clips_per_s": rate.take()}
                    if step == steps:  # the evaluation, and what the loop cost (asda bench sweep reads it)
                        metrics.update(job.finish())
                        elapsed = time.perf_counter() - started
                        metrics.update(train_loop_s=elapsed, train_loop_cpu_s=time.process_time() - started_cpu,
                                       train_loop_clips_per_s=loop_clips / elapsed, **peak.as_metrics())
                    logger.log(metrics, step=step)
                    reason = job.stop_reason()
                    if reason is not None:  # every rank reaches the same verdict at the same update
                        return checkpointer.stop(step, STOP_COLLAPSE, reason)
                checkpointer.save(step, epoch, metrics, epoch_batches=seen)
                if step >= steps:
                    break
            if seen == 0:
                return checkpointer.stop(step, STOP_NO_BATCH, job.no_batch_reason())
            epoch, skip = epoch + 1, 0
    finally:
        logger.close()
    return {"step": step, "resumed_from_step": checkpointer.resumed_from}
