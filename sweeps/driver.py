"""`asda sweep`: every trial of a grid as pretrain -> probe (or fine-tune) in a Ray Tune function trainable.

Each trial runs ``TorchTrainer(...).fit()`` (Ray Train V2) with ``TuneReportCallback`` and a run name unique to
the sweep; MLflow gets one parent run per sweep, one run per cell of the grid under it (the random-init baseline's
too) and each trial's run under its cell's, so that the UI compares cells with their spread over seeds. The
sweep's folder is named after the grid and its fingerprint, so running the same grid again resumes it (finished
trials are not redone) and a changed grid starts a new sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import ASDAConfig
from pipelines import tracking
from pipelines.disk import disk_full, disk_guard, nearly_full
from pipelines.finetune import FinetuneSettings
from pipelines.placement import live_node_cpus, node_sizes, read_room_cap, read_room_problem
from pipelines.pretrain import PretrainSettings
from pipelines.probe import ProbeSettings
from pipelines.runtime import DATA_ROOT, REPO_ROOT, code_version, stop_signals
from pipelines.tracking_watch import TrackingUnreachable, answers, unreachable_reason, watch_tracking

from .estimate import header_line
from .grid import EVAL_FACTORS, Grid, Trial, load_grid, prepared_path
from .lock import sweep_lock
from .memory import sweep_memory
from .report import BASELINE, BASELINE_FILE, BASELINE_VALUE, STATE_FILE, TRIALS_FILE
from .resources import SWEEP_THREADS, TRIAL_CPU, auto_concurrency

SWEEPS_ROOT = REPO_ROOT / "results" / "sweeps"
# what a full disk under the sweep's folder asks of the user: its finished trials are in records/
RESUME_ADVICE = "free some space and run the same command again: every finished trial is kept"
ASHA_METRIC = "loss_frame"
BASELINE_RUN_NAME = "random init"  # the random-init baseline's cell run


@dataclass(frozen=True)
class SweepParams:
    """What every trial of a sweep shares, handed to the trials through the object store
    (``tune.with_parameters``); the trial itself is Tune's only parameter."""

    sweep_id: str
    tracking_uri: str  # the driver's store: trial processes' environments were fixed when Ray started
    base: ASDAConfig  # the grid's model; a trial applies its cell's overrides
    factor_names: tuple[str, ...]
    pretrain: PretrainSettings  # every trial's pretraining but its name and seed
    metric: str
    asha: bool = False  # trials report intermediate results for ASHA
    probe: ProbeSettings | None = None  # the evaluation: a probe (but its checkpoint, seed and run) ...
    finetune: FinetuneSettings | None = None  # ... or a fine-tuning (but its checkpoint, seed and name)
    tasks: tuple[tuple[str, str, ProbeSettings], ...] = ()  # (name, metric, probe) of each task of the grid
    # cell -> its MLflow run (the baseline's under BASELINE), made by the driver before any trial starts: a trial,
    # in another process, nests its runs under its cell's run
    cell_runs: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        assert (self.probe is None) != (self.finetune is None), "a sweep evaluates with a probe or a fine-tuning"


def run_trial(trial: Trial, sweep: SweepParams) -> dict[str, Any]:
    """Tune function trainable: pretrain one cell with one seed, then evaluate it; reports the grid's metric."""
    from ray import tune

    metrics = trial_metrics(trial, sweep)
    tune.report(metrics)
    return metrics


def trial_metrics(trial: Trial, sweep: SweepParams) -> dict[str, Any]:
    """One trial's pretraining and evaluation, and everything the sweep records of it: what a Tune trial reports
    (``run_trial``) and what ``asda reproduce`` compares."""
    from mlflow import MlflowClient

    from pipelines.pretrain import pretrain

    started = time.perf_counter()
    os.environ["MLFLOW_TRACKING_URI"] = sweep.tracking_uri
    sweep = _under_cell(sweep, trial.cell)
    config = sweep.base.with_overrides(trial.overrides)
    settings = dataclasses.replace(sweep.pretrain, name=f"{sweep.sweep_id}-{trial.slug()}", seed=trial.seed)
    tags = {tracking.TAG_SWEEP: sweep.sweep_id, tracking.TAG_CELL: trial.cell, tracking.TAG_FACTOR: trial.factor,
            tracking.TAG_SEED: str(trial.seed), tracking.TAG_KIND: tracking.KIND_TRIAL}
    for name in sweep.factor_names:
        value = trial.evaluation[name] if name in EVAL_FACTORS else getattr(config, name)
        tags[tracking.TAG_FACTOR_PREFIX + name] = str(value)
    if trial.factor not in ("centre", "factorial"):
        tags[tracking.TAG_FACTOR_VALUE] = str(trial.value)
    result = pretrain(config, settings, tags=tags, report_to_tune=sweep.asha, end_run=False)
    MlflowClient().set_tag(result["run_id"], "mlflow.runName", f"{trial.cell} · seed {trial.seed}")
    evaluating, evaluating_cpu = time.perf_counter(), time.process_time()
    try:  # the run is FINISHED once its evaluation is in it, FAILED if the evaluation fails
        evaluation, also = _evaluate(sweep, config, trial, result)
        tasks = {name: _task_probe(probe, trial.seed, result) for name, _, probe in sweep.tasks}
    except Exception:
        tracking.end_run(result["run_id"], "FAILED")
        raise
    done = time.perf_counter()
    pretrained = result["metrics"]
    metrics = {**evaluation, "also": also, "tasks": tasks, **_event_shares(result["run_id"]),
               "pretrain_loss": float(pretrained.get("loss", float("nan"))),
               "checkpoint": result["checkpoint"], "run_id": result["run_id"],
               "collapse": result["collapse"],  # where its collapse guard tripped, or None
               "cost": _cost(config, settings, pretrained),
               "alpha": config.alpha, "alpha_effective": config.alpha_effective(settings.batch_size),
               # where the trial's time went (asda bench sweep): the training loop, the evaluation, the rest
               "timing": {"trial_s": done - started, "eval_s": done - evaluating,
                          "eval_cpu_s": time.process_time() - evaluating_cpu,
                          "train_loop_s": pretrained.get("train_loop_s"),
                          "train_loop_cpu_s": pretrained.get("train_loop_cpu_s")}}
    tracking.end_run(result["run_id"], "FINISHED")
    return metrics


