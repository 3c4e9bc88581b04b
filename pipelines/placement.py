"""Whether a run's Train workers can be placed: refused before anything starts where the Ray instance this command
starts for itself could never hold them, and a line each minute while a cluster has not placed them all (Ray Train
waits for them without a word, for good where no node will ever have room)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from .console import duration, ray_has

WAIT_NOTICE_S = max(1.0, float(os.environ.get("ASDA_WAIT_NOTICE_S", 60)))  # how long a run waits before it says why


READ_PLANNING_CPUS = 1.0  # Ray Data's Parquet reader plans a read by sampling files in tasks of one CPU each


def read_room_problem(node_cpus: list[float], unit: float, units: int) -> str | None:
    """Why ``units`` placements of ``unit`` CPUs each (the trials, each in its own process, or their Train
    workers) on nodes of ``node_cpus`` CPUs would wait for good, or None: however they are placed, no node keeps
    READ_PLANNING_CPUS free for the reads that feed them (2-CPU nodes and trials of 1.5 CPUs, say). Nodes that
    may still join the cluster are not counted: on an autoscaling cluster this warns, it does not refuse."""
    fits = [_how_many(n, unit) for n in node_cpus]
    placed = min(units, sum(fits))
    if not placed:
        return None  # nothing fits at all: Tune's pending trials say so (the `waiting` line)
    for n, fit in zip(node_cpus, fits, strict=True):  # can node n keep a CPU free while the others take the rest?
        if n >= READ_PLANNING_CPUS and sum(fits) - fit + _how_many(n - READ_PLANNING_CPUS, unit) >= placed:
            return None
    return (f"{placed} placement(s) of {unit:g} CPU at once leave no node (CPUs per node: {node_sizes(node_cpus)}) a whole CPU "
            f"free, and Ray Data plans every read with tasks of {READ_PLANNING_CPUS:g} CPU: the trials would wait "
            f"for good; lower train.cpus_per_worker or --max-concurrent, or add a node")


def read_room_cap(node_cpus: list[float], unit: float, per_trial: int, wanted: int) -> int:
    """The most trials at once, up to ``wanted``, each ``per_trial`` placements of ``unit`` CPUs, that leave some
    node a whole CPU for the reads (``read_room_problem``); ``wanted`` where even one would not (a warning then)."""
    for trials in range(wanted, 0, -1):
        if read_room_problem(node_cpus, unit, trials * per_trial) is None:
            return trials
    return wanted


def node_sizes(node_cpus: list[float]) -> str:
    """The nodes' CPU counts as a line names them: "2, 4"."""
    return ", ".join(f"{n:g}" for n in sorted(set(node_cpus)))


def live_node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray instance this process is connected to."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


def _how_many(cpus: float, unit: float) -> int:
    """How many placements of ``unit`` CPUs fit in ``cpus``, counted as Ray counts (in ten-thousandths of a CPU)
    so that 2.0 holds twenty of 0.1."""
    return int(round(cpus * 10_000) // round(unit * 10_000))


def check_local_room(workers: int, cpus_per_worker: float, *, local_cpus: int, cores: int, spare: float) -> None:
    """Refuse ``workers`` Train workers of ``cpus_per_worker`` Ray CPUs each that a Ray instance of this command's
    own (``local_cpus`` logical CPUs on ``cores`` cores) cannot hold at once with ``spare`` CPUs left for Ray Data's
    reads: Ray Train would wait for them, or they for their data, for good. Only for that instance: a cluster may
    still grow (``waiting_for_workers`` says what its run waits for)."""
    wanted = round(workers * cpus_per_worker, 4)
    if wanted + spare > local_cpus:
        most = int((local_cpus - spare) / workers * 4) / 4  # in quarters of a CPU
        allowed = (f"expected at most {most:g} per worker for {workers} worker(s)" if most > 0 else
                   f"expected at most {int((local_cpus - spare) // cpus_per_worker)} worker(s) of that size")
        raise ValueError(f"--workers {workers} x --cpus-per-worker {cpus_per_worker:g} = {wanted:g} Ray CPUs is not "
                         f"allowed: the Ray instance this command starts has {local_cpus} ({cores} cores), and Ray "
                         f"Data's reads need {spare:g} beside them; {allowed}, or RAY_ADDRESS naming a cluster that "
                         f"has them")


def rank_files(run_dir: str | Path) -> dict[str, tuple[int, int]]:
    """The rank files of the run in ``run_dir`` (each Train worker writes its own as it starts,
    ``worker.write_pid``): name -> (inode, modification time in ns)."""
    folder = Path(run_dir, "workers")
    if not folder.is_dir():
        return {}
    found = {}
    for f in folder.glob("rank*.json"):
        with contextlib.suppress(OSError):
            stat = f.stat()
            found[f.name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def placed_workers(run_dir: str | Path, before: dict[str, tuple[int, int]]) -> int:
    """Workers of the run that started since ``before`` (``rank_files`` then): their rank file is new or written
    again. Compared file by file, not against this machine's clock, which a shared file system's need not match."""
    return sum(1 for name, seen in rank_files(run_dir).items() if before.get(name) != seen)


def waiting_line(placed: int, workers: int, cpus_per_worker: float, use_gpu: bool, waited_s: float) -> str:
    """What a run whose workers are not all placed is waiting for, with what Ray has free now."""
    asks = f"{cpus_per_worker:g} CPU" + (" and 1 GPU" if use_gpu else "")
    return (f"waiting   {placed} of {workers} Train worker(s) placed after {duration(waited_s)}: each asks {asks}, "
            f"all at once; Ray has {ray_has()} (`ray status` shows the pending demands)")


@contextlib.contextmanager
def waiting_for_workers(run_dir: str | Path, workers: int, cpus_per_worker: float, use_gpu: bool,
                        every_s: float | None = None):
    """While the context runs, print ``waiting_line`` each ``every_s`` (WAIT_NOTICE_S) until every worker of
    this attempt is placed; nothing once the context has ended."""
    every_s = WAIT_NOTICE_S if every_s is None else max(0.1, every_s)
    since, before, stop = time.monotonic(), rank_files(run_dir), threading.Event()

    def watch() -> None:
        notice = since + every_s
        while not stop.wait(min(5.0, every_s)):
            placed = placed_workers(run_dir, before)
            if placed >= workers:
                return
            if time.monotonic() >= notice:
                try:
                    line = waiting_line(placed, workers, cpus_per_worker, use_gpu, time.monotonic() - since)
                except Exception:  # Ray went away meanwhile: the run's own error says why
                    return
                if not stop.is_set():
                    print(line, flush=True)
                notice += every_s

    thread = threading.Thread(target=watch, name="asda-waiting-for-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
