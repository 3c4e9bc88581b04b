"""What a grid costs before it runs: its trials and evaluations counted from the grid, the rate of each distinct
model measured briefly on this machine (or scaled from a given clips/s), and from those the wall time with the
sweep's concurrency and the device-hours.

    est = estimate(load_grid("ablation"))             # measures here, ~15 s on 2 cores
    est = estimate(load_grid("paper"), clips_per_s=90, devices=32)  # 90 clips/s per GPU, 32 GPUs
    print(format_estimate(est)); print(estimate_line(...))

A trial's time is modelled as the work it does, piece by piece, each at a rate measured for it
(``sweeps.rates``): the pretraining updates of its cell's model; the attention measurement over
``attention_clips`` clips; its evaluation (a probe: encoding every clip it reads at the measured forward rate,
once per Ray Data pass, plus a fit per read-out; fine-tuning: its updates at the measured fine-tuning rate and the
encoding of the evaluation split); each task's probe; and a fixed overhead. The trials are then laid out as Tune
runs them, in grid order on ``concurrent`` slots, the first trial of each slot paying for its process's start.
The random-init baseline runs after the trials, alone, on this process; Ray's start, the data's preparation
(where the data is not prepared yet) and the report add fixed times.

What is measured here and what is taken from measurements recorded elsewhere is said in the estimate itself
(``est["sources"]``); the taken numbers are the constants below, each with where it was measured and how to
measure it again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ASDAConfig

from .grid import Grid, Trial, load_grid, prepared_path

# --- numbers taken from recorded measurements (2-core machine of docs/benchmarks.md) ---------------------------
# A trial's wall time beyond its training loop, its evaluation and (now measured apart) the attention
# measurement, in a process that has run a trial before: "about 2 s" (docs/benchmarks.md, "A sweep": the ablation
# grid under `asda bench sweep --grid ablation`, trials[].overhead_s). Its checkpoint, MLflow logging, figures and
# the training feed's start are in it.
TRIAL_OVERHEAD_S = 2.0
# The first trial of a fresh Tune actor: ~10 s more (same source), process start and imports.
FIRST_TRIAL_S = 10.0
# One Ray Data pass of the probe (``pipelines.inference.model_outputs``) costs, besides encoding its clips, the
# wall time of Ray Data's executor and of starting its actor: the same probe (2,560 clips, one pass) took 21.3 s on
# Ray Data against 10.9 s in process, the second probe of a process as a trial's is (docs/benchmarks.md, "Driver
# memory", measured on a loaded machine; its CPU-seconds, ~6.5, understate the wall time). A trial probes in two
# passes where it scores noisy copies too.
PASS_OVERHEAD_S = 10.4
# A Ray Train run on a worker group (controller, workers, dataset split) instead of in the trial's process: the
# `smoke` grid's mean wall overhead per trial, 42.8 s on the worker-group path against 10.1 s in process
# (docs/benchmarks.md, "A sweep"; `asda bench sweep --grid smoke --path distributed` and `--path in_process`).
TRAIN_RUN_START_S = 33.0
# Starting the local Ray instance: 12.7 CPU-s, measured alone (docs/benchmarks.md, "A sweep").
RAY_START_S = 12.7
# The report's tables and figures, their MLflow artifacts and Ray's shutdown: 6.2 s from the baseline's last line
# to the command's exit in `asda sweep --grid ablation` of 2026-12-05 (docs/benchmarks.md, "What a grid costs";
# its output timestamped line by line measures it again).
REPORT_S = 6.0
# Generating and preparing a synthetic set on first use: the README's default sweep spent "about half a minute" on
# its data (2,560 clips of 1 s) and Ray's start together; less Ray's 12.7 s, ~17 s, of which ~5 s is Ray Data
# starting the job (of a prepare run's 17-20 fixed CPU-s, docs/benchmarks.md "Data", Ray's own start is 12.7):
# 5 s + 5 ms per second of audio. `asda prepare --dataset synthetic ...` under `time` measures it again.
PREPARE_FIXED_S = 5.0
PREPARE_S_PER_AUDIO_S = 0.005

PROBE_WARMUP, PROBE_REPEATS, PROBE_BUDGET_S = 2, 8, 1.5  # per measured job: warm-up calls, timed calls, seconds
SHARED_REPEATS, SHARED_BUDGET_S = 40, 5.0  # the update timed in several processes at once: longer, it varies more
ESTIMATES_DIR = "estimates"  # under the sweeps' storage: the rates an --estimate measured, for sweep headers
GPU_THREADS = 4  # torch threads per GPU worker unless the grid says (the sweep driver's default)


# --- the data a grid reads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFacts:
    """What the estimate needs of a data set, read from its card, or from a synthetic set's options before it is
    generated: clips per split (None: unknown), frames fed per clip, classes, and whether it is prepared."""

    name: str
    path: str
    splits: dict[str, int] | None
    target_length: int | None
    classes: int | None
    prepared: bool
    audio_seconds: float | None  # a synthetic set not yet prepared: what preparing it will process
    source: str


def data_facts(section: dict[str, Any] | str) -> DataFacts:
    """The card's facts where the data is prepared; a synthetic set's from its options; else unknown counts."""
    from pipelines.data.card import load_card

    path = prepared_path(section)
    try:
        card = load_card(path)
    except (ValueError, OSError):
        card = None
    if card is not None:
        return DataFacts(card.get("name", "?"), str(path), dict(card["splits"]), card["target_length"],
                         len(card["class_names"]), True, None, f"card {path}")
    dataset = section.get("dataset", "synthetic") if isinstance(section, dict) and "prepared" not in section else None
    if dataset != "synthetic":
        return DataFacts(dataset or "?", str(path), None, None, None, False, None,
                         f"no card at {path}: clip counts unknown, so the evaluation's encoding is not counted")
    from pipelines.data.synthetic import class_names, resolve_params

    params = resolve_params(**(section.get("options") or {}))
    splits = {s: params[f"num_{s}"] for s in ("train", "valid", "test") if params[f"num_{s}"]}
    frames = -(-int(round(params["clip_seconds"] * 100)) // 16) * 16  # as the synthetic adapter's card says
    return DataFacts("synthetic", str(path), splits, frames, len(class_names(params["classes"])), False,
                     sum(splits.values()) * params["clip_seconds"],
                     f"the grid's synthetic options (prepared on first use into {path})")


# --- FLOPs per clip, counted on the meta device (no memory, no time at any size) -------------------------------


@functools.lru_cache(maxsize=256)
def gflops_per_clip(kind: str, config: ASDAConfig, classes: int = 2) -> float:
    """GFLOPs one clip of ``config.target_length`` frames costs: "pretrain" (student and teacher forward,
    backward), "finetune" (the classifier's forward and backward, ``classes`` outputs) or "encode" (the encoder's
    forward), by torch's counter on the meta device; counted once per model and process."""
    from torch.utils.flop_counter import FlopCounterMode

    from model import ASDA, ASDAClassifier, ASDAEncoder
    from pipelines.cost import CPU_ATTENTION_FLOPS

    with torch.device("meta"), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        x = torch.randn(1, config.target_length, config.num_mel_bins)
        if kind == "pretrain":
            ASDA(config).train()(x)["loss"].backward()
        elif kind == "finetune":
            ASDAClassifier(config, classes).train()(x).sum().backward()
        else:
            with torch.no_grad():
                ASDAEncoder(config).eval().extract_features(x)
    return counter.get_total_flops() / 1e9