def _under_cell(sweep: SweepParams, cell: str) -> SweepParams:
    """``sweep`` with the runs its trials of ``cell`` create (the pretraining, a fine-tuning) nested under the cell's
    run; unchanged for a sweep without cell runs, whose runs nest under the parent."""
    run_id = sweep.cell_runs.get(cell)
    if not run_id:
        return sweep
    finetune = sweep.finetune and dataclasses.replace(sweep.finetune, parent_run_id=run_id)
    return dataclasses.replace(sweep, pretrain=dataclasses.replace(sweep.pretrain, parent_run_id=run_id),
                               finetune=finetune)


def _cost(config: ASDAConfig, settings: PretrainSettings, pretrained: dict[str, Any]) -> dict[str, Any]:
    """What the trial's pretraining cost: clips per second over its training loop, the training process's peak
    memory (in a sweep the trial's process, which also holds Ray's own), the encoder's parameters and the FLOPs of
    one update at the frames it fed."""
    from pipelines.cost import encoder_parameters
    from pipelines.data.card import feed_length, load_card
    from pipelines.pretrain import pretrain_flops

    length = feed_length(load_card(settings.data), settings.target_length, settings.data, config.patch_size)
    return {"clips_per_s": pretrained.get("train_loop_clips_per_s"), "peak_rss_mb": pretrained.get("peak_rss_mb"),
            "loop_rss_mb": pretrained.get("loop_rss_mb"), "peak_gpu_mb": pretrained.get("peak_gpu_mb"),
            "params": encoder_parameters(config),
            "gflops_per_update": pretrain_flops(config, settings.batch_size, length) / 1e9}


def _event_shares(run_id: str) -> dict[str, float]:
    """The final weights' attention on the labelled event (``pipelines.analysis.attention_evidence``: the shares,
    the negative mass off the event, per layer, the clips counted), as the pretraining run logged them; empty where
    the data has no events."""
    from mlflow import MlflowClient

    logged = MlflowClient().get_run(run_id).data.metrics
    return {k: float(v) for k, v in logged.items() if k.startswith("attn_")}


