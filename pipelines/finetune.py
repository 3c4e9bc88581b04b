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

from . import tracking, worker
from .training import TrainSettings, WorkerConfig, check_data, fit, start_tracking


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


@dataclass(frozen=True, kw_only=True)
class FinetuneWorkerConfig(WorkerConfig):
    SETTINGS = FinetuneSettings

    num_classes: int
    multilabel: bool
    loss: str  # "ce" | "bce"
    norm_std: float  # the card's normalisation std (the gain augmentation shifts normalised log-mel)
    eval_split: str
    eval_folds: list[int] | None = None  # cross-validation: the held-out fold


def finetune_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of fine-tuning; rank 0 evaluates at the end."""
    w = FinetuneWorkerConfig(**cfg)
    s = w.settings
    rank, world, device = worker.start_worker(w.threads, w.run_dir, s.in_process)
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    model = build_classifier(w.model, w.num_classes, s.checkpoint, s.which).to(device)
    groups = param_groups_layer_decay(model, s.weight_decay, s.layer_decay, depth=w.model.depth)
    for g in groups:
        g["lr"] = s.lr * g["lr_scale"]
    optimiser = torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, worker.warmup_cosine(s.warmup_steps, s.steps, s.min_lr_ratio))
    checkpointer = worker.Checkpointer(rank=rank, run_dir=w.run_dir, every=s.checkpoint_every, last_step=s.steps,
                                       model=model, optimiser=optimiser, scheduler=scheduler, config=w.model,
                                       extra={"num_classes": w.num_classes}, in_process=s.in_process,
                                       report_to_tune=w.report_to_tune)
    step, epoch = checkpointer.restore(checkpointer.latest(), s.seed)
    logger = worker.RankZeroLogger(w.tracking_uri, w.run_id, enabled=rank == 0)
    job = FinetuneJob(worker.wrap_ddp(model, device, world), model, optimiser, scheduler, w, rank, device, world)
    return worker.run_steps(job, checkpointer, logger, steps=s.steps, log_every=s.log_every, start=(step, epoch))


class FinetuneJob:
    """One rank's fine-tuning: augmented labelled crops in, one supervised update per batch; rank 0 evaluates."""

    def __init__(self, ddp, model: ASDAClassifier, optimiser, scheduler, w: FinetuneWorkerConfig, rank: int,
                 device, world: int):
        import ray.train

        self.ddp, self.model, self.optimiser, self.scheduler, self.w = ddp, model, optimiser, scheduler, w
        self.rank, self.device, self.world = rank, device, world
        self.shard = ray.train.get_dataset_shard("train")
        self.params = [p for p in model.parameters() if p.requires_grad]

    def batches(self, epoch: int):
        from .data.feed import iter_torch

        s = self.w.settings
        return iter_torch(self.shard, s.batch_size, seed=s.seed + epoch, drop_last=True)

    def step(self, batch: dict[str, torch.Tensor]) -> worker.StepOutput:
        """One update: augment, forward (bf16 autocast on GPU), loss, backward, clip, step, schedule."""
        s, w = self.w.settings, self.w
        x, y = batch["fbank"], batch["label"]
        y = F.one_hot(y, w.num_classes).float() if y.dim() == 1 else y.float()  # index or multi-hot
        x, y = augment(x, y, s, w.norm_std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.ddp(x.to(self.device))
        loss = classification_loss(logits, y.to(self.device), w.loss, s.label_smoothing)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimiser.step()
            self.scheduler.step()
        return worker.StepOutput(loss, grad_norm, x.shape[0] * self.world)

    def metrics(self, out: worker.StepOutput) -> dict[str, float]:
        return {"loss": out.loss.item(), "lr": self.optimiser.param_groups[-1]["lr"],
                "grad_norm": float(out.grad_norm)}

    def finish(self) -> dict[str, float]:
        return evaluate_classifier(self.model, self.w, self.device) if self.rank == 0 else {}

    def no_batch_reason(self) -> str:
        s = self.w.settings
        return (f"split {s.split!r} of {s.data} gives no batch of {s.batch_size} clips per worker; "
                f"lower --batch-size or --workers")


@torch.no_grad()
def evaluate_classifier(model: ASDAClassifier, w: FinetuneWorkerConfig, device) -> dict[str, float]:
    """The classifier's eval_* metrics on the evaluation split (or held-out fold)."""
    from .data.feed import read_clips
    from .metrics import evaluate

    model.eval()
    s = w.settings
    clips = read_clips(s.data, w.eval_split, target_length=model.encoder.config.target_length,
                       labels="multihot" if w.multilabel else "index", folds=w.eval_folds)
    size = s.eval_batch_size
    scores = torch.cat([model(torch.as_tensor(clips["fbank"][i:i + size]).to(device)).float().cpu()
                        for i in range(0, len(clips["fbank"]), size)])
    model.train()
    return evaluate(scores, clips["label"], w.num_classes, w.multilabel)


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
    task = {"num_classes": len(card["class_names"]), "multilabel": multilabel, "loss": loss,
            "norm_std": card["normalisation"]["std"]}  # the FinetuneWorkerConfig fields every fold shares
    if settings.cv_folds:
        return _cross_validate(config, settings, card, task)
    eval_split = settings.eval_split or next((s for s in ("test", "valid") if s in card["splits"]), None)
    if eval_split is None:
        raise ValueError(f"{settings.data} has no test or valid split; name one with --eval-split")
    return _one(config, settings, card, task, eval_split=eval_split)


def _one(config: ASDAConfig, settings: FinetuneSettings, card: dict, task: dict[str, Any], *, eval_split: str,
         train_folds: list[int] | None = None, eval_folds: list[int] | None = None) -> dict[str, Any]:
    from .data.feed import feed_dataset

    run_id = start_tracking(config, settings, card, kind=tracking.KIND_FINETUNE,
                            extra_params={tracking.PARAM_FINETUNE_LOSS: task["loss"],
                                          tracking.PARAM_FINETUNE_EVAL_SPLIT: eval_split})
    dataset = feed_dataset(settings.data, settings.split, target_length=config.target_length,
                           labels="multihot" if task["multilabel"] else "index", random_crop=True,
                           seed=settings.seed, folds=train_folds, workers=settings.workers)
    result = fit(finetune_loop, FinetuneWorkerConfig, config=config, settings=settings, run_id=run_id,
                 datasets={"train": dataset}, eval_split=eval_split, eval_folds=eval_folds, **task)
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("eval_")}
    tracking.end_run(run_id, "FINISHED")
    return {**metrics, "run_id": run_id, "checkpoint": str(Path(result.checkpoint.path) / worker.CHECKPOINT_FILE),
            "name": settings.name}


def _cross_validate(config: ASDAConfig, settings: FinetuneSettings, card: dict, task: dict[str, Any]):
    from .data.card import cv_folds
    from .metrics import fold_summary

    folds = cv_folds(card, settings.split, settings.cv_folds, settings.data)
    plan = {k: [f for f in folds if f != k] for k in folds}  # held-out fold -> training folds
    for train_folds in plan.values():  # every fold can fill an update: checked before any training starts
        check_data(settings, folds=train_folds)
    per_fold = [_one(config, dataclasses.replace(settings, name=f"{settings.name}-fold{k}"), card, task,
                     eval_split=settings.split, train_folds=train_folds, eval_folds=[k])
                for k, train_folds in plan.items()]
    summary = fold_summary(per_fold, [k for k in per_fold[0] if k.startswith("eval_")])
    return {**summary, "folds": per_fold, "name": settings.name, "run_id": per_fold[-1]["run_id"]}