# --- what the grid runs -----------------------------------------------------------------------------------------


def _pretrain_length(grid: Grid, facts: DataFacts) -> int:
    return int(grid.train.get("target_length") or facts.target_length or grid.base_config().target_length)


def cost_key(config: ASDAConfig) -> str:
    """Cells whose models cost the same per clip share one measurement: equal counted FLOPs, and equal choices
    whose work the FLOP counter does not see (norms, the attention kind)."""
    flops = gflops_per_clip("pretrain", config)
    return (f"{flops:.4f} GFLOP/clip, {config.attention}, {config.diff_norm}, "
            f"{'learnable' if config.learnable_lambda else 'fixed'} lambda, {config.target_length} frames")


def model_groups(grid: Grid, trials: list[Trial], length: int) -> dict[str, dict[str, Any]]:
    """cost key -> {"config" (the first cell's, at the pretraining length), "cells", "gflops"}, in grid order."""
    groups: dict[str, dict[str, Any]] = {}
    for trial in trials:
        config = dataclasses.replace(grid.config_for(trial), target_length=length)
        group = groups.setdefault(cost_key(config), {"config": config, "cells": [],
                                                      "gflops": gflops_per_clip("pretrain", config)})
        if trial.cell not in group["cells"]:
            group["cells"].append(trial.cell)
    return groups


def probe_work(settings: dict[str, Any], facts: DataFacts) -> dict[str, Any]:
    """One probe of ``settings`` (ProbeSettings fields) on data with ``facts``: {"passes" (Ray Data passes: the
    clean splits, then the noisy scored split), "clips" (encoded, None where unknown), "train_clips", "fits" (per
    read-out: one, or one per fold), "length", "batch"}."""
    from pipelines.probe import ProbeSettings

    s = ProbeSettings(data="-", **settings)
    noisy = bool(s.noise_snrs) and not s.cv_folds
    work = {"passes": 1 + int(noisy), "fits": max(1, s.cv_folds), "clips": None, "batch": s.batch_size,
            "length": s.target_length or facts.target_length}
    if facts.splits is not None:
        eval_split = s.eval_split or next((x for x in ("test", "valid") if x in facts.splits), None)
        train, scored = facts.splits.get(s.train_split, 0), facts.splits.get(eval_split, 0)
        work["clips"] = train + (0 if s.cv_folds else scored * (1 + len(s.noise_snrs) * noisy))
        work["train_clips"] = train
    return work


