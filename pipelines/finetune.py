"""`asda finetune`: supervised fine-tuning of a pretrained encoder on Ray Train (SPEC §5).

Layer-wise lr decay, drop path, SpecAugment time/frequency masks, mixup, roll + gain augmentation, BCE or
cross-entropy with label smoothing; rank 0 evaluates the final model (``eval_accuracy`` / ``eval_map``). With
``cv_folds`` it runs one training per fold (ESC-50: 5-fold cross-validation) and reports the mean.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model import ASDAClassifier, ASDAConfig, load_checkpoint, load_encoder, param_groups_layer_decay

from . import loop, tracking
from .training import TrainSettings, check_data, fit, start_tracking


@dataclass(frozen=True)
class FinetuneSettings(TrainSettings):
    checkpoint: str | None = None  # pretraining checkpoint; None trains from a random initialisation
    which: str = "student"
    lr: float = 2e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.005
    layer_decay: float = 0.65
    drop_path: float = 0.1
    loss: str | None = None  # "ce" | "bce"; default: bce for multi-label data, else ce
    label_smoothing: float = 0.1  # cross-entropy only
    mixup: float = 0.0  # Beta(mixup, mixup) mixing weight; 0 = off
    specaug_time: float = 0.2  # largest time mask, as a share of the frames
    specaug_freq: float = 0.2  # largest frequency mask, as a share of the mel bins
    roll_gain: bool = True  # random time roll and Beta(10, 10) + 0.5 gain
    eval_split: str | None = None  # default: test, else valid
    cv_folds: int = 0  # > 0: train with each fold 1..cv_folds held out in turn (split must hold the folds)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.which not in ("student", "teacher"):
            raise ValueError(f"which={self.which!r} is not allowed: expected 'student' or 'teacher'")
        if self.loss not in (None, "ce", "bce"):
            raise ValueError(f"loss={self.loss!r} is not allowed: expected 'ce' or 'bce'")
        for name in ("layer_decay", "label_smoothing", "specaug_time", "specaug_freq", "drop_path"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: expected a number in [0, 1]")
        if self.mixup < 0 or self.cv_folds < 0:
            raise ValueError("mixup and cv_folds must be >= 0")


# --------------------------------------------------------------------------------------------------- worker


def augment(fbank: torch.Tensor, labels: torch.Tensor, s: FinetuneSettings, norm_std: float,
            generator: torch.Generator | None = None):
    """Training augmentation on normalised log-mel (B, T, F) and float targets (B, C)."""
    B, T, Fq = fbank.shape
    x = fbank.clone()
    if s.roll_gain:
        # Roll in time, and a waveform gain g: power scales by g², log-mel shifts by 2 ln g, / (2 std) normalised.
        shifts = torch.randint(0, T, (B,), generator=generator).tolist()
        x = torch.stack([torch.roll(row, k, dims=0) for row, k in zip(x, shifts, strict=True)])
        gain = torch.distributions.Beta(10.0, 10.0).sample((B,)) + 0.5
        x = x + (gain.log() / norm_std).view(B, 1, 1).to(x)
    for axis, ratio, size in ((1, s.specaug_time, T), (2, s.specaug_freq, Fq)):
        width_max = int(ratio * size)
        if width_max < 1:
            continue
        widths = torch.randint(0, width_max + 1, (B,), generator=generator)
        starts = (torch.rand(B, generator=generator) * (size - widths + 1)).long()
        pos = torch.arange(size)
        mask = (pos[None] >= starts[:, None]) & (pos[None] < (starts + widths)[:, None])  # (B, size)
        x = x.masked_fill(mask.unsqueeze(2) if axis == 1 else mask.unsqueeze(1), 0.0)
    if s.mixup > 0:
        lam = float(torch.distributions.Beta(s.mixup, s.mixup).sample())
        perm = torch.randperm(B, generator=generator)
        x = lam * x + (1 - lam) * x[perm]
        labels = lam * labels + (1 - lam) * labels[perm]
    return x, labels


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, smoothing: float) -> torch.Tensor:
    """targets: (B, C) probabilities (one-hot, multi-hot or mixed)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    C = logits.shape[1]
    smoothed = targets * (1 - smoothing) + smoothing / C
    return torch.sum(-smoothed * F.log_softmax(logits.float(), dim=1), dim=1).mean()


