"""`asda pretrain`: ASDA on Ray Train (V2) with DistributedDataParallel, checkpoints, recovery and MLflow.

Driver: validate everything, create (or find) the MLflow run, start ``TorchTrainer(...).fit()``, then add the
artifacts (config, loss curves, attention figure). Worker: a thin loop of plain step functions.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import ASDA, ASDAConfig, read_state, save_checkpoint
from model.health import clip_means, collapsed, representation_health

from . import console, tracking, worker
from .training import TrainSettings, WorkerConfig, check_data, fit, start_tracking
from .update import PretrainUpdate, build_update, check_precision, default_precision


@dataclass(frozen=True)
class PretrainSettings(TrainSettings):
    """A pretraining run: the common settings plus where to start from and what to draw."""

    resume: str | None = None  # start from this checkpoint (folder or model.pt) in a new run
    figure_split: str | None = None  # clips for the attention figure (default: valid, test or train)
    figure_clips: int = 4
    # clips the attention on the labelled event is measured on (the figure's split; 0: not measured)
    attention_clips: int = 512
    compile: bool = False  # torch.compile the model's forward (and so its backward)
    precision: str | None = None  # "bf16" (autocast) or "fp32"; None: bf16 with use_gpu, else fp32
    stop_on_collapse: bool = False  # end the run (an error naming the update) when the collapse guard trips

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("figure_clips", "attention_clips"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: expected an integer >= 0")
        for name in ("compile", "stop_on_collapse"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: expected true or false")
        check_precision(self.precision)


# --------------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class PretrainWorkerConfig(WorkerConfig):
    SETTINGS = PretrainSettings

    resume_file: str | None = None  # --resume: weights to start a new run from


def pretrain_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of ASDA pretraining."""
    w = PretrainWorkerConfig(**cfg)
    s = w.settings
    rank, world, device = worker.start_worker(w.threads, w.run_dir, s.in_process)
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    model = ASDA(w.model).to(device)
    # Compiled (with settings.compile) in place: the checkpointer's state dicts keep their names.
    update = build_update(model, s, device)
    checkpointer = worker.Checkpointer(rank=rank, run_dir=w.run_dir, every=s.checkpoint_every, last_step=s.steps,
                                       model=model, optimiser=update.optimiser, scheduler=update.scheduler,
                                       config=w.model,
                                       extra={"settings": dataclasses.asdict(s)}, in_process=s.in_process,
                                       report_to_tune=w.report_to_tune)
    checkpoint = checkpointer.latest()
    if checkpoint is None and w.resume_file:  # weights (student, teacher, decoder, EMA count) start a new run
        model.load_state_dict(read_state(w.resume_file)["model"])
    step, epoch = checkpointer.restore(checkpoint, s.seed)
    logger = worker.RankZeroLogger(w.tracking_uri, w.run_id, enabled=rank == 0)
    logger.log({"resumed_from_step": step}, step=step)
    update.forward = worker.wrap_ddp(model, device, world)  # DDP wraps the compiled module, as torch advises
    job = PretrainJob(update, s, world, logger)
    return worker.run_steps(job, checkpointer, logger, steps=s.steps, log_every=s.log_every, start=(step, epoch))