def finetune_work(grid: Grid, facts: DataFacts) -> dict[str, Any]:
    """A fine-tuning of the grid's evaluation, its recipe resolved as ``pipelines.recipes`` does: {"runs" (one,
    or one per fold), "updates", "clips_per_update", "workers", "in_process", "eval_clips", "length", "batch"}."""
    from pipelines.finetune import FinetuneSettings
    from pipelines.recipes import resolve

    settings = FinetuneSettings(data="-", **{**(grid.evaluation.get("settings") or {}), **grid.centre_evaluation})
    resolved = resolve(settings, {"name": facts.name})[0]
    folds = max(1, resolved.cv_folds)
    eval_split = resolved.eval_split or next((x for x in ("test", "valid") if x in (facts.splits or {})), None)
    eval_clips = None if facts.splits is None else facts.splits.get(eval_split, 0)
    return {"runs": folds, "updates": resolved.steps, "clips_per_update": resolved.batch_size * resolved.workers,
            "workers": resolved.workers, "use_gpu": resolved.use_gpu, "in_process": resolved.in_process,
            "eval_clips": eval_clips, "length": resolved.target_length or facts.target_length,
            "batch": resolved.eval_batch_size, "classes": facts.classes or 2}


def counts(grid: Grid) -> dict[str, Any]:
    """How many pretrainings, evaluations and updates the grid runs (nothing measured, no data read)."""
    from pipelines.pretrain import PretrainSettings

    trials = grid.trials()
    also = sum(len(t.also) for t in trials)
    train = PretrainSettings(data="-", **grid.train)
    steps, batch, workers = train.steps, train.batch_size, train.workers
    return {"grid": grid.name, "trials": len(trials), "cells": len({t.cell for t in trials}), "seeds": len(grid.seeds),
            "evaluations": len(trials) + also, "shared_evaluations": also, "baseline": len(grid.seeds),
            "task_probes": len(grid.tasks) * (len(trials) + len(grid.seeds)), "updates_per_trial": steps,
            "clips_per_update": batch * workers, "clips_per_trial": steps * batch * workers,
            "kind": grid.evaluation["kind"]}


# --- where the trials run -----------------------------------------------------------------------------------------


def placement(grid: Grid, n_trials: int, concurrent: int | None, devices: int | None) -> dict[str, Any]:
    """Trials at a time and devices per trial, as ``sweeps.driver._concurrency`` decides them, without Ray: a GPU
    grid takes ``train.workers`` GPUs per trial out of ``devices`` (default: this machine's GPUs, else one trial's
    worth); a CPU grid runs one trial per core on this machine (at most ``LOCAL_MAX_TRIALS``) or, with
    ``devices`` CPUs of a cluster, as many as three quarters of them hold (the rest is Ray Data's).
    ``concurrent`` (``--max-concurrent``) overrides the automatic count, as in the driver."""
    from .resources import LOCAL_MAX_TRIALS, SWEEP_THREADS, auto_concurrency

    workers = int(grid.train.get("workers", 1))
    if grid.train.get("use_gpu"):
        devices = devices or torch.cuda.device_count() or workers
        if devices < workers:
            raise ValueError(f"devices={devices} is not allowed for grid {grid.name}: each trial trains on "
                             f"train.workers = {workers} GPUs")
        unit, threads = "GPU", int(grid.train.get("threads_per_worker") or GPU_THREADS)
        local = False
    else:
        unit, threads = "core", int(grid.train.get("threads_per_worker") or SWEEP_THREADS)
        local = devices is None
        devices = (os.cpu_count() or 1) if local else devices
    if devices < 1 or (concurrent is not None and concurrent < 1):
        raise ValueError(f"devices={devices}, concurrent={concurrent} are not allowed: expected >= 1")
    per_worker = float(grid.train.get("cpus_per_worker") or 1.0)
    auto = auto_concurrency(use_gpu=bool(grid.train.get("use_gpu")), devices=devices, workers=workers, local=local,
                            per_worker=per_worker)
    slots = min(concurrent or auto, n_trials)
    # Timed in as many processes at once as trials will share this machine; on a cluster each has its own.
    processes = min(slots, LOCAL_MAX_TRIALS) if local else 1
    return {"concurrent": slots, "devices": devices, "devices_per_trial": workers, "unit": unit,
            "threads": threads, "local": local, "processes": processes}


# --- the rates ---------------------------------------------------------------------------------------------------