def _evaluate(sweep: SweepParams, config: ASDAConfig, trial: Trial,
              pretrained: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The trial's own evaluation's metrics, and each ``also`` cell's (cell -> metrics), all of the one
    pretraining. The probe scores every read-out from one encoding of the clips; fine-tuning trains once per
    read-out. The trial's run carries every metric: its own as eval_*, another read-out's as readout_<r>/eval_*."""
    from mlflow import MlflowClient

    readout = trial.evaluation.get("readout", "cls")
    others = {c["cell"]: c["evaluation"].get("readout", "cls") for c in trial.also}
    if sweep.probe is not None:
        from pipelines.probe import probe

        out = probe(dataclasses.replace(sweep.probe, checkpoint=pretrained["checkpoint"], seed=trial.seed,
                                        run_id=pretrained["run_id"], readout=readout), also=list(others.values()))
        scored = {cell: out["readouts"][r] for cell, r in others.items()}
        return _scores(out), {cell: _scores(m) for cell, m in scored.items()}
    from pipelines.finetune import finetune

    client, found = MlflowClient(), {}
    for cell, r in {None: readout, **others}.items():
        suffix = "" if cell is None else f"-readout_{r}"
        out = finetune(config, dataclasses.replace(sweep.finetune, checkpoint=pretrained["checkpoint"],
                                                   seed=trial.seed, readout=r,
                                                   name=f"{pretrained['name']}-finetune{suffix}"))
        found[cell] = _scores(out)
        prefix = "" if cell is None else f"readout_{r}/"
        for key, value in found[cell].items():  # the trial's run carries its metrics, whatever evaluated them
            if key.startswith("eval_"):
                client.log_metric(pretrained["run_id"], prefix + key, value)
    own = found.pop(None)
    return own, found


def _task_probe(probe: ProbeSettings, seed: int, pretrained: dict[str, Any] | None,
                config: ASDAConfig | None = None) -> dict[str, float]:
    """A task's probe of the trial's encoder (``pretrained``) or, without one, of a random-init encoder of
    ``config`` (the baseline); its metrics go to the trial's run under the task's name."""
    from pipelines.probe import probe as run_probe

    if pretrained is None:
        return _scores(run_probe(dataclasses.replace(probe, checkpoint=None, seed=seed), config=config))
    return _scores(run_probe(dataclasses.replace(probe, checkpoint=pretrained["checkpoint"], seed=seed,
                                                 run_id=pretrained["run_id"])))


def _scores(out: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in out.items() if k.startswith(("eval_", "train_")) and isinstance(v, float)}


def run_baseline(grid: Grid, sweep: SweepParams, folder: Path) -> list[dict[str, Any]]:
    """The random-init baseline: the centre's model initialised at random with each of the grid's seeds and
    evaluated as the trials are (the probe, or fine-tuning from scratch), its runs nested under the baseline's cell
    run. Cached in the sweep's folder (baseline.json), so a resumed sweep does not redo it; a failed seed is run
    again."""
    from .console import baseline_line

    path = folder / BASELINE_FILE
    done = {r["seed"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    import torch

    config = _centre_as_pretrained(grid, sweep)
    threads = torch.get_num_threads()
    torch.set_num_threads(sweep.pretrain.threads_per_worker or SWEEP_THREADS)  # the trials' float sums
    try:
        for seed in grid.seeds:
            cached = (seed in done and not done[seed].get("error")
                      and set(done[seed].get("tasks") or {}) >= {name for name, _, _ in sweep.tasks})
            if not cached:
                done[seed] = _baseline_seed(sweep, config, seed)
                path.write_text(json.dumps(list(done.values()), indent=2, default=str))
            print(baseline_line(done[seed], cached), flush=True)
    finally:
        torch.set_num_threads(threads)  # the driver's own work after the baseline keeps its threads
    return [done[seed] for seed in grid.seeds]


def _centre_as_pretrained(grid: Grid, sweep: SweepParams) -> ASDAConfig:
    """The centre's model as its trials pretrain it: at the frames fed from the pretraining data (the data set's
    own length unless the train settings name one)."""
    from pipelines.data.card import feed_length, load_card

    config = sweep.base.with_overrides(grid.model_centre)
    data = sweep.pretrain.data
    length = feed_length(load_card(data), sweep.pretrain.target_length, data, config.patch_size)
    return dataclasses.replace(config, target_length=length)


def _baseline_seed(sweep: SweepParams, config: ASDAConfig, seed: int) -> dict[str, Any]:
    """One random-init encoder, scored like a trial; a failure is kept in the row (with its reason), not raised."""
    from mlflow import MlflowClient

    sweep = _under_cell(sweep, BASELINE)
    started = time.perf_counter()
    name = f"{sweep.sweep_id}-{BASELINE}-s{seed}"
    row = {"cell": BASELINE, "factor": BASELINE, "value": BASELINE_VALUE, "seed": seed, "metric": sweep.metric,
           "metric_value": None, "run_id": None, "error": None}
    try:
        if sweep.probe is not None:
            from pipelines.probe import probe

            out = probe(dataclasses.replace(sweep.probe, checkpoint=None, seed=seed, name=name,
                                            parent_run_id=sweep.pretrain.parent_run_id), config=config)
        else:
            from pipelines.finetune import finetune

            out = finetune(config, dataclasses.replace(sweep.finetune, checkpoint=None, seed=seed, name=name))
    except Exception as exc:  # the report shows the failed seed; the sweep's trials stand on their own
        row["error"] = (f"{type(exc).__name__}: {exc}".splitlines() or ["?"])[0][:300]
        return row
    client = MlflowClient()
    for key, value in {tracking.TAG_SWEEP: sweep.sweep_id, tracking.TAG_CELL: BASELINE,
                       tracking.TAG_FACTOR: BASELINE, tracking.TAG_SEED: str(seed),
                       "mlflow.runName": f"{BASELINE_RUN_NAME} · seed {seed}"}.items():
        client.set_tag(out["run_id"], key, value)
    value = out.get(sweep.metric)
    tasks = {task: _task_probe(dataclasses.replace(probe, name=f"{name}-{task}",
                                                   parent_run_id=sweep.pretrain.parent_run_id), seed, None, config)
             .get(metric) for task, metric, probe in sweep.tasks}
    row.update(metric_value=float(value) if isinstance(value, int | float) else None, run_id=out["run_id"],
               timing={"eval_s": time.perf_counter() - started}, tasks=tasks)
    return row


def _sweep_params(grid: Grid, state: dict, data: Path, folder: Path, experiment: str, cpus_per_worker: float,
                  threads: int, asha: bool, tasks_data: dict[str, Path] | None = None) -> SweepParams:
    """Every trial's settings, built (and so validated) here on the driver."""
    from pipelines.finetune import FinetuneSettings
    from pipelines.probe import ProbeSettings

    common = {"experiment": experiment, "parent_run_id": state["parent_run_id"]}
    train = grid.train
    # A trial with one CPU worker runs it in the trial's own process (Ray Train's local mode): no controller,
    # worker group or dataset split to start. Retries then come from Tune's FailureConfig.
    in_process = grid.trains_in_process
    pretrain = PretrainSettings(**{"data": str(data), "storage": str(folder / "runs"), **common, **train,
                                   "cpus_per_worker": cpus_per_worker, "threads_per_worker": threads,
                                   "figure_clips": 2, "in_process": in_process})
    evaluation = grid.evaluation
    eval_data = str(Path(evaluation.get("data") or data).resolve())
    probe = finetune = None
    if evaluation["kind"] == "probe":
        probe = ProbeSettings(data=eval_data, experiment=experiment, **(evaluation.get("settings") or {}))
        probe = dataclasses.replace(probe, readout=grid.centre_evaluation["readout"])  # the baseline's
    else:
        finetune = FinetuneSettings(data=eval_data, storage=str(folder / "runs"), **common,
                                    **{**(evaluation.get("settings") or {}), **grid.centre_evaluation})
    tasks_data = tasks_data or {}
    tasks = tuple((t["name"], t["metric"], ProbeSettings(data=str(tasks_data[t["name"]]), experiment=experiment,
                                                         task=t["name"], **t["settings"])) for t in grid.tasks)
    return SweepParams(sweep_id=state["sweep_id"], tracking_uri=tracking.tracking_uri(), base=grid.base_config(),
                       factor_names=tuple(grid.factors), pretrain=pretrain, metric=grid.metric, asha=asha,
                       probe=probe, finetune=finetune, tasks=tasks, cell_runs=dict(state.get("cell_runs") or {}))


def sweep_dir(grid: Grid, storage: Path = SWEEPS_ROOT) -> Path:
    return Path(storage).resolve() / f"{grid.name}-{grid.fingerprint()}"


def prepared_data(grid: Grid) -> Path:
    """The grid's prepared folder; the synthetic default is generated and prepared on first use."""
    return _prepared(grid.data, f"grid {grid.path}: data")


def task_data(grid: Grid) -> dict[str, Path]:
    """Each task's prepared folder (prepared on first use, as the grid's own data)."""
    return {t["name"]: _prepared(t["data"], f"grid {grid.path}: task {t['name']}: data") for t in grid.tasks}


