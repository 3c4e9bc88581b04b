"""`asda pretrain`: ASDA on Ray Train (V2) with DistributedDataParallel, checkpoints, recovery and MLflow.

Driver: validate everything, create (or find) the MLflow run, start ``TorchTrainer(...).fit()``, then add the
artifacts (config, loss curves, attention figure). Worker: a thin loop of plain step functions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ASDA, ASDAConfig, param_groups_weight_decay, save_checkpoint

from . import loop, tracking
from .training import TrainSettings, check_data, fit, start_tracking


@dataclass(frozen=True)
class PretrainSettings(TrainSettings):
    """A pretraining run: the common settings plus where to start from and what to draw."""

    resume: str | None = None  # start from this checkpoint (folder or model.pt) in a new run
    figure_split: str | None = None  # clips for the attention figure (default: valid, test or train)
    figure_clips: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.figure_clips < 0:
            raise ValueError(f"figure_clips={self.figure_clips!r} is not allowed: expected an integer >= 0")


# --------------------------------------------------------------------------------------------------- worker


def pretrain_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of ASDA pretraining."""
    import ray.train

    settings = PretrainSettings(**cfg["settings"])
    config = ASDAConfig.from_dict(cfg["model"])
    rank, world, device = loop.start_worker(cfg)

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


def pretrain(config: ASDAConfig, settings: PretrainSettings, *, tags: dict[str, str] | None = None,
             callbacks: list | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns {"run_id", "checkpoint", "metrics", "run_dir", "name"}.

    ``tags`` go on the MLflow run; ``callbacks`` on the Ray Train run (a sweep passes TuneReportCallback).
    """
    from .analysis import log_pretraining_artifacts
    from .feed import feed_dataset

    settings = settings.resolved("pretrain")
    card = check_data(settings)
    resume_file = str(loop.resolve_checkpoint_file(settings.resume)) if settings.resume else None
    run_id = start_tracking(config, settings, card, kind="pretrain", tags=tags)
    dataset = feed_dataset(settings.data, settings.split, target_length=config.target_length, labels="none",
                           random_crop=True, seed=settings.seed, workers=settings.workers)
    result = fit(pretrain_loop, config=config, settings=settings, run_id=run_id, datasets={"train": dataset},
                 extra={"resume_file": resume_file}, callbacks=callbacks)
    run_dir = Path(settings.storage) / settings.name
    # A portable copy next to the run: what `asda probe` / `asda finetune --checkpoint` take.
    state = torch.load(Path(result.checkpoint.path) / loop.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = ASDA(config)
    model.load_state_dict(state["model"])
    final = save_checkpoint(run_dir / "final.pt", model, config, step=state["step"])
    log_pretraining_artifacts(run_id, config, settings, final)
    tracking.end_run(run_id, "FINISHED")
    return {"run_id": run_id, "checkpoint": str(final), "ray_checkpoint": result.checkpoint.path,
            "metrics": dict(result.metrics or {}), "run_dir": str(run_dir), "name": settings.name}