def _plan(grid: Grid) -> dict[str, Any]:
    """Everything the time model needs that comes from the grid and its data's facts (nothing measured)."""
    from pipelines.pretrain import PretrainSettings

    trials = grid.trials()
    data = data_facts(grid.data)
    length = _pretrain_length(grid, data)
    groups = model_groups(grid, trials, length)
    keys = {t.cell: cost_key(dataclasses.replace(grid.config_for(t), target_length=length)) for t in trials}
    train = PretrainSettings(data="-", **grid.train)
    splits = data.splits or {}  # the attention is measured on the figure's split (else valid, test or train)
    split = train.figure_split or next((s for s in ("valid", "test", "train") if s in splits), None)
    kind = grid.evaluation["kind"]
    eval_data = data_facts(grid.evaluation["data"]) if grid.evaluation.get("data") else data
    tasks = [(t, data_facts(t["data"])) for t in grid.tasks]
    centre = grid.base_config().with_overrides(grid.model_centre)
    return {"trials": trials, "counts": counts(grid), "data": data, "eval_data": eval_data, "tasks": tasks,
            "length": length, "groups": groups, "keys": keys, "kind": kind, "centre": centre,
            "attention_clips": min(train.attention_clips, splits.get(split, train.attention_clips)),
            "in_process": grid.trains_in_process,
            "batch": train.batch_size, "precision": train.precision, "compile": train.compile}