def _prepared(data: dict[str, Any], where: str) -> Path:
    """The prepared folder a grid's data section names (``prepared``), or the one it generates and prepares on
    first use (``dataset`` with ``options``, from ``source`` unless synthetic)."""
    if "prepared" in data:
        path = Path(data["prepared"]).expanduser().resolve()
        if not (path / "dataset.json").is_file():
            raise ValueError(f"{where}.prepared {path} is not a prepared data set; run asda prepare")
        return path
    dataset, options = data.get("dataset", "synthetic"), data.get("options") or {}
    path = prepared_path(data)
    if not (path / "dataset.json").is_file():
        if dataset != "synthetic" and "source" not in data:
            raise ValueError(f"{where} needs 'prepared' (a folder) or 'source' for {dataset}")
        from pipelines.data.prepare import prepare

        source = Path(data.get("source") or DATA_ROOT / "raw" / path.name)
        print(f"preparing {dataset} into {path} (first use)")
        prepare(dataset, source, path, options=options)
    return path




def _concurrency(grid: Grid, n_trials: int, requested: int | None) -> tuple[int, float, int]:
    """(max concurrent trials, Ray CPUs per Train worker, torch threads per worker)."""
    import ray

    workers = int(grid.train.get("workers", 1))
    if grid.train.get("use_gpu"):
        auto = auto_concurrency(use_gpu=True, devices=ray.cluster_resources().get("GPU", 0), workers=workers,
                                local=False)
        return min(requested or auto, n_trials), 1.0, int(grid.train.get("threads_per_worker") or 4)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if os.environ.get("RAY_ADDRESS"):
        per_worker = float(grid.train.get("cpus_per_worker") or 1.0)
        auto = auto_concurrency(use_gpu=False, devices=cpus, workers=workers, local=False, per_worker=per_worker)
        return min(requested or auto, n_trials), per_worker, max(1, int(per_worker))
    # One trial per core (measured when each trial still started a worker group: the default ablation took 16.5 min
    # with three trials at a time on 2 cores, 13.9 min with two).
    # Torch's thread count changes the order of float sums, so it is part of the experiment, not of the machine:
    # the grid fixes it (train.threads_per_worker, default 1), and how many trials run at once changes only the
    # time a sweep takes, never its numbers.
    auto = auto_concurrency(use_gpu=False, devices=os.cpu_count() or 1, workers=workers, local=True)
    concurrent = min(requested or auto, n_trials)
    return concurrent, 1.0, int(grid.train.get("threads_per_worker") or SWEEP_THREADS)


def _parent_run(grid: Grid, state: dict, experiment: str) -> str:
    """The sweep's parent run: the one in ``state``, set RUNNING again, while the tracking store has it; else new."""
    from mlflow import MlflowClient

    experiment_id = tracking.setup(experiment)  # before the client: it reads the tracking URI when created
    client = MlflowClient()
    if state.get("parent_run_id"):
        try:
            client.get_run(state["parent_run_id"])
            client.update_run(state["parent_run_id"], status="RUNNING")
            return state["parent_run_id"]
        except Exception:  # the tracking store was reset: start a new parent
            pass
    run = client.create_run(experiment_id, run_name=f"{grid.name} · {state['sweep_id']}",
                            tags={tracking.TAG_KIND: tracking.KIND_SWEEP, tracking.TAG_SWEEP: state["sweep_id"],
                                  tracking.TAG_GRID: grid.name, tracking.TAG_CODE_VERSION: code_version()})
    run_id = run.info.run_id
    grid_params = {"name": grid.name, "file": grid.path, "fingerprint": grid.fingerprint(), "design": grid.design,
                   "metric": grid.metric, "trials": str(len(grid.trials())), "factors": ",".join(grid.factors)}
    tracking.log_params(client, run_id, {**{tracking.PARAM_GRID + k: v for k, v in grid_params.items()},
                                         tracking.PARAM_CODE_VERSION: code_version()})
    client.log_text(run_id, Path(grid.path).read_text(), f"grid/{Path(grid.path).name}")
    return run_id


def grid_cells(grid: Grid) -> list[dict[str, Any]]:
    """Every cell of the grid once: each trial's own cell, the read-out cells it also scores, and last the random-init
    baseline (the centre's model and evaluation); each {"cell", "factor", "value", "values": factor -> its value}."""
    found: dict[str, dict[str, Any]] = {}
    for trial in grid.trials():
        config = grid.config_for(trial)
        own = {"cell": trial.cell, "factor": trial.factor, "value": trial.value, "evaluation": trial.evaluation}
        for cell in (own, *trial.also):
            values = {n: cell["evaluation"][n] if n in EVAL_FACTORS else getattr(config, n) for n in grid.factors}
            found.setdefault(cell["cell"], {k: cell[k] for k in ("cell", "factor", "value")} | {"values": values})
    centre = grid.base_config().with_overrides(grid.model_centre)
    values = {n: grid.centre_evaluation[n] if n in EVAL_FACTORS else getattr(centre, n) for n in grid.factors}
    return [*found.values(), {"cell": BASELINE, "factor": BASELINE, "value": BASELINE_VALUE, "values": values}]


def _cell_runs(grid: Grid, state: dict) -> dict[str, str]:
    """cell -> its run under the sweep's parent run (``grid_cells``), made before any trial starts so that the
    trials' runs nest under them as they are created. A resumed sweep keeps the runs ``state`` names (set RUNNING
    again) and makes only those the tracking store no longer has."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(state["parent_run_id"])
    known = state.get("cell_runs") or {}
    runs = {}
    for cell in grid_cells(grid):
        run_id = known.get(cell["cell"])
        if not (run_id and _reopened(client, run_id, parent.info.run_id)):
            run_id = _new_cell_run(client, parent, grid, cell)
        runs[cell["cell"]] = run_id
    return runs


def _reopened(client, run_id: str, parent_run_id: str) -> bool:
    """Whether the cell run ``run_id`` is still in the store under ``parent_run_id``; if so it is set RUNNING."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:  # the tracking store was reset
        return False
    if run.info.lifecycle_stage != "active" or run.data.tags.get(tracking.TAG_PARENT) != parent_run_id:
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def _new_cell_run(client, parent, grid: Grid, cell: dict[str, Any]) -> str:
    """A cell's run under the sweep's ``parent`` run: named by the cell, tagged as the cell's trials are (sweep,
    cell, factor, factor.<name>) with the kind ``cell``, its factors' values as params."""
    tags = {tracking.TAG_PARENT: parent.info.run_id, tracking.TAG_KIND: tracking.KIND_CELL,
            tracking.TAG_SWEEP: parent.data.tags.get(tracking.TAG_SWEEP, ""), tracking.TAG_GRID: grid.name,
            tracking.TAG_CELL: cell["cell"], tracking.TAG_FACTOR: cell["factor"], tracking.TAG_CODE_VERSION:
            code_version(), **{tracking.TAG_FACTOR_PREFIX + n: str(v) for n, v in cell["values"].items()}}
    if cell["factor"] not in ("centre", "factorial", BASELINE):
        tags[tracking.TAG_FACTOR_VALUE] = str(cell["value"])
    if cell["cell"] == BASELINE:
        tags[tracking.TAG_CHECKPOINT] = BASELINE_VALUE
    name = BASELINE_RUN_NAME if cell["cell"] == BASELINE else cell["cell"]
    run_id = client.create_run(parent.info.experiment_id, run_name=name, tags=tags).info.run_id
    tracking.log_params(client, run_id, {tracking.PARAM_FACTOR + n: str(v) for n, v in cell["values"].items()})
    return run_id


