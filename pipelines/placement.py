"""Whether a run's Train workers can be placed: refused before anything starts where this machine's own Ray
instance can never hold them, and a line each minute while a cluster has not placed them all (Ray Train waits for
them without a word, for good where no node will ever have room)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from .console import duration

WAIT_NOTICE_S = float(os.environ.get("ASDA_WAIT_NOTICE_S", 60))  # how long a run waits before it says why


def check_local_room(workers: int, cpus_per_worker: float, *, local_cpus: int, cores: int) -> None:
    """Refuse ``workers`` Train workers of ``cpus_per_worker`` Ray CPUs each that this machine's own Ray instance
    (``local_cpus`` logical CPUs on ``cores`` cores) cannot hold at once: Ray Train would wait for them for good.
    A cluster (RAY_ADDRESS) is not checked here: nodes may still join it (``waiting_for_workers`` says so)."""
    wanted = workers * cpus_per_worker
    if wanted > local_cpus:
        most = int(local_cpus / workers * 4) / 4  # in quarters of a CPU
        raise ValueError(f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} = {wanted:g} Ray CPUs is not "
                         f"allowed: this machine's own Ray instance has {local_cpus} ({cores} cores); expected at "
                         f"most {most:g} per worker for {workers} worker(s), or RAY_ADDRESS naming a cluster "
                         f"that has them")


def placed_workers(run_dir: str | Path, since: float) -> int:
    """Train workers of the run in ``run_dir`` that started at or after ``since`` (each writes its rank file as it
    starts, ``worker.write_pid``)."""
    folder = Path(run_dir, "workers")
    return sum(1 for f in folder.glob("rank*.json") if f.stat().st_mtime >= since) if folder.is_dir() else 0


def waiting_line(placed: int, workers: int, cpus_per_worker: float, use_gpu: bool, waited_s: float) -> str:
    """What a run whose workers are not all placed is waiting for, with what Ray has free now."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    asks = f"{cpus_per_worker:g} CPU" + (" and 1 GPU" if use_gpu else "")
    has = f"{free.get('CPU', 0):g} CPU free of {total.get('CPU', 0):g}"
    if use_gpu:
        has += f", {free.get('GPU', 0):g} GPU free of {total.get('GPU', 0):g}"
    return (f"waiting   {placed} of {workers} Train worker(s) placed after {duration(waited_s)}: each asks {asks}, "
            f"all at once; Ray has {has} (`ray status` shows the pending demands)")


@contextlib.contextmanager
def waiting_for_workers(run_dir: str | Path, workers: int, cpus_per_worker: float, use_gpu: bool,
                        every_s: float | None = None):
    """While the context runs, print ``waiting_line`` each ``every_s`` (WAIT_NOTICE_S) until every worker of
    this attempt is placed."""
    every_s = WAIT_NOTICE_S if every_s is None else every_s
    since, stop = time.time(), threading.Event()

    def watch() -> None:
        notice = since + every_s
        while not stop.wait(min(5.0, every_s)):
            placed = placed_workers(run_dir, since)
            if placed >= workers:
                return
            if time.time() >= notice:
                print(waiting_line(placed, workers, cpus_per_worker, use_gpu, time.time() - since), flush=True)
                notice += every_s

    thread = threading.Thread(target=watch, name="asda-waiting-for-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
