"""`asda sweep`: every trial of a grid as pretrain -> probe (or fine-tune) in a Ray Tune function trainable.

Each trial runs ``TorchTrainer(...).fit()`` (Ray Train V2) with ``TuneReportCallback`` and a run name unique to
the sweep; MLflow gets one parent run per sweep and one child per trial. The sweep's folder is named after the
grid and its fingerprint, so running the same grid again resumes it (finished trials are not redone) and a changed
grid starts a new sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from model import ASDAConfig
from pipelines import tracking
from pipelines.runtime import DATA_ROOT, REPO_ROOT, code_version

from .grid import Grid, Trial, load_grid

SWEEPS_ROOT = REPO_ROOT / "results" / "sweeps"
STATE_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
TRIAL_CPU = 0.25  # the trial's own process mostly waits on its Train run


def run_trial(params: dict[str, Any]) -> dict[str, Any]:
    """Tune function trainable: pretrain one cell with one seed, then evaluate it; reports the grid's metric."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import PretrainSettings, pretrain

    # The trial runs in a Ray worker process whose environment was fixed when Ray started: use the driver's store.
    os.environ["MLFLOW_TRACKING_URI"] = params["tracking_uri"]
    trial = Trial(**params["trial"])
    config = ASDAConfig.from_dict(params["config"])
    settings = PretrainSettings(data=params["data"], name=f"{params['sweep_id']}-{trial.slug()}",
                                storage=params["storage"], experiment=params["experiment"],
                                parent_run_id=params["parent_run_id"], seed=trial.seed, **params["train"])
    tags = {"asda.sweep": params["sweep_id"], "asda.cell": trial.cell, "asda.factor": trial.factor,
            "asda.seed": str(trial.seed), "asda.kind": "sweep-trial"}
    for name in params["factor_names"]:
        tags[f"factor.{name}"] = str(getattr(config, name))
    if trial.factor not in ("centre", "factorial"):
        tags["asda.factor_value"] = str(trial.value)
    result = pretrain(config, settings, tags=tags, callbacks=[TuneReportCallback()])
    evaluation = _evaluate(params, trial, result)
    metrics = {**evaluation, "pretrain_loss": float(result["metrics"].get("loss", float("nan"))),
               "checkpoint": result["checkpoint"], "run_id": result["run_id"]}
    tune.report(metrics)
    return metrics


def _evaluate(params: dict[str, Any], trial: Trial, pretrained: dict[str, Any]) -> dict[str, float]:
    from mlflow import MlflowClient

    evaluation = params["evaluation"]
    data = evaluation.get("data") or params["data"]
    if evaluation["kind"] == "probe":
        from pipelines.probe import ProbeSettings, probe

        out = probe(ProbeSettings(data=data, checkpoint=pretrained["checkpoint"], seed=trial.seed,
                                  experiment=params["experiment"], run_id=pretrained["run_id"],
                                  **(evaluation.get("settings") or {})))
    else:
        from pipelines.finetune import FinetuneSettings, finetune

        settings = FinetuneSettings(data=data, checkpoint=pretrained["checkpoint"], seed=trial.seed,
                                    name=f"{pretrained['name']}-finetune", storage=params["storage"],
                                    experiment=params["experiment"], parent_run_id=params["parent_run_id"],
                                    **(evaluation.get("settings") or {}))
        out = finetune(ASDAConfig.from_dict(params["config"]), settings)
        client = MlflowClient()
        for key, value in out.items():  # the trial's run carries its final metric, whatever evaluated it
            if key.startswith("eval_") and isinstance(value, float):
                client.log_metric(pretrained["run_id"], key, value)
    return {k: float(v) for k, v in out.items() if k.startswith(("eval_", "train_")) and isinstance(v, float)}


def sweep_dir(grid: Grid, storage: Path = SWEEPS_ROOT) -> Path:
    return Path(storage).resolve() / f"{grid.name}-{grid.fingerprint()}"