def build_classifier(config: ASDAConfig, num_classes: int, checkpoint: str | None, which: str) -> ASDAClassifier:
    encoder = load_encoder(checkpoint, which) if checkpoint else None
    if encoder is not None:
        # Keep the pretrained weights, take this run's drop path.
        fresh = type(encoder)(config)
        fresh.load_state_dict(encoder.state_dict())
        encoder = fresh
    return ASDAClassifier(config, num_classes, encoder=encoder)


def finetune_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of fine-tuning; rank 0 evaluates at the end."""
    import ray.train

    from .feed import iter_torch

    s = FinetuneSettings(**cfg["settings"])
    config = ASDAConfig.from_dict(cfg["model"])
    rank, world, device = loop.start_worker(cfg)
    num_classes, loss_kind = cfg["num_classes"], cfg["loss"]

    torch.manual_seed(s.seed)
    model = build_classifier(config, num_classes, s.checkpoint, s.which).to(device)
    groups = param_groups_layer_decay(model, s.weight_decay, s.layer_decay, depth=config.depth)
    for g in groups:
        g["lr"] = s.lr * g["lr_scale"]
    optimiser = torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, loop.warmup_cosine(s.warmup_steps, s.steps,
                                                                                  s.min_lr_ratio))
    step, epoch = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state, rng = loop.load_state(folder, rank)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        if rng is not None:
            loop.set_rng_state(rng)
    else:
        torch.manual_seed(s.seed + 1000 * rank)
    ddp = (torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world > 1 else model)
    logger = loop.RankZeroLogger(cfg["tracking_uri"], cfg["run_id"], enabled=rank == 0)
    shard = ray.train.get_dataset_shard("train")
    params = [p for p in model.parameters() if p.requires_grad]
    metrics: dict[str, float] = {}
    try:
        while step < s.steps:
            for batch in iter_torch(shard, s.batch_size, seed=s.seed + epoch):
                x, y = batch["fbank"], batch["label"]
                y = F.one_hot(y, num_classes).float() if y.dim() == 1 else y.float()  # index or multi-hot
                x, y = augment(x, y, s, cfg["norm_std"])
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    logits = ddp(x.to(device))
                loss = classification_loss(logits, y.to(device), loss_kind, s.label_smoothing)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                step += 1
                if not torch.isfinite(grad_norm):
                    reason = f"non-finite loss/gradient at update {step} (loss {loss.item():.4g})"
                    if rank == 0:
                        loop.record_stop(cfg["run_dir"], reason, step=step)
                    return {"stopped": reason}
                optimiser.step()
                scheduler.step()
                if step % s.log_every == 0 or step == s.steps:
                    metrics = {"loss": loss.item(), "lr": optimiser.param_groups[-1]["lr"],
                               "grad_norm": float(grad_norm)}
                    logger.log(metrics, step=step)
                if step % s.checkpoint_every == 0 or step == s.steps:
                    if step == s.steps and rank == 0:
                        metrics.update(evaluate_model(model, cfg, device))
                        logger.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, step=step)
                    state = None
                    if rank == 0:
                        state = {"format": 1, "config": config.to_dict(), "model": model.state_dict(),
                                 "optimizer": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                                 "step": step, "epoch": epoch, "num_classes": num_classes}
                    loop.report({"step": step, **metrics}, rank=rank,
                                save=lambda d, st=state: loop.save_rank_files(d, rank, state=st),
                                name=f"checkpoint_{step:07d}")
                if step >= s.steps:
                    break
            epoch += 1
    finally:
        logger.close()
    return {"step": step}


@torch.no_grad()
def evaluate_model(model: ASDAClassifier, cfg: dict, device) -> dict[str, float]:
    from .feed import read_clips
    from .probe import evaluate

    model.eval()
    clips = read_clips(cfg["settings"]["data"], cfg["eval_split"], target_length=model.encoder.config.target_length,
                       labels="multihot" if cfg["multilabel"] else "index", folds=cfg.get("eval_folds"))
    size = cfg["settings"]["eval_batch_size"]
    scores = torch.cat([model(torch.as_tensor(clips["fbank"][i:i + size]).to(device)).float().cpu()
                        for i in range(0, len(clips["fbank"]), size)])
    model.train()
    return evaluate(scores, clips["label"], cfg["num_classes"], cfg["multilabel"])


# --------------------------------------------------------------------------------------------------- driver


def finetune(config: ASDAConfig, settings: FinetuneSettings) -> dict[str, Any]:
    """Fine-tune (optionally per cross-validation fold) and evaluate; returns the metrics and run ids."""
    settings = settings.resolved("finetune")
    if settings.checkpoint:
        settings = dataclasses.replace(settings, checkpoint=str(Path(settings.checkpoint).resolve()))
        _, config = load_checkpoint(settings.checkpoint)  # the architecture comes from the checkpoint
    card = check_data(settings)
    multilabel = card["multilabel"]
    loss = settings.loss or ("bce" if multilabel else "ce")
    if loss == "ce" and multilabel:
        raise ValueError(f"{card['name']} is multi-label: use loss 'bce'")
    config = dataclasses.replace(config, drop_path=settings.drop_path)
    base = {"num_classes": len(card["class_names"]), "multilabel": multilabel, "loss": loss,
            "norm_std": card["normalisation"]["std"]}
    if settings.cv_folds:
        return _cross_validate(config, settings, card, base)
    eval_split = settings.eval_split or next((s for s in ("test", "valid") if s in card["splits"]), None)
    if eval_split is None:
        raise ValueError(f"{settings.data} has no test or valid split; name one with --eval-split")
    return _one(config, settings, card, {**base, "eval_split": eval_split}, folds=None)


def _one(config: ASDAConfig, settings: FinetuneSettings, card: dict, extra: dict, folds) -> dict[str, Any]:
    from .feed import feed_dataset

    run_id = start_tracking(config, settings, card, kind="finetune",
                            extra_params={"finetune.loss": extra["loss"], "finetune.eval_split": extra["eval_split"]})
    labels = "multihot" if extra["multilabel"] else "index"
    dataset = feed_dataset(settings.data, settings.split, target_length=config.target_length, labels=labels,
                           random_crop=True, seed=settings.seed, folds=folds, workers=settings.workers)
    result = fit(finetune_loop, config=config, settings=settings, run_id=run_id, datasets={"train": dataset},
                 extra=extra)
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("eval_")}
    tracking.end_run(run_id, "FINISHED")
    return {**metrics, "run_id": run_id, "checkpoint": str(Path(result.checkpoint.path) / loop.CHECKPOINT_FILE),
            "name": settings.name}


def _cross_validate(config: ASDAConfig, settings: FinetuneSettings, card: dict, base: dict) -> dict[str, Any]:
    from .card import cv_folds

    folds = cv_folds(card, settings.split, settings.cv_folds, settings.data)
    per_fold = []
    for k in folds:
        train_folds = [f for f in folds if f != k]
        fold_settings = dataclasses.replace(settings, name=f"{settings.name}-fold{k}")
        per_fold.append(_one(config, fold_settings, card,
                             {**base, "eval_split": settings.split, "eval_folds": [k]}, folds=train_folds))
    from .metrics import fold_summary

    summary = fold_summary(per_fold, [k for k in per_fold[0] if k.startswith("eval_")])
    return {**summary, "folds": per_fold, "name": settings.name, "run_id": per_fold[-1]["run_id"]}