class PretrainJob:
    """One rank's pretraining: shuffled crops in, one ``PretrainUpdate`` per batch, and the collapse guard: at
    each log step the representation's health (``model.health``) over the utterance vectors of the last
    ``HEALTH_CLIPS`` clips is logged, and the first log step, once that many clips have passed, whose health says
    collapse tags the MLflow run
    (``asda.collapsed``, ``asda.collapse``; the driver prints the line) and with ``stop_on_collapse`` ends the
    run."""

    HEALTH_CLIPS = 80  # the utterance vectors an effective rank is taken over (a batch alone holds too few)

    def __init__(self, update: PretrainUpdate, settings: PretrainSettings, world: int,
                 logger: worker.RankZeroLogger | None = None):
        import ray.train

        self.update, self.model, self.optimiser = update, update.model, update.optimiser
        self.settings, self.device, self.world = settings, update.device, world
        self.shard = ray.train.get_dataset_shard("train")
        self.logger = logger
        self.window = collections.deque(maxlen=-(-self.HEALTH_CLIPS // settings.batch_size))
        self.collapse: str | None = None  # what the guard found, at its first trip

    def batches(self, epoch: int):
        from .data.feed import iter_torch

        return iter_torch(self.shard, self.settings.batch_size, seed=self.settings.seed + epoch, drop_last=True)

    def step(self, batch: dict[str, torch.Tensor]) -> worker.StepOutput:
        fbank = batch["fbank"].to(self.device, non_blocking=True)
        out, grad_norm = self.update(fbank)
        self.window.append(clip_means(out["utterance"], fbank.shape[0]))  # on the device: no sync per update
        return worker.StepOutput(out["loss"], grad_norm, fbank.shape[0] * self.world, out)

    def metrics(self, out: worker.StepOutput) -> dict[str, float]:
        metrics = {k: out.values[k].item() for k in ("loss", "loss_frame", "loss_utterance")}
        metrics.update(lr=self.optimiser.param_groups[0]["lr"], ema_decay=self.model.ema_decay,
                       grad_norm=float(out.grad_norm))
        if self.model.config.attention == "differential" and self.model.config.learnable_lambda:
            metrics.update({f"lambda_layer{i}": lam for i, lam in enumerate(self.model.lambdas())})
        health = self.health(out)
        metrics.update({f"health.{k}": v for k, v in health.items()})
        self.guard(health, int(self.model.num_updates))
        return metrics

    def health(self, out: worker.StepOutput) -> dict[str, float]:
        """``model.health`` of this rank's window of clips and of the batch's teacher targets. With several ranks
        each judges its own clips; ``guard`` agrees them."""
        return representation_health(torch.cat(list(self.window)), out.values["targets"])

    def guard(self, health: dict[str, float], step: int) -> None:
        """At the first collapse: the MLflow tags, one console line. Every rank reaches the same verdict (a
        collapse seen by any rank counts for all), so that a stop ends every rank at the same update."""
        if self.collapse is not None or sum(len(w) for w in self.window) < self.HEALTH_CLIPS:
            return  # a rank over fewer clips is bounded by their count: judged once the window is full
        found = collapsed(health)
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([float(found is not None)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and found is None:
                found = "another rank's clips"
        if found is None:
            return
        self.collapse = f"update {step}: {found}"
        if self.logger is not None:
            self.logger.tags({tracking.TAG_COLLAPSED: "true", tracking.TAG_COLLAPSE: self.collapse})

    def stop_reason(self) -> str | None:
        """Why the run should end now (``run_steps`` asks after each log step), or None."""
        if self.collapse is not None and self.settings.stop_on_collapse:
            return f"collapse at {self.collapse} (stop_on_collapse)"
        return None

    def finish(self) -> dict[str, float]:
        return {}  # the driver draws the figures and event shares from the final weights

    def no_batch_reason(self) -> str:
        s = self.settings
        return (f"split {s.split!r} of {s.data} gives no batch of {s.batch_size} clips per worker; "
                f"lower --batch-size or --workers")


# --------------------------------------------------------------------------------------------------- driver


def pretrain(config: ASDAConfig, settings: PretrainSettings, *, tags: dict[str, str] | None = None,
             report_to_tune: bool = False, end_run: bool = True) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns {"run_id", "checkpoint", "metrics", "run_dir", "name"}.

    The encoder is fed, and its ``target_length`` set to, the data set's length unless ``settings.target_length``
    says otherwise.

    ``tags`` go on the MLflow run; ``report_to_tune``: each checkpoint's metrics also reach the Tune trial this
    runs in (a sweep with ASHA); ``end_run`` False leaves the MLflow run RUNNING for the caller, who evaluates into
    it and ends it.
    """
    from .analysis import log_pretraining_artifacts
    from .data.card import feed_length
    from .data.feed import feed_dataset

    settings = settings.resolved("pretrain")
    # The precision the workers train in, resolved here so that the run records it.
    settings = dataclasses.replace(settings, precision=settings.precision or
                                   default_precision("cuda" if settings.use_gpu else "cpu"))
    card = check_data(settings)
    # The encoder pretrains on the data set's own length (its positional table is sized to it).
    config = dataclasses.replace(config, target_length=feed_length(card, settings.target_length, settings.data,
                                                                   config.patch_size)).for_run(settings.steps)
    resume_file = worker.resolve_checkpoint(settings.resume)
    run_id = start_tracking(config, settings, card, kind=tracking.KIND_PRETRAIN, tags=tags,
                            length=config.target_length, extra_params={
                                tracking.PARAM_ALPHA_EFFECTIVE: f"{config.alpha_effective(settings.batch_size):g}"})
    dataset = feed_dataset(settings.data, settings.split, target_length=config.target_length, labels="none",
                           random_crop=True, seed=settings.seed, workers=settings.workers,
                           clips=settings.steps * settings.batch_size * settings.workers)
    result = fit(pretrain_loop, PretrainWorkerConfig, config=config, settings=settings, run_id=run_id,
                 datasets={"train": dataset}, report_to_tune=report_to_tune, resume_file=resume_file)
    run_dir = Path(settings.storage) / settings.name
    # A portable copy next to the run: what `asda probe` / `asda finetune --checkpoint` take.
    state = read_state(Path(result.checkpoint.path) / worker.CHECKPOINT_FILE)
    model = ASDA(config)
    model.load_state_dict(state["model"])
    # What turns audio into this encoder's input (asda embed, the HEAR module, asda export read it back).
    feeding = {"mean": float(card["normalisation"]["mean"]), "std": float(card["normalisation"]["std"]),
               "chunk_frames": config.target_length}
    final = save_checkpoint(run_dir / worker.FINAL_FILE, model, config, step=state["step"], feeding=feeding,
                            settings=dataclasses.asdict(settings))
    log_pretraining_artifacts(run_id, config, settings, final)
    collapse = tracking.mark_collapse(run_id)
    if collapse and not console.shows_progress():  # a progress bar has printed it as it happened
        print(console.collapse_line(collapse, settings.name), flush=True)
    if end_run:  # else the caller evaluates into the run and ends it (a sweep's trial: FINISHED with its metric)
        tracking.end_run(run_id, "FINISHED")
    return {"run_id": run_id, "checkpoint": str(final), "ray_checkpoint": result.checkpoint.path,
            "metrics": dict(result.metrics or {}), "run_dir": str(run_dir), "name": settings.name,
            "collapse": collapse}


def pretrain_flops(config: ASDAConfig, batch_size: int, target_length: int) -> float:
    """FLOPs of one pretraining update of ``batch_size`` clips of ``target_length`` frames, counted on one clip
    on this process's CPU and scaled by the batch (every FLOP of an update is some clip's: the teacher's, its
    clones', the decoder's)."""
    return _clip_flops(dataclasses.replace(config, target_length=target_length)) * batch_size


@functools.lru_cache(maxsize=32)
def _clip_flops(config: ASDAConfig) -> float:
    """One clip's share of an update's FLOPs, counted once per config and process (a reused trial process
    counts each cell's model once, not once per seed)."""
    from .cost import update_flops

    target_length = config.target_length
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        update = build_update(ASDA(config), PretrainSettings(data="-", precision="fp32"), torch.device("cpu"))
        flops = update_flops(update, torch.randn(1, target_length, config.num_mel_bins))
    finally:
        torch.random.set_rng_state(state)
    return float(flops)