def _evaluations(grid: Grid, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The distinct evaluation workloads: the grid's own (probe or fine-tuning), then each task's probe."""
    settings = {k: v for k, v in (grid.evaluation.get("settings") or {}).items() if k != "features"}
    settings["readout"] = grid.centre_evaluation["readout"]  # the older name "features" resolved into it
    if plan["kind"] == "probe":
        own = {"name": "grid", **probe_work(settings, plan["eval_data"])}
    else:
        own = {"name": "grid", **finetune_work(grid, plan["eval_data"])}
    tasks = [{"name": f"task {t['name']}", **probe_work(t["settings"], facts)} for t, facts in plan["tasks"]]
    for work, facts in zip([own, *tasks], [plan["eval_data"], *(f for _, f in plan["tasks"])], strict=True):
        work["length"] = work["length"] or plan["length"]
        work["classes"] = facts.classes or 2
    return [own, *tasks]


def _jobs(grid: Grid, plan: dict[str, Any]) -> list[tuple[str, Any]]:
    """(rate name, RateJob) of every piece of work to time: each distinct model's pretraining update, encoding at
    each evaluation's length, the attention measurement, the probe's fit, a fine-tuning update."""
    from pipelines.inference import readout_width

    from .rates import RateJob

    centre = plan["centre"]
    jobs = [(f"pretrain|{key}", RateJob("pretrain", g["config"], plan["batch"], precision=plan["precision"],
                                        compile=plan["compile"])) for key, g in plan["groups"].items()]
    if plan["attention_clips"]:
        jobs.append((f"attention|{plan['length']}", RateJob("attention", g_at(centre, plan["length"]), 64)))
    for work in _evaluations(grid, plan):
        config = g_at(centre, work["length"])
        jobs.append((f"encode|{work['length']}", RateJob("encode", config, work["batch"])))
        if "updates" in work:
            jobs.append((f"finetune|{work['length']}", RateJob("finetune", config, work["clips_per_update"]
                                                               // work["workers"], classes=work["classes"])))
        elif work.get("train_clips"):
            width = readout_width(config, "cls+mean")  # the widest read-out: the slow end of a fit
            jobs.append((f"fit|{work['name']}", RateJob("fit", config, work["train_clips"], classes=work["classes"],
                                                        width=width)))
    return list(dict(jobs).items())  # each rate once


def g_at(config: ASDAConfig, length: int) -> ASDAConfig:
    """``config`` fed ``length`` frames."""
    return dataclasses.replace(config, target_length=int(length))


def measured_rates(grid: Grid, plan: dict[str, Any], where: dict[str, Any], device: str) -> dict[str, Any]:
    """Every job timed alone in this process, then, where trials share this machine, the first cell's pretraining
    update timed in ``where["processes"]`` processes at once, for longer: how much slower a process beside the
    others runs (``slowdown``) divides every rate a trial gets. The baseline runs alone, at the rates as timed.
    Rates are clips/s per worker; a ``fit`` rate is seconds per fit."""
    from .rates import measure

    jobs = _jobs(grid, plan)
    timing = {"warmup": PROBE_WARMUP, "repeats": PROBE_REPEATS, "budget_s": PROBE_BUDGET_S}
    started = time.perf_counter()
    alone = measure([j for _, j in jobs], processes=1, threads=where["threads"], device=device, **timing)
    rates = {name: _rate(job, s) for (name, job), s in zip(jobs, alone["seconds"], strict=True)}
    slowdown = None
    if where["processes"] > 1:
        name, job = jobs[0]
        shared = measure([job], processes=where["processes"], threads=where["threads"], device=device,
                         warmup=PROBE_WARMUP, repeats=SHARED_REPEATS, budget_s=SHARED_BUDGET_S)
        slowdown = max(1.0, rates[name] / _rate(job, shared["seconds"][0]))  # sharing is never faster
    how = (f"measured here in {time.perf_counter() - started:.0f} s, {where['threads']} torch thread(s) per "
           f"process, on {device}: each job alone ({PROBE_WARMUP} warm-up and 3-{PROBE_REPEATS} timed calls, the "
           f"median)" + (f", then the first cell's update in {where['processes']} processes at once (the trials "
                         f"this machine runs together): {slowdown:.2f}x slower than alone" if slowdown else ""))
    return {"rates": rates, "slowdown": slowdown or 1.0, "how": how, "device": device, "measured": True,
            "processes": where["processes"], "threads": where["threads"], "probe_s": time.perf_counter() - started}


def _rate(job, seconds: float) -> float:
    return seconds if job.kind == "fit" else job.batch / seconds


def given_rates(grid: Grid, plan: dict[str, Any], clips_per_s: float) -> dict[str, Any]:
    """Every rate from one given pretraining rate of the centre's model (clips/s per device), scaled by counted
    FLOPs per clip: a model with twice the FLOPs per clip runs at half the clips/s, at the given rate's
    efficiency."""
    if not clips_per_s > 0:
        raise ValueError(f"clips_per_s={clips_per_s!r} is not allowed: expected a positive number")
    centre = g_at(plan["centre"], plan["length"])
    work = clips_per_s * gflops_per_clip("pretrain", centre)  # GFLOP/s
    rates = {}
    for name, job in _jobs(grid, plan):
        kind = job.kind
        if kind == "fit":
            rates[name] = 0.0
        else:
            counted = "encode" if kind == "attention" else kind
            rates[name] = work / gflops_per_clip(counted, job.config, job.classes)
    how = (f"from a given {clips_per_s:g} clips/s per device for the centre's model, every other rate scaled by "
           f"its FLOPs per clip (counted on the meta device); nothing measured; the probe's fit not counted")
    return {"rates": rates, "slowdown": 1.0, "how": how, "device": "given", "measured": False, "processes": 1,
            "threads": None, "probe_s": 0.0, "clips_per_s": clips_per_s}


# --- the time model -------------------------------------------------------------------------------------------


def _rate_of(rates: dict[str, Any], name: str, alone: bool) -> float:
    """A rate as a process running alone (the baseline) or beside the sweep's other trials gets it."""
    return rates["rates"][name] / (1.0 if alone else rates["slowdown"])


def _pass_s(rates: dict[str, Any], alone: bool) -> float:
    """The fixed cost of one Ray Data pass (``PASS_OVERHEAD_S``), slowed as every process beside another trial
    is."""
    return PASS_OVERHEAD_S * (1.0 if alone else rates["slowdown"])


def probe_seconds(work: dict[str, Any], rates: dict[str, Any], readouts: int, alone: bool) -> float:
    """A probe: its passes' fixed cost, its clips at the encoding rate, a fit per read-out (and fold)."""
    seconds = work["passes"] * _pass_s(rates, alone)
    if work["clips"]:
        seconds += work["clips"] / _rate_of(rates, f"encode|{work['length']}", alone)
    fit = rates["rates"].get(f"fit|{work['name']}", 0.0) * (1.0 if alone else rates["slowdown"])
    return seconds + work["fits"] * readouts * fit


def finetune_seconds(work: dict[str, Any], rates: dict[str, Any], readouts: int, alone: bool) -> float:
    """Fine-tunings: each run's updates at the fine-tuning rate (per worker, times the workers), a Train run's
    start unless it trains in process, and the encoding of the evaluation split."""
    updates = work["updates"] * work["clips_per_update"] / (
        _rate_of(rates, f"finetune|{work['length']}", alone) * work["workers"])
    start = 0.0 if work["in_process"] else TRAIN_RUN_START_S
    encode = _pass_s(rates, alone) + (work["eval_clips"] or 0) / _rate_of(rates, f"encode|{work['length']}", alone)
    return work["runs"] * readouts * (updates + start + encode)


def _evaluation_s(work: dict[str, Any], rates: dict[str, Any], readouts: int, alone: bool) -> float:
    if "updates" in work:
        return finetune_seconds(work, rates, readouts, alone)
    return probe_seconds(work, rates, readouts, alone)


def trial_seconds(trial: Trial, plan: dict[str, Any], evaluations: list[dict[str, Any]],
                  rates: dict[str, Any]) -> dict[str, float]:
    """Seconds of each part of one trial, run beside the sweep's other trials."""
    workers = plan["counts"]["clips_per_update"] // plan["batch"]
    train = plan["counts"]["clips_per_trial"] / (_rate_of(rates, f"pretrain|{plan['keys'][trial.cell]}", False)
                                                 * workers)
    attention = (plan["attention_clips"] / _rate_of(rates, f"attention|{plan['length']}", False)
                 if plan["attention_clips"] else 0.0)
    own, *tasks = evaluations
    evaluation = _evaluation_s(own, rates, 1 + len(trial.also), alone=False)
    task_s = sum(probe_seconds(t, rates, 1, alone=False) for t in tasks)
    overhead = TRIAL_OVERHEAD_S * rates["slowdown"] + (0.0 if plan["in_process"] else TRAIN_RUN_START_S)
    return {"train_s": train, "attention_s": attention, "eval_s": evaluation, "tasks_s": task_s,
            "overhead_s": overhead, "total_s": train + attention + evaluation + task_s + overhead}


def baseline_seconds(grid: Grid, evaluations: list[dict[str, Any]], rates: dict[str, Any]) -> float:
    """The random-init baseline: each seed's evaluation and task probes, one after another on the sweep's own
    process once the trials are done (so at the rates of a process running alone)."""
    own, *tasks = evaluations
    per_seed = _evaluation_s(own, rates, 1, alone=True) + sum(probe_seconds(t, rates, 1, True) for t in tasks)
    return per_seed * len(grid.seeds)


def first_trial_extra_s(rates: dict[str, Any]) -> float:
    """What the first trial of a fresh Tune actor pays on top: its process's start and imports."""
    return FIRST_TRIAL_S * rates["slowdown"]


def schedule(durations: list[float], slots: int, first_extra: float) -> float:
    """The makespan of trials run in order on ``slots`` slots, each taken by the first slot to free up (as Tune
    runs a grid search), the first trial on each slot paying ``first_extra``."""
    free = [0.0] * max(1, slots)
    started = [False] * len(free)
    for seconds in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += seconds + (0.0 if started[i] else first_extra)
        started[i] = True
    return max(free) if durations else 0.0


def fixed_seconds(plan: dict[str, Any], where: dict[str, Any]) -> dict[str, float]:
    """The sweep's own fixed times: Ray's start (a local instance), the report, and preparing each synthetic set
    that is not prepared yet."""
    sets = {f.path: f for f in [plan["data"], plan["eval_data"], *(f for _, f in plan["tasks"])]}.values()
    prepare = sum(PREPARE_FIXED_S + f.audio_seconds * PREPARE_S_PER_AUDIO_S
                  for f in sets if not f.prepared and f.audio_seconds is not None)
    return {"ray_start_s": RAY_START_S if where["local"] else 0.0, "report_s": REPORT_S, "prepare_s": prepare}


# --- the estimate -----------------------------------------------------------------------------------------------


def estimate(grid: Grid | str, *, clips_per_s: float | None = None, concurrent: int | None = None,
             devices: int | None = None, rates: dict[str, Any] | None = None) -> dict[str, Any]:
    """What running ``grid`` costs: counts, the rate of each distinct model, each trial's parts, the wall time at
    the sweep's concurrency and the device-hours (see the module's docstring for the model).

    ``clips_per_s``: the centre's pretraining rate per device (e.g. published, or measured on the cluster), in
    place of measuring here; ``concurrent``: trials at a time (``--max-concurrent``); ``devices``: GPUs (a GPU
    grid) or a cluster's CPUs (a CPU grid) the sweep gets, default this machine's; ``rates``: an earlier
    estimate's ``rates`` (no measuring). A GPU grid on a machine without a GPU needs ``clips_per_s``."""
    grid = load_grid(grid) if isinstance(grid, str | Path) else grid
    plan = _plan(grid)
    where = placement(grid, len(plan["trials"]), concurrent, devices)
    if rates is None and clips_per_s is not None:
        rates = given_rates(grid, plan, clips_per_s)
    elif rates is None:
        device = "cuda" if grid.train.get("use_gpu") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"grid {grid.name} trains on GPUs and this machine has none to measure on: give the "
                             f"rate, --clips-per-s (clips/s of one GPU for the centre's model; docs/benchmarks.md "
                             f"has measured ones), with --devices N for N GPUs")
        rates = measured_rates(grid, plan, where, device)
    evaluations = _evaluations(grid, plan)
    parts = [trial_seconds(t, plan, evaluations, rates) for t in plan["trials"]]
    first = first_trial_extra_s(rates)
    trials_s = schedule([p["total_s"] for p in parts], where["concurrent"], first)
    baseline_s = baseline_seconds(grid, evaluations, rates)
    fixed = fixed_seconds(plan, where)
    eval_devices = evaluations[0].get("workers", 1) if "updates" in evaluations[0] else 1
    trial_total = sum(p["total_s"] for p in parts) + first * where["concurrent"]
    return {"grid": grid.name, "counts": plan["counts"], "placement": where, "rates": rates,
            "models": _models(plan, rates), "evaluations": evaluations, "data": dataclasses.asdict(plan["data"]),
            "attention_clips": plan["attention_clips"], "trial": _mean_parts(parts), "first_trial_extra_s": first,
            "per_trial": [{"cell": t.cell, "seed": t.seed, **p} for t, p in zip(plan["trials"], parts, strict=True)],
            "trial_range_s": [min(p["total_s"] for p in parts), max(p["total_s"] for p in parts)],
            "wall": {"trials_s": trials_s, "baseline_s": baseline_s, **fixed,
                     "total_s": trials_s + baseline_s + sum(fixed.values())},
            "device_hours": (trial_total * where["devices_per_trial"] + baseline_s * eval_devices) / 3600,
            "trial_device_seconds": trial_total, "sources": _sources(plan, rates),
            "fingerprint": grid.fingerprint(), "machine": machine(), "created": time.time()}


