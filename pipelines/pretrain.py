"""`asda pretrain`: ASDA on Ray Train (V2) with DistributedDataParallel, checkpoints, recovery and MLflow.

Driver: validate everything, create (or find) the MLflow run, start ``TorchTrainer(...).fit()``, then add the
artifacts (config, loss curves, attention figure). Worker: a thin loop of plain step functions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ASDA, ASDAConfig, param_groups_weight_decay, save_checkpoint

from . import loop, tracking
from .runtime import REPO_ROOT

DEFAULT_STORAGE = REPO_ROOT / "results"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything about a pretraining run that is not the model. Training is measured in updates."""

    data: str  # a prepared folder (asda prepare)
    steps: int = 300  # optimiser updates
    batch_size: int = 8  # clips per worker per update (each cloned num_students times)
    lr: float = 5e-4
    warmup_steps: int = 30
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 4.0
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # Ray logical CPUs per worker; default: all local CPUs / workers / 2
    threads_per_worker: int | None = None  # torch threads; default: physical cores / workers on a local instance
    max_failures: int = 1  # worker deaths survived (restart from the last checkpoint)
    split: str = "train"
    name: str | None = None  # run name: the same name resumes that run
    storage: str = str(DEFAULT_STORAGE)
    experiment: str = tracking.DEFAULT_EXPERIMENT
    resume: str | None = None  # start from this checkpoint (folder or model.pt) in a new run
    figure_split: str | None = None  # clips for the attention figure (default: valid, test or train)
    figure_clips: int = 4
    parent_run_id: str | None = None  # nest under a sweep's run

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: expected a positive integer")
        if self.warmup_steps < 0 or self.max_failures < 0 or self.figure_clips < 0:
            raise ValueError("warmup_steps, max_failures and figure_clips must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not allowed: expected a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is not allowed: expected a number in [0, 1]")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} is not allowed: expected a positive number")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker!r} is not allowed: expected > 0")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ValueError(f"name={self.name!r} is not allowed: expected a non-empty name without '/'")

    def run_name(self) -> str:
        return self.name or time.strftime("pretrain-%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------------------------------- worker


def pretrain_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of ASDA pretraining."""
    import ray.train
    import ray.train.torch

    settings = PretrainSettings(**cfg["settings"])
    config = ASDAConfig.from_dict(cfg["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    loop.worker_threads(cfg["threads"])
    loop.write_pid(cfg["run_dir"], rank)
    device = ray.train.torch.get_device()

    torch.manual_seed(settings.seed)  # identical initial weights on every rank
    model = ASDA(config).to(device)
    optimiser = torch.optim.AdamW(param_groups_weight_decay(model, settings.weight_decay), lr=settings.lr,
                                  betas=(settings.beta1, settings.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, loop.warmup_cosine(settings.warmup_steps, settings.steps, settings.min_lr_ratio))
    step, epoch, resumed_from, rng = 0, 0, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # the same run after a failure or a restart: everything continues
        with checkpoint.as_directory() as folder:
            state, rng = loop.load_state(folder, rank)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, resumed_from = state["step"], state["epoch"], state["step"]
    elif cfg.get("resume_file"):  # --resume: weights (student, teacher, decoder, EMA count) start a new run
        model.load_state_dict(torch.load(cfg["resume_file"], map_location="cpu", weights_only=True)["model"])
    if rng is not None:
        loop.set_rng_state(rng)
    else:
        torch.manual_seed(settings.seed + 1000 * rank + step)  # masks differ per rank, reproducibly

    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)
    logger = loop.RankZeroLogger(cfg["tracking_uri"], cfg["run_id"], enabled=rank == 0)
    logger.log({"resumed_from_step": resumed_from}, step=step)
    shard = ray.train.get_dataset_shard("train")
    params = [p for p in model.parameters() if p.requires_grad]
    last_checkpoint = cfg.get("last_checkpoint")
    window = {"clips": 0, "start": time.perf_counter()}
    metrics: dict[str, float] = {}

    try:
        while step < settings.steps:
            batches = 0
            for batch in loop_batches(shard, settings, epoch):
                batches += 1
                fbank = batch["fbank"].to(device, non_blocking=True)
                out, grad_norm = train_step(ddp, model, optimiser, scheduler, fbank, params, settings.grad_clip,
                                            device)
                step += 1
                if not torch.isfinite(grad_norm):  # identical on every rank: gradients are all-reduced
                    reason = (f"non-finite loss/gradient at update {step} (loss {out['loss'].item():.4g}); "
                              f"last good checkpoint: {last_checkpoint or 'none'}")
                    if rank == 0:
                        loop.record_stop(cfg["run_dir"], reason, step=step, last_checkpoint=last_checkpoint)
                    return {"stopped": reason, "step": step}
                window["clips"] += fbank.shape[0] * world
                if step % settings.log_every == 0 or step == settings.steps:
                    metrics = step_metrics(out, grad_norm, optimiser, model, window)
                    logger.log(metrics, step=step)
                if step % settings.checkpoint_every == 0 or step == settings.steps:
                    state = None
                    if rank == 0:
                        state = {"format": 1, "config": config.to_dict(), "model": model.state_dict(),
                                 "optimizer": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                                 "step": step, "epoch": epoch, "settings": dataclasses.asdict(settings)}
                    name = f"checkpoint_{step:07d}"
                    loop.report({"step": step, "epoch": epoch, "resumed_from_step": resumed_from, **metrics},
                                rank=rank, save=lambda d, s=state: loop.save_rank_files(d, rank, state=s), name=name)
                    last_checkpoint = name
                if step >= settings.steps:
                    break
            if batches == 0:
                raise ValueError(f"split {settings.split!r} of {settings.data} gives no batch of "
                                 f"{settings.batch_size} clips per worker; lower --batch-size or --workers")
            epoch += 1
    finally:
        logger.close()
    return {"step": step, "resumed_from_step": resumed_from}


def loop_batches(shard, settings: PretrainSettings, epoch: int):
    from .feed import iter_torch

    return iter_torch(shard, settings.batch_size, seed=settings.seed + epoch, drop_last=True)


def train_step(ddp, model: ASDA, optimiser, scheduler, fbank, params, grad_clip: float, device):
    """One update: forward (bf16 autocast on GPU), backward, clip, step, schedule, one teacher EMA step."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = ddp(fbank)
    optimiser.zero_grad(set_to_none=True)
    out["loss"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if torch.isfinite(grad_norm):
        optimiser.step()
        scheduler.step()
        model.update_teacher()
    return out, grad_norm


def step_metrics(out: dict, grad_norm, optimiser, model: ASDA, window: dict) -> dict[str, float]:
    now = time.perf_counter()
    metrics = {
        **{k: out[k].item() for k in ("loss", "loss_frame", "loss_utterance")}, "lr": optimiser.param_groups[0]["lr"],
        "ema_decay": model.ema_decay, "grad_norm": float(grad_norm),
        "clips_per_s": window["clips"] / max(now - window["start"], 1e-9),
    }
    window.update(clips=0, start=now)
    if model.config.attention == "differential" and model.config.learnable_lambda:
        metrics.update({f"lambda_layer{i}": lam for i, lam in enumerate(model.lambdas())})
    return metrics


# --------------------------------------------------------------------------------------------------- driver


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the update and the last good checkpoint."""


def validate(config: ASDAConfig, settings: PretrainSettings) -> dict:
    """Everything that can be checked before Ray starts; returns the data set's card."""
    from .feed import verify_shards
    from .prepare import load_card

    card = load_card(settings.data)
    if settings.split not in card["splits"]:
        raise ValueError(f"split {settings.split!r} not in {settings.data}; it has {sorted(card['splits'])}")
    verify_shards(settings.data, card)
    available = card["splits"][settings.split]
    if available < settings.batch_size * settings.workers:
        raise ValueError(f"split {settings.split!r} of {settings.data} has {available} clips, fewer than one "
                         f"update needs ({settings.batch_size} per worker x {settings.workers} workers)")
    if settings.use_gpu and not _cluster_may_have_gpus():
        raise ValueError("--use-gpu given but no GPU is visible here and no RAY_ADDRESS names a cluster")
    if settings.resume:
        loop.resolve_checkpoint_file(settings.resume)
    return card


def _cluster_may_have_gpus() -> bool:
    return torch.cuda.is_available() or bool(os.environ.get("RAY_ADDRESS"))


def _resources(settings: PretrainSettings) -> tuple[float, int | None]:
    from .runtime import local_num_cpus

    local = not os.environ.get("RAY_ADDRESS")
    cpus = settings.cpus_per_worker or (max(0.5, local_num_cpus() / 2 / settings.workers) if local else 1.0)
    threads = settings.threads_per_worker or (max(1, (os.cpu_count() or 1) // settings.workers) if local
                                              else max(1, int(cpus)))
    return cpus, threads


def pretrain(config: ASDAConfig, settings: PretrainSettings) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns {"run_id", "checkpoint", "metrics", "run_dir", ...}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .feed import feed_dataset
    from .runtime import ensure_ray

    settings = dataclasses.replace(settings, data=str(Path(settings.data).resolve()),
                                   storage=str(Path(settings.storage).resolve()),
                                   name=settings.run_name())
    card = validate(config, settings)
    run_dir = Path(settings.storage) / settings.name
    run_id = start_tracking(config, settings, card, kind="pretrain")
    resume_file = str(loop.resolve_checkpoint_file(settings.resume)) if settings.resume else None

    ensure_ray()
    cpus, threads = _resources(settings)
    trainer = TorchTrainer(
        pretrain_loop,
        train_loop_config={"model": config.to_dict(), "settings": dataclasses.asdict(settings), "run_id": run_id,
                           "tracking_uri": tracking.tracking_uri(), "run_dir": str(run_dir),
                           "threads": threads, "resume_file": resume_file},
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=settings.use_gpu,
                                     resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=settings.name, storage_path=settings.storage,
                             failure_config=FailureConfig(max_failures=settings.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": feed_dataset(settings.data, settings.split, target_length=config.target_length,
                                        labels="none", random_crop=True, seed=settings.seed)},
    )
    try:
        result = trainer.fit()
    except Exception:
        tracking.end_run(run_id, "FAILED")
        raise
    stopped = loop.read_stop(run_dir)
    if stopped:
        tracking.end_run(run_id, "FAILED")
        raise NonFiniteLossError(stopped["reason"])
    checkpoint_file = Path(result.checkpoint.path) / loop.CHECKPOINT_FILE
    # A portable copy next to the run: what `asda probe` / `asda finetune --checkpoint` take.
    final = run_dir / "final.pt"
    state = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    save_checkpoint(final, _module_from_state(config, state), config, step=state["step"])
    from .analysis import log_pretraining_artifacts

    log_pretraining_artifacts(run_id, config, settings, final)
    tracking.end_run(run_id, "FINISHED")
    return {"run_id": run_id, "checkpoint": str(final), "ray_checkpoint": result.checkpoint.path,
            "metrics": dict(result.metrics or {}), "run_dir": str(run_dir), "name": settings.name}


def _module_from_state(config: ASDAConfig, state: dict) -> ASDA:
    model = ASDA(config)
    model.load_state_dict(state["model"])
    return model


def start_tracking(config: ASDAConfig, settings, card: dict, *, kind: str) -> str:
    """Create the MLflow run for a training, or find the one of the same name to continue it."""
    from mlflow import MlflowClient

    experiment_id = tracking.setup(settings.experiment)
    client = MlflowClient()
    existing = client.search_runs([experiment_id], filter_string=f"tags.`asda.run_name` = '{settings.name}'",
                                  max_results=1)
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"asda.run_name": settings.name, "asda.kind": kind, "asda.code_version": _code_version(),
            "asda.data": card["name"], "mlflow.runName": settings.name}
    if settings.parent_run_id:
        tags["mlflow.parentRunId"] = settings.parent_run_id
    run = client.create_run(experiment_id, run_name=settings.name, tags=tags)
    run_id = run.info.run_id
    params = {**tracking.flatten(config.to_dict(), "model."),
              **tracking.flatten(dataclasses.asdict(settings), "train."),
              "data.clips": str(card["num_clips"]), "data.classes": str(len(card["class_names"]))}
    tracking.log_params(client, run_id, params)
    client.log_text(run_id, config.to_yaml(), "config/model.yaml")
    import yaml

    client.log_text(run_id, yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False), "config/train.yaml")
    return run_id


def _code_version() -> str:
    from .runtime import code_version

    return code_version()