def run_sweep(grid_name_or_path: str | Path, *, storage: str | Path = SWEEPS_ROOT, fresh: bool = False,
              max_concurrent: int | None = None, asha: bool = False,
              experiment: str = tracking.DEFAULT_EXPERIMENT, sweep_id: str | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep: the trials on Tune, then the random-init baseline on this process, then the report;
    returns {"dir", "parent_run_id", "trials", "baseline", "report"}."""
    from pipelines.runtime import ensure_ray


    grid = load_grid(grid_name_or_path)  # every cell's config is validated here, before Ray starts
    trials = grid.trials()
    for cell, risk in collapse_risks(grid, trials).items():
        print(f"warning: cell {cell}: {risk}", flush=True)
    folder, state = _open_sweep(grid, storage, fresh, sweep_id)
    with sweep_lock(folder):  # a second sweep of this folder refuses here, before any data or Ray work
        data = prepared_data(grid)  # a bad data section fails here, before the sweep has a folder
        tasks_data = task_data(grid)
        folder.mkdir(parents=True, exist_ok=True)
        ensure_ray(job_name=f"asda sweep {state['sweep_id']}")  # its name in the dashboard's Jobs list
        state["parent_run_id"] = _parent_run(grid, state, experiment)
        with (watch_tracking(tracking.tracking_uri()), _parent_closed_on_failure(state),
              disk_guard(folder, advice=RESUME_ADVICE)):
            return _run_and_report(grid, trials, state, folder, data, tasks_data, experiment, max_concurrent, asha)


def _run_and_report(grid: Grid, trials: list[Trial], state: dict, folder: Path, data: Path,
                    tasks_data: dict[str, Path], experiment: str, max_concurrent: int | None,
                    asha: bool) -> dict[str, Any]:
    """The sweep once its parent run exists: the cell runs, the trials, the baseline, the report."""
    from .report import build_report, print_report

    state["cell_runs"] = _cell_runs(grid, state)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
    concurrent, cpus_per_worker, threads = _concurrency(grid, len(trials), max_concurrent)
    fits, memory = sweep_memory(grid, folder, data, concurrent, local=not os.environ.get("RAY_ADDRESS"))
    if not max_concurrent:  # asked for, it is the user's call (the header says what fits)
        concurrent = min(concurrent, fits)
    sweep = _sweep_params(grid, state, data, folder, experiment, cpus_per_worker, threads, asha, tasks_data)
    concurrent, room = _read_room(sweep, concurrent, capped=not max_concurrent)
    _header(state, grid, trials, concurrent, folder, sweep, memory)
    if room:
        print(f"  cpus       {room}")
    orphans = _close_orphans(state["parent_run_id"])  # a driver killed outright left its trials' runs RUNNING
    if orphans:
        print(f"  closed     {len(orphans)} run(s) an earlier driver left RUNNING (marked KILLED; the trials "
              f"start again): {', '.join(orphans)}")
    with stop_signals(sigterm_as_sigint=True) as received:  # Tune's SIGINT handler stops the trials
        results = _run_trials(grid, trials, sweep, folder, concurrent, asha)
    rows = _collect(results, grid)
    unfinished = [r for r in rows if r["metric_value"] is None and not r["error"]]
    if received or unfinished:
        _interrupted(received.get("signum", signal.SIGINT), state, folder, rows, unfinished, grid.metric)
    (folder / TRIALS_FILE).write_text(json.dumps(rows, indent=2, default=str))
    baseline = run_baseline(grid, sweep, folder)
    report = build_report(rows, grid, folder / "report", baseline=baseline, parent_run_id=state["parent_run_id"],
                          cell_runs=state["cell_runs"], data=str(data))
    failed = [r for r in rows + baseline if r.get("error")]
    tracking.end_run(state["parent_run_id"], "FAILED" if failed else "FINISHED")
    (folder / STATE_FILE).write_text(json.dumps({**state, "finished": True}, indent=2))
    print_report(report)
    print(f"report: {folder / 'report'}")
    print("\n".join(sweep_links(state, grid.metric)))
    return {"dir": str(folder), "parent_run_id": state["parent_run_id"], "trials": rows, "baseline": baseline,
            "report": report}


@contextlib.contextmanager
def _parent_closed_on_failure(state: dict):
    """A sweep that stops on an error never leaves its MLflow runs RUNNING: the runs under its parent that are
    still running, and the parent itself, are marked FAILED (KILLED for Ctrl+C, which ``_interrupted`` handles
    while trials run). Where the tracking store cannot be reached either, one line says so; the next run of the
    command closes them."""
    try:
        yield
    except SweepInterrupted:
        raise
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        uri = tracking.tracking_uri()
        if uri.startswith(("http://", "https://")) and not answers(uri):  # the error is the server's absence
            print(f"  could not mark the sweep's MLflow runs {status}: the tracking server does not answer; the "
                  f"next run of the same command does", file=sys.stderr, flush=True)
            raise TrackingUnreachable(unreachable_reason(uri)) from exc
        try:
            _close_orphans(state["parent_run_id"], cells=True, status=status)
            tracking.end_run(state["parent_run_id"], status)
        except Exception as closing:  # noqa: BLE001 - the sweep's own error is the one to show
            print(f"  could not mark the sweep's MLflow runs {status} ({type(closing).__name__}: "
                  f"{str(closing)[:120]}); the next run of the same command does", file=sys.stderr, flush=True)
        raise


def sweep_links(state: dict, metric: str) -> list[str]:
    """The lines that end a sweep: its parent run's page (the report, the table), then "MLflow: " and the runs
    table of this sweep alone, best ``metric`` first, the cells' spread shown (``tracking.sweep_view_url``); the
    parent's page alone where the view cannot be saved."""
    parent = tracking.run_url(state["parent_run_id"])
    try:
        view = tracking.sweep_view_url(state["parent_run_id"], state["sweep_id"], metric,
                                       list((state.get("cell_runs") or {}).values()))
    except Exception as exc:  # the tracking server refused the experiment tag: the parent's page still works
        return [f"MLflow: {parent} (the sweep's runs table could not be saved as a view: {type(exc).__name__})"]
    return [f"MLflow run of the sweep (its report and table): {parent}", f"MLflow: {view}"]


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal: its unfinished trials and runs are marked KILLED, nothing unfinished
    was written as a result, and ``resume`` is the command that continues it. Exit status 128 + ``signum``."""

    def __init__(self, signum: int, message: str, resume: str):
        super().__init__(message)
        self.signum, self.resume = signum, resume


def _close_orphans(parent_run_id: str, metric: str | None = None, cells: bool = False,
                   status: str = "KILLED") -> list[str]:
    """Mark KILLED the runs under the sweep (under its parent run and under its cell runs) that are still RUNNING:
    nothing of this sweep runs yet, so they were left by an interrupted or killed driver (a trial that resumes
    sets its run RUNNING again). With ``metric``, also every trial run without it: its pretraining may have
    finished, the trial did not. The cell runs themselves only with ``cells`` (a resumed sweep has set them RUNNING
    again). Returns the names of the runs it closed."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = [client.get_run(parent_run_id).info.experiment_id]

    def under(run_id: str) -> list:
        return client.search_runs(experiment, filter_string=f"tags.`{tracking.TAG_PARENT}` = '{run_id}'")

    children = under(parent_run_id)
    runs = children + [r for c in children if c.data.tags.get(tracking.TAG_KIND) == tracking.KIND_CELL
                       for r in under(c.info.run_id)]
    closed = []
    for run in runs:
        kind = run.data.tags.get(tracking.TAG_KIND)
        if kind == tracking.KIND_CELL and not cells:
            continue
        unevaluated = metric is not None and kind == tracking.KIND_TRIAL and metric not in run.data.metrics
        if run.info.status == "RUNNING" or (unevaluated and run.info.status not in ("KILLED", status)):
            client.set_terminated(run.info.run_id, status=status)
            closed.append(run.info.run_name or run.info.run_id)
    return closed


def _interrupted(signum: int, state: dict, folder: Path, rows: list[dict], unfinished: list[dict],
                 metric: str) -> None:
    """Record an interrupted sweep as such: finished trials only in trials.json, every run still RUNNING under
    the parent (the cell runs and their seeds' runs) and the parent itself KILLED, and the command that resumes
    it."""
    done = [r for r in rows if r not in unfinished]
    (folder / TRIALS_FILE).write_text(json.dumps(done, indent=2, default=str))
    _close_orphans(state["parent_run_id"], metric, cells=True)
    tracking.end_run(state["parent_run_id"], "KILLED")
    resume = f"asda sweep --grid {state['grid']} --storage {folder.parent} --sweep-id {state['sweep_id']}"
    raise SweepInterrupted(signum, f"sweep {state['sweep_id']} stopped by {signal.Signals(signum).name}: "
                           f"{len(done)} of {len(rows)} trials finished, the rest marked KILLED", resume)


def _read_room(sweep: SweepParams, concurrent: int, capped: bool) -> tuple[int, str | None]:
    """(trials at once, a header line or None): fewer trials where those wanted would leave no node a whole CPU
    to plan their reads on (``placement.read_room_problem``), unless ``capped`` is False (--max-concurrent: the
    user's call, warned of), and a warning where even one trial would."""
    if sweep.pretrain.use_gpu:
        return concurrent, None
    nodes = live_node_cpus()
    unit, per_trial = sweep.pretrain.cpus_per_worker or 1.0, 1 if sweep.pretrain.in_process else sweep.pretrain.workers
    fewer = read_room_cap(nodes, unit, per_trial, concurrent) if capped else concurrent
    problem = read_room_problem(nodes, unit, fewer * per_trial)
    if problem:
        return concurrent, f"warning: {problem}"
    if fewer < concurrent:
        return fewer, (f"{fewer} trial(s) at a time, not {concurrent}: {concurrent} would leave no node (CPUs per node: "
                       f"{node_sizes(nodes)}) the whole CPU Ray Data's Parquet reader takes to plan each read")
    return concurrent, None


def _header(state: dict, grid: Grid, trials: list[Trial], concurrent: int, folder: Path, sweep: SweepParams,
            memory: str) -> None:
    """Where everything goes, before the first trial starts."""
    from pipelines.console import is_verbose
    from pipelines.runtime import dashboard_logs_problem, dashboard_url, job_name, ray_logs, token_hint

    mode = "in each trial's process" if sweep.pretrain.in_process else f"{sweep.pretrain.workers} Train worker(s)"
    print(f"sweep {state['sweep_id']} (grid {grid.name}): {len(trials)} trials, {concurrent} at a time, "
          f"{sweep.pretrain.steps} updates each, training {mode}")
    print(f"  estimate   {header_line(grid, concurrent=concurrent, storage=folder.parent)}")
    print(f"  {memory}")
    print(f"  results    {folder}")
    print(f"  MLflow     experiment '{sweep.pretrain.experiment}', parent run {state['parent_run_id']}; "
          f"{tracking.ui_command()}")
    url = dashboard_url()  # the port Ray found free: 8265 unless another instance holds it
    print(f"  Ray        dashboard {url + ' (' + token_hint() + ')' if url else 'not started here'}")
    if url:
        job = f"job '{job_name()}'" if job_name() else ("its job has no name there (`ray job submit "
                                                        "--metadata-json '{\"job_name\": ...}'` names one)")
        print(f"             {job}; trial actors are named asda_trial(<cell> · seed <seed>)")
        problem = dashboard_logs_problem()
        if problem:
            print(f"  Ray logs   not readable in the dashboard: {problem}; they are in {ray_logs()}")
    if not is_verbose():
        print(f"  logs       Ray's, Ray Data's and the trials' output: {ray_logs()} (--verbose shows it here)")


def _open_sweep(grid: Grid, storage: str | Path, fresh: bool,
                sweep_id: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The sweep's folder (not created here) and its state. ``sweep_id``: that sweep of this grid; else the newest
    unfinished sweep of this grid (an interrupted or killed one, ``--fresh`` ones included), else the grid's folder
    (resumed when it exists); ``fresh``: a new sweep in a folder of its own."""
    base = sweep_dir(grid, storage)
    folders = sorted((f for f in base.parent.glob(f"{base.name}*") if f.is_dir() and (f / STATE_FILE).is_file()),
                     key=lambda f: f.stat().st_mtime)
    states = {f: json.loads((f / STATE_FILE).read_text()) for f in folders}
    if sweep_id:
        folder = next((f for f, s in states.items() if s.get("sweep_id") == sweep_id), None)
        if folder is None:
            raise ValueError(f"--sweep-id {sweep_id}: no sweep of grid {grid.name} has that id in {base.parent}; "
                             f"it has {[s.get('sweep_id') for s in states.values()] or 'none'}")
    elif fresh:
        folder = base.with_name(f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}") if base.exists() else base
    else:
        folder = next((f for f in reversed(folders) if not states[f].get("finished")), base)
    state = states.get(folder) or {"sweep_id": f"{grid.name}-{time.strftime('%m%d-%H%M%S')}", "grid": grid.path,
                                   "fingerprint": grid.fingerprint()}
    return folder, state


def _run_trials(grid: Grid, trials: list[Trial], sweep: SweepParams, folder: Path, concurrent: int,
                asha: bool) -> list:
    """Every trial's result: the trials the sweep recorded as finished (``records``) and those Tune runs now.
    Tune's own state (``<sweep>/tune``) resumes the rest where it reads; where it does not (cut off by a full disk,
    say) it is set aside and the trials without a record start again, each from its last checkpoint."""
    from .records import RecordedResult, recorded

    tune_path, done = folder / "tune", recorded(folder)
    problem = _tune_state_problem(tune_path)
    if problem:
        aside = tune_path.with_name(f"tune.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        while aside.exists():  # set aside twice within a second
            aside = aside.with_name(aside.name + "+")
        tune_path.rename(aside)
        print(f"  Tune state {problem}: set aside as {aside.name}; the sweep's own records keep {len(done)} "
              f"finished trial(s), the other {len(trials) - len(done)} start again from their last checkpoints")
    todo = trials if tune_path.exists() else [t for t in trials if t.slug() not in done]
    try:
        results = list(_tuner(grid, todo, sweep, tune_path, concurrent, asha).fit()) if todo else []
    except Exception as exc:  # Tune reads back what it wrote: on a full disk, files it could not write
        if nearly_full(folder):
            raise disk_full(folder, exc, advice=RESUME_ADVICE) from exc
        raise
    if any(r.error for r in results) and nearly_full(folder):
        raise disk_full(folder, advice=RESUME_ADVICE)  # the trials failed writing their checkpoints
    found = {Trial(**r.config["trial"]).slug(): r for r in results if r.config.get("trial")}
    for slug, record in recorded(folder).items():  # what the records hold stands for a trial Tune lost
        if slug not in found or (found[slug].metrics or {}).get(grid.metric) is None:
            found[slug] = RecordedResult(record)
    return list(found.values())


def _tune_state_problem(tune_path: Path) -> str | None:
    """Why Tune's state in ``tune_path`` cannot resume the sweep, or None (also when there is none): a state file
    that does not parse makes Tune rebuild its trials without their settings."""
    from ray import tune

    if not tune_path.exists():
        return None
    if not tune.Tuner.can_restore(str(tune_path)):
        return f"in {tune_path} is incomplete (no tuner.pkl)"
    if not any(tune_path.glob("experiment_state-*.json")):  # Tune would start its trials without their settings
        return f"in {tune_path} is incomplete (no experiment_state-*.json)"
    for state in sorted(tune_path.glob("experiment_state-*.json")):  # JSON (the search's state is a pickle)
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as exc:
            return f"file {state} does not read ({type(exc).__name__}: {str(exc)[:80]})"
    return None


def _tuner(grid: Grid, trials: list[Trial], sweep: SweepParams, tune_path: Path, concurrent: int, asha: bool):
    """The sweep's Tuner: restored from ``tune_path`` when it exists (finished trials are kept), else new."""
    from ray import tune

    # In process the trial trains itself and holds its worker's CPUs; otherwise it mostly waits on its Train run.
    cpu = sweep.pretrain.cpus_per_worker if sweep.pretrain.in_process else TRIAL_CPU
    trainable = _trial_actor(tune.with_resources(tune.with_parameters(asda_trial, sweep=sweep), {"cpu": cpu}))
    # Given again on a restore: where Tune cannot read its state back it starts the experiment over from this.
    param_space = {"trial": tune.grid_search([dataclasses.asdict(t) for t in trials])}
    if tune.Tuner.can_restore(str(tune_path)):
        print("  resuming: finished trials are kept")
        return tune.Tuner.restore(str(tune_path), trainable, param_space=param_space, resume_unfinished=True,
                                  resume_errored=True)
    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler

        # The frame loss alone: the total adds α · utterance loss, whose scale changes with α, so ranking on it
        # would stop high-α cells for their α rather than for how well they learn.
        steps = int(grid.train.get("steps", 300))
        scheduler = ASHAScheduler(time_attr="step", metric=ASHA_METRIC, mode="min", max_t=steps,
                                  grace_period=max(1, steps // 4))
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler, reuse_actors=True,
                                    trial_name_creator=lambda t: Trial(**t.config["trial"]).slug(),
                                    trial_dirname_creator=lambda t: Trial(**t.config["trial"]).slug()),
        run_config=_run_config(grid, tune_path, len(trials), sweep.pretrain.parent_run_id),
    )


def _run_config(grid: Grid, tune_path: Path, n_trials: int, parent_run_id: str | None = None):
    """Tune's run: retries from Tune's FailureConfig, one line per trial event (Tune's own tables only with
    --verbose), and the parent run's description rewritten as trials end (``live.LiveNote``)."""
    from ray import tune

    from pipelines.console import is_verbose

    from .console import SweepConsole
    from .live import LiveNote
    from .records import TrialRecords

    live = [LiveNote(parent_run_id, grid.name, grid.metric, n_trials)] if parent_run_id else []
    records = TrialRecords(tune_path.parent, grid.metric)  # first: a trial is recorded before anything else
    return tune.RunConfig(name=tune_path.name, storage_path=str(tune_path.parent), verbose=2 if is_verbose() else 0,
                          failure_config=tune.FailureConfig(max_failures=int(grid.train.get("max_failures", 1))),
                          callbacks=[records, SweepConsole(n_trials, grid.metric, parent_run_id=parent_run_id),
                                     *live])


def collapse_risks(grid: Grid, trials: list[Trial]) -> dict[str, str]:
    """cell -> why its recipe is expected to collapse (``model.health.collapse_risk``), for the cells that are."""
    from model.health import collapse_risk

    batch = PretrainSettings(data="-", **grid.train).batch_size
    risks = {t.cell: collapse_risk(grid.config_for(t), batch) for t in trials}
    return {cell: risk for cell, risk in risks.items() if risk}


def asda_trial(params: dict[str, Any], sweep: SweepParams) -> dict[str, Any]:
    """The Tune trainable: Tune's only parameter is the trial (the Tune table shows its cell and seed). Its first
    line in the actor's log (stderr, the log the dashboard's actor page opens on) names it: Tune runs later trials
    in the same actor (``reuse_actors``), whose log then holds each of them in turn."""
    import sys

    trial = Trial(**params["trial"])
    print(f"asda trial {trial.cell} · seed {trial.seed} of sweep {sweep.sweep_id}: started", file=sys.stderr,
          flush=True)
    return run_trial(trial, sweep)


def _trial_actor(function):
    """The Tune trainable ``function`` as the actor class Tune starts, with a repr that names the actor's trial:
    the Ray dashboard lists an actor (Actors page) and its tasks (Tasks, the job's page) by its repr, which for a
    plain function trainable is the function's name, the same for every trial. Ray reads the repr once, when the
    actor starts: an actor Tune reuses for a later trial keeps the name of its first (its log names each).
    Tune knows the class by the function's name (``_name``, asda_trial), so a sweep started before resumes."""
    from ray.tune.trainable.function_trainable import wrap_function

    return type("AsdaTrial", (wrap_function(function),), {"__repr__": _trial_repr, "__module__": __name__})


def _trial_repr(actor) -> str:
    """asda_trial(<cell> · seed <seed>): the trial actor's name in the dashboard."""
    trial = (getattr(actor, "config", None) or {}).get("trial") or {}  # the config is there once it started
    return f"asda_trial({trial.get('cell')} · seed {trial.get('seed')})"


def robustness(metrics: dict[str, Any], metric: str) -> dict[str, float]:
    """SNR in dB (as text, e.g. "-5") -> ``metric`` with noise at that SNR, from a probe's ``<metric>_snr<dB>``."""
    prefix = f"{metric}_snr"
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix) and isinstance(v, float)}