def _models(plan: dict[str, Any], rates: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"cells": g["cells"], "gflops_per_clip": g["gflops"], "key": key,
             "clips_per_s": _rate_of(rates, f"pretrain|{key}", False),
             "clips_per_s_alone": _rate_of(rates, f"pretrain|{key}", True)} for key, g in plan["groups"].items()]


def _mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def _sources(plan: dict[str, Any], rates: dict[str, Any]) -> list[str]:
    """Where each number of the estimate comes from, in words."""
    found = [f"rates: {rates['how']}",
             f"data: {plan['data'].source}" + ("" if plan["eval_data"] is plan["data"]
                                               else f"; evaluation data: {plan['eval_data'].source}")]
    if rates["slowdown"] > 1.0:
        found.append(f"trials share this machine: every rate a trial gets is the rate alone / {rates['slowdown']:.2f}, "
                     f"and the fixed costs below, recorded on an unshared process, x {rates['slowdown']:.2f}")
    found += [f"first trial of each Tune actor: +{FIRST_TRIAL_S:g} s, its process's start and imports "
              f"(docs/benchmarks.md, 'A sweep')",
              f"per-trial overhead {TRIAL_OVERHEAD_S:g} s (checkpoint, MLflow, figures, the feed's start): "
              f"docs/benchmarks.md ('A sweep', asda bench sweep --grid ablation)",
              f"each Ray Data pass of a probe: {PASS_OVERHEAD_S:g} s besides encoding (docs/benchmarks.md, 'Driver "
              f"memory': the same probe on Ray Data and in process)",
              f"Ray's start {RAY_START_S:g} s, report {REPORT_S:g} s, preparing a synthetic set {PREPARE_FIXED_S:g} s "
              f"+ {PREPARE_S_PER_AUDIO_S * 1000:g} ms per audio second: README and docs/benchmarks.md",
              "a Train run on a worker group (not in the trial's process) starts in "
              f"{TRAIN_RUN_START_S:g} s (docs/benchmarks.md, 'A sweep', smoke grid); DDP over workers is taken to "
              "scale perfectly"]
    return found


