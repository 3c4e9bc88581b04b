"""Pieces every Ray Train worker loop shares: schedule, rank-0 MLflow logging, checkpoints, RNG, stopping.

The model files know nothing of this; the loops in pretrain.py and finetune.py stay thin by calling these.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "model.pt"
STOP_FILE = "stopped.json"


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """lr multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine down to ``min_ratio`` at the end."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def worker_threads(threads: int | None) -> None:
    """Pin intra-op threads; the driver decides how many cores each worker may use."""
    if threads:
        torch.set_num_threads(threads)


def start_worker(cfg: dict[str, Any]) -> tuple[int, int, torch.device]:
    """Common start of every worker loop: (rank, world size, device), threads pinned, pid and node recorded."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg["threads"])
    write_pid(cfg["run_dir"], rank)
    return rank, world, ray.train.torch.get_device()


SYSTEM_METRICS_EVERY_S = 5


class RankZeroLogger:
    """MLflow from rank 0 only (SQLite stores lock under concurrent writers); a no-op on other ranks."""

    def __init__(self, tracking_uri: str, run_id: str | None, enabled: bool, system_metrics: bool = True):
        self.enabled = enabled and run_id is not None
        self.mlflow = None
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(tracking_uri)
            # CPU, memory (and GPU) every SYSTEM_METRICS_EVERY_S seconds, each sample logged as it is taken.
            mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_EVERY_S)
            mlflow.set_system_metrics_samples_before_logging(1)
            mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            self.mlflow = mlflow

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
            self.mlflow = None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def report(metrics: dict[str, Any], *, rank: int, save=None, name: str | None = None) -> None:
    """``ray.train.report`` from every rank (it is a barrier). With ``save``, each rank calls ``save(dir)`` to
    write its files into a fresh folder that Ray merges into one checkpoint."""
    import ray.train

    if save is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)


def save_rank_files(folder: Path, rank: int, *, state: dict[str, Any] | None) -> None:
    """Rank 0 writes the training state; every rank writes its RNG state (masks differ per rank)."""
    if rank == 0 and state is not None:
        torch.save(state, folder / CHECKPOINT_FILE)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")


def load_state(checkpoint_dir: str | Path, rank: int) -> tuple[dict, dict | None]:
    """(training state, this rank's RNG state or None) from a merged checkpoint folder."""
    folder = Path(checkpoint_dir)
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    rng_path = folder / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    return state, rng


def resolve_checkpoint_file(path: str | Path) -> Path:
    """A checkpoint given as its folder or as its model.pt file."""
    path = Path(path).resolve()
    candidate = path / CHECKPOINT_FILE if path.is_dir() else path
    if not candidate.is_file():
        raise ValueError(f"no checkpoint at {path} (expected a {CHECKPOINT_FILE} file or a folder holding one)")
    return candidate


def record_stop(run_dir: str | Path, reason: str, **details: Any) -> None:
    """Leave a note for the driver: the run stopped early on purpose (e.g. a non-finite loss)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    Path(run_dir, STOP_FILE).write_text(json.dumps({"reason": reason, "time": time.time(), **details}))


def clear_stop(run_dir: str | Path) -> None:
    Path(run_dir, STOP_FILE).unlink(missing_ok=True)


def read_stop(run_dir: str | Path) -> dict | None:
    path = Path(run_dir, STOP_FILE)
    return json.loads(path.read_text()) if path.is_file() else None


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