def prepared_data(grid: Grid) -> Path:
    """The grid's prepared folder; the synthetic default is generated and prepared on first use."""
    data = grid.data
    if "prepared" in data:
        path = Path(data["prepared"]).expanduser().resolve()
        if not (path / "dataset.json").is_file():
            raise ValueError(f"grid {grid.path}: data.prepared {path} is not a prepared data set; run asda prepare")
        return path
    dataset = data.get("dataset", "synthetic")
    options = data.get("options") or {}
    suffix = "" if not options else "-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    path = DATA_ROOT / "prepared" / f"{dataset}{suffix}"
    if not (path / "dataset.json").is_file():
        if dataset != "synthetic" and "source" not in data:
            raise ValueError(f"grid {grid.path}: data needs 'prepared' (a folder) or 'source' for {dataset}")
        from pipelines.prepare import prepare

        source = Path(data.get("source") or DATA_ROOT / "raw" / f"{dataset}{suffix}")
        print(f"preparing {dataset} into {path} (first use)")
        prepare(dataset, source, path, options=options)
    return path


LOCAL_MAX_TRIALS = 4  # concurrent trials on a local instance; each holds ~1-2 GB in a dozen processes


def _concurrency(grid: Grid, n_trials: int, requested: int | None) -> tuple[int, float, int]:
    """(max concurrent trials, Ray CPUs per Train worker, torch threads per worker)."""
    import ray

    workers = int(grid.train.get("workers", 1))
    if grid.train.get("use_gpu"):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        auto = max(1, gpus // workers)
        return min(requested or auto, n_trials), 1.0, int(grid.train.get("threads_per_worker") or 4)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if os.environ.get("RAY_ADDRESS"):
        per_worker = float(grid.train.get("cpus_per_worker") or 1.0)
        auto = max(1, int((cpus * 0.75) // (workers * per_worker + TRIAL_CPU)))  # leave a quarter for Ray Data
        return min(requested or auto, n_trials), per_worker, max(1, int(per_worker))
    # One trial per core (at most LOCAL_MAX_TRIALS), each Train worker on its share of the cores. A trial's
    # start-up is CPU work (a dozen Ray processes importing), not waiting: on 2 cores the default ablation took
    # 16.5 min with three trials at a time and 13.9 min with two.
    cores = os.cpu_count() or 1
    concurrent = min(requested or max(1, min(cores, LOCAL_MAX_TRIALS)), n_trials)
    return concurrent, 1.0, max(1, cores // (concurrent * workers))


def _parent_run(grid: Grid, state: dict, experiment: str) -> str:
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
    run = client.create_run(experiment_id, run_name=f"sweep-{state['sweep_id']}",
                            tags={"asda.kind": "sweep", "asda.sweep": state["sweep_id"], "asda.grid": grid.name,
                                  "asda.code_version": code_version()})
    run_id = run.info.run_id
    tracking.log_params(client, run_id, {
        "grid.name": grid.name, "grid.file": grid.path, "grid.fingerprint": grid.fingerprint(),
        "grid.design": grid.design, "grid.metric": grid.metric, "grid.trials": str(len(grid.trials())),
        "grid.factors": ",".join(grid.factors), "code_version": code_version()})
    client.log_text(run_id, Path(grid.path).read_text(), f"grid/{Path(grid.path).name}")
    return run_id


def run_sweep(grid_name_or_path: str | Path, *, storage: str | Path = SWEEPS_ROOT, fresh: bool = False,
              max_concurrent: int | None = None, asha: bool = False,
              experiment: str = tracking.DEFAULT_EXPERIMENT) -> dict[str, Any]:
    """Run (or resume) a sweep; returns {"dir", "parent_run_id", "trials", "report"}."""
    from ray import tune

    from pipelines.runtime import dashboard_url, ensure_ray

    from .report import build_report, print_report

    grid = load_grid(grid_name_or_path)  # every cell's config is validated here, before Ray starts
    trials = grid.trials()
    folder = sweep_dir(grid, storage)
    if fresh and folder.exists():
        folder = folder.with_name(f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {
        "sweep_id": f"{grid.name}-{time.strftime('%m%d-%H%M%S')}", "grid": grid.path,
        "fingerprint": grid.fingerprint()}
    data = prepared_data(grid)
    ensure_ray()
    state["parent_run_id"] = _parent_run(grid, state, experiment)
    state_path.write_text(json.dumps(state, indent=2))

    concurrent, cpus_per_worker, threads = _concurrency(grid, len(trials), max_concurrent)
    train = {**grid.train, "cpus_per_worker": cpus_per_worker, "threads_per_worker": threads, "figure_clips": 2}
    base = grid.base_config()
    param_space = {
        "trial": tune.grid_search([dataclasses.asdict(t) for t in trials]),
        "data": str(data), "storage": str(folder / "runs"), "experiment": experiment,
        "sweep_id": state["sweep_id"], "parent_run_id": state["parent_run_id"], "train": train,
        "evaluation": grid.evaluation, "factor_names": list(grid.factors), "tracking_uri": tracking.tracking_uri(),
    }
    trainable = tune.with_resources(_trial_with_config(base), {"cpu": TRIAL_CPU})
    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", metric="loss", mode="min",
                                  max_t=int(grid.train.get("steps", 300)), grace_period=max(1, int(
                                      grid.train.get("steps", 300)) // 4))
    tune_path = folder / "tune"
    print(f"sweep {state['sweep_id']}: {len(trials)} trials, {concurrent} at a time; folder {folder}")
    print(f"  Ray dashboard: {dashboard_url() or 'unknown (Ray was started elsewhere)'}   "
          f"MLflow: {tracking.ui_command()}")
    if tune.Tuner.can_restore(str(tune_path)):
        print("  resuming: finished trials are kept")
        tuner = tune.Tuner.restore(str(tune_path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler,
                                        trial_name_creator=lambda t: Trial(**t.config["trial"]).slug(),
                                        trial_dirname_creator=lambda t: Trial(**t.config["trial"]).slug()),
            run_config=tune.RunConfig(name="tune", storage_path=str(folder), verbose=1),
        )
    results = tuner.fit()
    rows = _collect(results, grid)
    (folder / TRIALS_FILE).write_text(json.dumps(rows, indent=2, default=str))
    report = build_report(rows, grid, folder / "report", parent_run_id=state["parent_run_id"], data=str(data))
    failed = [r for r in rows if r.get("error")]
    tracking.end_run(state["parent_run_id"], "FAILED" if failed else "FINISHED")
    print_report(report, grid)
    print(f"\nreport: {folder / 'report'}   MLflow parent run {state['parent_run_id']}: {tracking.ui_command()}")
    return {"dir": str(folder), "parent_run_id": state["parent_run_id"], "trials": rows, "report": report}


def _trial_with_config(base: ASDAConfig):
    """The trainable with the cell's full config resolved from the grid's base model (kept out of param_space so
    the Tune table shows only the factors)."""
    base_dict = base.to_dict()

    def trainable(params: dict[str, Any]) -> dict[str, Any]:
        trial = Trial(**params["trial"])
        config = ASDAConfig.from_dict(base_dict).with_overrides(trial.overrides)
        return run_trial({**params, "config": config.to_dict()})

    trainable.__name__ = "asda_trial"
    return trainable


def _collect(results, grid: Grid) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        trial = result.config["trial"]
        metrics = result.metrics or {}
        row = {**trial, "metric": grid.metric, "value": metrics.get(grid.metric),
               "checkpoint": metrics.get("checkpoint"), "run_id": metrics.get("run_id"),
               "pretrain_loss": metrics.get("pretrain_loss"),
               "error": str(result.error).splitlines()[0] if result.error else None}
        rows.append(row)
    return sorted(rows, key=lambda r: (r["factor"] != "centre", r["factor"], str(r["value"]), r["seed"]))