def machine() -> str:
    """This machine, as the saved rates are keyed: its processor, cores, GPUs and torch."""
    model = "?"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{model} x{os.cpu_count()}" + (f", {len(gpus)} x {gpus[0]}" if gpus else "") + f", torch {torch.__version__}"


# --- text ----------------------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """12 s, 3 min 5 s, 2 h 10 min, 3.2 days."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    if seconds < 4 * 86400:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    return f"{seconds / 86400:.1f} days"


def hours(value: float) -> str:
    """0.29, 12.4, 1,878: two decimals below 10, none from 100."""
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def format_estimate(est: dict[str, Any]) -> str:
    """The estimate as the command line prints it: counts, rates, a trial's parts, the sweep's time and where each
    number came from."""
    c, where, wall, trial = est["counts"], est["placement"], est["wall"], est["trial"]
    shared = f" + {c['shared_evaluations']} sharing a trial's pretraining" if c["shared_evaluations"] else ""
    lines = [f"grid {est['grid']}: {c['trials']} pretraining trials ({c['cells']} cells x {c['seeds']} seeds), "
             f"{c['updates_per_trial']:,} updates x {c['clips_per_update']} clips = {c['clips_per_trial']:,} clips "
             f"each",
             f"  evaluations  {c['evaluations']} {c['kind']}s of trained encoders ({c['trials']}{shared}), "
             f"{c['baseline']} of the random-init baseline"
             + (f", {c['task_probes']} task probes" if c["task_probes"] else ""),
             *_rate_lines(est)]
    lines += [f"  a trial      {duration(trial['total_s'])} on average ({duration(est['trial_range_s'][0])} to "
              f"{duration(est['trial_range_s'][1])}): training {duration(trial['train_s'])}, attention "
              f"{duration(trial['attention_s'])}, evaluation {duration(trial['eval_s'])}"
              + (f", tasks {duration(trial['tasks_s'])}" if trial["tasks_s"] else "")
              + f", overhead {duration(trial['overhead_s'])}; the first on each actor "
              f"+{duration(est['first_trial_extra_s'])}",
              f"  the sweep    {duration(wall['total_s'])}: {where['concurrent']} trial(s) at a time "
              f"{duration(wall['trials_s'])}, baseline {duration(wall['baseline_s'])}, Ray's start "
              f"{duration(wall['ray_start_s'])}, report {duration(wall['report_s'])}"
              + (f", preparing data {duration(wall['prepare_s'])}" if wall["prepare_s"] else ""),
              f"  device-hours {hours(est['device_hours'])} {where['unit']}-hours ({where['devices_per_trial']} "
              f"{where['unit']}(s) per trial, {where['devices']} in all)",
              "  from:"]
    lines += [f"    - {s}" for s in est["sources"]]
    return "\n".join(lines)


