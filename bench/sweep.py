"""What a sweep costs beyond its training: per trial, wall time, time inside the training loop, the evaluation,
and the rest (Ray's processes, MLflow, imports); for the whole sweep, wall time and the machine's CPU-seconds."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import yaml

PATHS = ("auto", "in_process", "distributed")


def machine_cpu_seconds() -> float:
    """CPU-seconds every process on this machine has spent since boot (/proc/stat; Linux only)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def throwaway_tracking(folder: Path):
    """MLflow runs go to a sqlite store in ``folder`` (a benchmark's own), and the process's client is pointed
    back at the configured store afterwards."""
    import mlflow

    from pipelines.tracking import tracking_uri

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
        mlflow.set_tracking_uri(tracking_uri())  # the run pointed this process's client at the throw-away store


def _grid_file(grid: str, path: str, folder: Path, overrides: dict) -> Path:
    """A copy of the grid with the training path and budget this benchmark asks for."""
    from sweeps.grid import resolve_grid_path

    raw = yaml.safe_load(resolve_grid_path(grid).read_text())
    raw["train"] = {**raw["train"], **overrides}
    if path != "auto":
        raw["train"]["in_process"] = path == "in_process"
    out = folder / f"{raw['name']}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def bench_sweep(grid: str = "smoke", *, path: str = "auto", max_concurrent: int | None = None,
                workdir: str | None = None, **train_overrides) -> dict:
    """Run ``grid`` from scratch into a throw-away folder and MLflow store; returns the timings."""
    from sweeps.driver import prepared_data, run_sweep
    from sweeps.grid import load_grid

    if path not in PATHS:
        raise ValueError(f"path={path!r} is not allowed: expected one of {PATHS}")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        grid_file = _grid_file(grid, path, folder, train_overrides)
        prepared_data(load_grid(grid_file))  # data preparation is not what this measures
        with throwaway_tracking(folder):
            cpu, start = machine_cpu_seconds(), time.perf_counter()
            result = run_sweep(grid_file, storage=folder / "sweeps", fresh=True, max_concurrent=max_concurrent)
            wall, cpu = time.perf_counter() - start, machine_cpu_seconds() - cpu
        state = json.loads((Path(result["dir"]) / "sweep.json").read_text())
    return _summary(grid, path, result["trials"], wall, cpu, state)


def _summary(grid: str, path: str, rows: list[dict], wall: float, cpu: float, state: dict) -> dict:
    trials = []
    for r in rows:
        if r.get("shares_pretraining_of"):  # an evaluation factor's cell: timed with the trial it shares
            continue
        t = r.get("timing") or {}
        loop, evaluation, total = t.get("train_loop_s"), t.get("eval_s"), t.get("trial_s")
        overhead = total - loop - evaluation if None not in (loop, evaluation, total) else None
        trials.append({"cell": r["cell"], "seed": r["seed"], "wall_s": total, "train_loop_s": loop,
                       "eval_s": evaluation, "overhead_s": overhead, "train_loop_cpu_s": t.get("train_loop_cpu_s"),
                       "eval_cpu_s": t.get("eval_cpu_s"), "error": r.get("error")})
    n = len(trials)
    work_cpu = sum((t["train_loop_cpu_s"] or 0) + (t["eval_cpu_s"] or 0) for t in trials)
    return {"grid": grid, "path": path, "sweep_id": state["sweep_id"], "cores": os.cpu_count(), "trials": trials,
            "total": {"wall_s": wall, "machine_cpu_s": cpu, "trials": n,
                      "machine_cpu_s_per_trial": cpu / n if n else None,
                      "overhead_cpu_s_per_trial": (cpu - work_cpu) / n if n else None,
                      "mean_overhead_s": _mean([t["overhead_s"] for t in trials])}}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