def _collect(results, grid: Grid) -> list[dict[str, Any]]:
    """One row per (cell, seed): the trial (its factor ``value``), the grid's metric and its ``metric_value``; a
    trial's ``also`` cells get rows of their own that share its pretraining (run, checkpoint, collapse)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial = dict(result.config["trial"])
        also = trial.pop("also", [])
        row = {**trial, "metric": grid.metric, "metric_value": metrics.get(grid.metric),
               "checkpoint": metrics.get("checkpoint"), "run_id": metrics.get("run_id"),
               "pretrain_loss": metrics.get("pretrain_loss"), "timing": metrics.get("timing"),
               "attn_event_share": metrics.get("attn_event_share"),
               "attn_event_share_uniform": metrics.get("attn_event_share_uniform"),
               "attention": {k: v for k, v in metrics.items() if k.startswith("attn_")},
               "robustness": robustness(metrics, grid.metric),
               "tasks": {name: (metrics.get("tasks") or {}).get(name, {}).get(metric)
                         for name, metric in ((t["name"], t["metric"]) for t in grid.tasks)},
               "collapse": metrics.get("collapse"), "alpha": metrics.get("alpha"), "cost": metrics.get("cost"),
               "alpha_effective": metrics.get("alpha_effective"),
               "error": str(result.error).splitlines()[0] if result.error else None}
        rows.append(row)
        scored = metrics.get("also") or {}
        for other in also:
            found = scored.get(other["cell"]) or {}
            rows.append({**row, **other, "shares_pretraining_of": trial["cell"], "tasks": {},
                         "metric_value": found.get(grid.metric), "robustness": robustness(found, grid.metric)})
    return sorted(rows, key=lambda r: (r["factor"] != "centre", r["factor"], str(r["value"]), r["seed"]))