def _rate_lines(est: dict[str, Any]) -> list[str]:
    """The rates, each as a trial gets it beside the others and (measured) alone."""
    rates = est["rates"]
    shared = rates["slowdown"] > 1.0
    head = "clips/s per worker" + (", beside the other trials (alone)" if shared else "")
    lines = [f"  rates        {head}" + ("" if rates["measured"] else ", scaled from the given rate")]
    for m in est["models"]:
        alone = f" ({m['clips_per_s_alone']:.1f})" if shared else ""
        lines.append(f"    pretraining  {m['clips_per_s']:.1f}{alone}, {m['gflops_per_clip']:.2f} GFLOP/clip: "
                     + ", ".join(m["cells"]))
    for name, value in rates["rates"].items():
        kind, _, frames = name.partition("|")
        if kind == "fit":
            lines.append(f"    probe fit    {value * rates['slowdown']:.2f} s" + (f" ({value:.2f} s)" if shared else ""))
        elif kind != "pretrain":
            alone = f" ({value:.1f})" if shared else ""
            lines.append(f"    {kind:<12} {value / rates['slowdown']:.1f}{alone} at {frames} frames")
    return lines


def estimate_line(est: dict[str, Any], *, started: bool = False) -> str:
    """One line for a sweep's header: counts, the expected wall time and the device-hours. ``started``: Ray is up
    and the data prepared already, so the time left is the trials', the baseline's and the report's."""
    c, where, wall = est["counts"], est["placement"], est["wall"]
    age = time.time() - est["created"]
    when = "measured now" if age < 60 else f"rates measured {duration(age)} ago"
    if not est["rates"]["measured"]:
        when = f"rates scaled from a given {est['rates']['clips_per_s']:g} clips/s"
    seconds = wall["trials_s"] + wall["baseline_s"] + wall["report_s"] if started else wall["total_s"]
    return (f"{c['trials']} trials x {c['updates_per_trial']:,} updates + {c['baseline']} baseline evaluation(s): "
            f"about {duration(seconds)} at {where['concurrent']} at a time, {hours(est['device_hours'])} "
            f"{where['unit']}-hours ({when})")


# --- saved rates: what an --estimate measured, for the headers of the sweeps that follow --------------------------


def estimate_command(grid_name: str | Path, *, storage: str | Path, clips_per_s: float | None = None,
                     devices: int | None = None, concurrent: int | None = None) -> str:
    """What `asda sweep --grid G --estimate` prints. Nothing runs: no Ray, no MLflow run, no data prepared (a
    synthetic set's counts come from its options). The rates are kept in ``<storage>/estimates/`` for the headers
    of this grid's sweeps."""
    grid = load_grid(grid_name)
    est = estimate(grid, clips_per_s=clips_per_s, devices=devices, concurrent=concurrent)
    path = save_estimate(est, grid, storage)
    return f"{format_estimate(est)}\n  rates kept for this grid's sweep headers: {path}"


def estimate_file(grid: Grid, storage: str | Path) -> Path:
    return Path(storage).resolve() / ESTIMATES_DIR / f"{grid.name}-{grid.fingerprint()}.json"


def save_estimate(est: dict[str, Any], grid: Grid, storage: str | Path) -> Path:
    """Keep ``est``'s rates beside the sweeps (``<storage>/estimates/<grid>-<fingerprint>.json``)."""
    path = estimate_file(grid, storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: est[k] for k in ("grid", "fingerprint", "machine", "created", "rates")},
                               indent=2, default=str))
    return path


def header_line(grid: Grid, *, concurrent: int | None, storage: str | Path) -> str:
    """The sweep header's estimate: from the rates the last ``asda sweep --estimate`` of this grid measured on
    this machine (nothing is measured here, so a sweep does not wait for it), else the counts alone."""
    path = estimate_file(grid, storage)
    saved = json.loads(path.read_text()) if path.is_file() else None
    c = counts(grid)
    if saved is not None and (saved["rates"]["measured"] is False or saved.get("machine") == machine()):
        try:
            est = estimate(grid, concurrent=concurrent, rates=saved["rates"])
            return estimate_line({**est, "created": saved["created"]}, started=True)
        except (KeyError, ValueError, TypeError):  # rates saved by another version of this module: not used
            pass
    return (f"{c['trials']} trials x {c['updates_per_trial']:,} updates + {c['baseline']} baseline evaluation(s); "
            f"the expected time: asda sweep --grid {grid.name} --estimate")
