"""`asda finetune`: supervised fine-tuning of a pretrained encoder on Ray Train (SPEC §5).

The release's recipe for the data set by default (``pipelines.recipes``: lr, batch, updates, mixup, SpecAugment,
loss, min lr, no gradient clipping; a flag overrides a field): layer-wise lr decay on the blocks only, drop path,
roll + gain of each clip's own frames, fbank noise (SPC-2), then mixup (with a probability), then SpecAugment
frequency/time masks; the loss follows the data set (AudioSet: BCE per positive label; Speech Commands with mixup:
BCE per clip; otherwise cross-entropy with label smoothing); the encoder is fed the data set's own clip length and
reads the CLS output or the mean of the patch outputs (``readout``); AudioSet-2M draws class-balanced passes. Once the Train run has ended (its workers
and their GPUs released), the final checkpoint is evaluated on Ray Data (``eval_accuracy`` / ``eval_map``; the
logits are computed by an actor pool, see ``pipelines.inference``). With ``cv_folds`` it runs one training per fold
(ESC-50: 5-fold cross-validation) and reports the mean.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from model import ASDAClassifier, ASDAConfig, load_checkpoint, load_encoder, param_groups_layer_decay
from model.encoder import check_readout

from . import tracking, worker
from .data.card import feed_length
from .data.feed import BalancedDraw
from .recipes import GOVERNED, check_recipe, resolve
from .training import TrainSettings, WorkerConfig, check_data, fit, start_tracking

# The release's losses. "ce": softmax cross-entropy, mean over clips (ESC-50). "bce": binary cross-entropy summed over
# clips and classes and divided by the batch's target mass, the number of positive labels (AudioSet). "bce_clip":
# binary cross-entropy summed over classes, mean over clips (Speech Commands V2 with mixup).
LOSSES = ("ce", "bce", "bce_clip")


@dataclass(frozen=True)
class FinetuneSettings(TrainSettings):
    """A fine-tuning run. The fields a recipe governs (``pipelines.recipes.GOVERNED``) default to None: the
    recipe's value, the release's for the data set unless ``recipe`` names another (``recipes.resolve``, called by
    ``finetune`` once the card is read); a value given here overrides the recipe's."""

    OPEN: ClassVar[tuple[str, ...]] = GOVERNED + ("min_lr_ratio",)

    recipe: str = "auto"  # "auto" (the data set's, recipes.recipe_for), a name in recipes.RECIPES, or "none"
    checkpoint: str | None = None  # pretraining checkpoint; None trains from a random initialisation
    which: str = "student"
    readout: str = "cls"  # what the head reads (model.READOUTS): the CLS output, or the release's mean pooling
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    min_lr: float | None = None  # where the cosine ends, absolute (the release: 1e-6); min_lr_ratio overrides it
    min_lr_ratio: float | None = None
    grad_clip: float | None = None  # 0 = no clipping (the release's fine-tuning)
    split: str | None = None
    layer_decay: float = 0.65
    drop_path: float = 0.1
    loss: str | None = None  # one of LOSSES; default: the recipe's, else the data set's (see default_loss)
    label_smoothing: float | None = None  # cross-entropy without mixup only (as the release)
    mixup: float | None = None  # Beta(mixup, mixup) mixing weight; 0 = off
    mixup_prob: float = 0.9  # share of batches mixed when mixup > 0 (the release's finetuning.yaml)
    specaug_time: float | None = None  # largest time mask, as a share of the frames
    specaug_freq: float | None = None  # largest frequency mask, as a share of the mel bins
    roll_gain: bool = True  # random roll and Beta(10, 10) + 0.5 gain of the clip's own frames
    noise: bool | None = None  # the release's task.noise (SPC-2): fbank noise and a ±10-frame roll
    eval_split: str | None = None  # default: test, else valid
    cv_folds: int = 0  # > 0: train with each fold 1..cv_folds held out in turn (split must hold the folds)
    eval_batch_size: int = 64
    # Class-balanced passes (AudioSet-2M); None = on for AudioSet's "unbalanced" split only, off elsewhere.
    balanced_sampling: bool | None = None
    clips_per_pass: int = 200_000  # clips a balanced pass keeps on average (the release's num_samples per epoch)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_recipe(self.recipe)
        if self.which not in ("student", "teacher"):
            raise ValueError(f"which={self.which!r} is not allowed: expected 'student' or 'teacher'")
        check_readout(self.readout)
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not allowed: expected one of {LOSSES}")
        for name in ("layer_decay", "label_smoothing", "specaug_time", "specaug_freq", "drop_path", "mixup_prob"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"{name}={value!r} is not allowed: expected a number in [0, 1]")
        if (self.mixup or 0) < 0 or self.cv_folds < 0:
            raise ValueError("mixup and cv_folds must be >= 0")
        if self.clips_per_pass < 1:
            raise ValueError(f"clips_per_pass={self.clips_per_pass!r} is not allowed: expected >= 1")
        if self.min_lr is not None and not self.min_lr >= 0:
            raise ValueError(f"min_lr={self.min_lr!r} is not allowed: expected a number >= 0")

    def with_recipe(self, card: dict) -> FinetuneSettings:
        """These settings with the recipe's values where they left a field open (``recipes.resolve``)."""
        return resolve(self, card)[0]


# --------------------------------------------------------------------------------------------------- worker


def gain_shift(gain: torch.Tensor, norm_std: float) -> torch.Tensor:
    """What a waveform gain ``gain`` does to normalised log-mel: power scales by gain², log-mel shifts by 2 ln gain,
    and the normalisation (÷ 2 std) makes that ln gain / std (exact but where Kaldi's fbank floors an energy)."""
    return gain.log() / norm_std


def roll_gain(x: torch.Tensor, frames: torch.Tensor, norm_std: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """The release's waveform roll and gain (np.roll by any amount, gain Beta(10, 10) + 0.5), done on each clip's
    own frames (the first ``frames[i]`` of row i): they are rolled within the clip and shifted by the gain, while
    the padding after them stays as the release pads it (after its fbank, untouched by either). A waveform roll
    by s samples is the frames rolled by s / 160, but for the frame or two at the seam; this rolls whole frames."""
    B = x.shape[0]
    gain = torch.distributions.Beta(10.0, 10.0).sample((B,)) + 0.5
    shifts = (torch.rand(B, generator=generator) * frames.float()).long().tolist()
    shift = gain_shift(gain, norm_std).to(x)
    out = x.clone()
    for i, (n, k) in enumerate(zip(frames.tolist(), shifts, strict=True)):
        out[i, :n] = torch.roll(x[i, :n], k, dims=0) + shift[i]
    return out


def fbank_noise(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The release's ``task.noise`` (SPC-2; data/raw_audio_dataset.py), after padding and normalisation: uniform
    [0, 1) noise times a per-clip scale from U[0, 0.1), then a circular roll of -10 to 9 frames."""
    B, T, Fq = x.shape
    scale = torch.rand(B, generator=generator) / 10
    x = x + torch.rand(B, T, Fq, generator=generator) * scale.view(B, 1, 1)
    shifts = torch.randint(-10, 10, (B,), generator=generator).tolist()
    return torch.stack([torch.roll(row, k, dims=0) for row, k in zip(x, shifts, strict=True)])


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float, prob: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability ``prob``, mix the batch with itself reversed, inputs and targets alike, by one
    λ ~ Beta(alpha, alpha) for the batch (the release's batch mode; its targets are mixed, not smoothed)."""
    if alpha <= 0 or float(torch.rand((), generator=generator)) >= prob:
        return x, y
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return lam * x + (1 - lam) * x.flip(0), lam * y + (1 - lam) * y.flip(0)


def spec_augment(x: torch.Tensor, time: float, freq: float, generator: torch.Generator | None = None):
    """The release's SpecAugment: torchaudio's FrequencyMasking(128·freq, iid_masks=True), then
    TimeMasking(T·time, iid_masks=True), drawn as torchaudio draws them: per clip a width w = ⌊u·mask_param⌋
    and a start ⌊v·(size − u·mask_param)⌋ (u, v uniform), zero over [start, start + w)."""
    B = x.shape[0]
    for axis, ratio in ((2, freq), (1, time)):
        size = x.shape[axis]
        mask_param = ratio * size
        if mask_param < 1:
            continue
        value = torch.rand(B, generator=generator) * mask_param
        start = (torch.rand(B, generator=generator) * (size - value)).long()
        end = start + value.long()
        pos = torch.arange(size)
        mask = (pos[None] >= start[:, None]) & (pos[None] < end[:, None])  # (B, size)
        x = x.masked_fill(mask.unsqueeze(1) if axis == 2 else mask.unsqueeze(2), 0.0)
    return x


def augment(fbank: torch.Tensor, labels: torch.Tensor, frames: torch.Tensor, s: FinetuneSettings,
            norm_std: float, generator: torch.Generator | None = None):
    """Training augmentation on normalised log-mel (B, T, F) and float targets (B, C), in the release's order:
    roll + gain of the clips' own frames (on the waveform there), fbank noise (``noise``), mixup, then SpecAugment,
    so masked bands stay zero."""
    x = roll_gain(fbank, frames, norm_std, generator) if s.roll_gain else fbank
    x = fbank_noise(x, generator) if s.noise else x
    x, labels = mixup(x, labels, s.mixup, s.mixup_prob, generator)
    return spec_augment(x, s.specaug_time, s.specaug_freq, generator), labels


def label_smoothing(s: FinetuneSettings) -> float:
    """The smoothing the loss applies: the settings' without mixup, none with it (the release's mixup_target has
    its smoothing lines commented out, utils/mixup.py)."""
    return s.label_smoothing if not s.mixup else 0.0


def optimiser_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimiser, scheduler,
                   grad_clip: float) -> torch.Tensor:
    """Backward, then the gradient norm clipped at ``grad_clip`` (0: measured only, as the release's fine-tuning,
    fairseq's clip_norm 0), then an optimiser and a schedule step unless the norm is not finite. Returns the norm
    before clipping."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if torch.isfinite(grad_norm):
        optimiser.step()
        scheduler.step()
    return grad_norm


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, smoothing: float) -> torch.Tensor:
    """targets: (B, C) probabilities (one-hot, multi-hot or mixed); ``kind`` one of LOSSES."""
    logits = logits.float()
    if kind == "bce":
        total = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        return total / targets.sum().clamp_min(1.0)
    if kind == "bce_clip":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]
    C = logits.shape[1]
    smoothed = targets * (1 - smoothing) + smoothing / C
    return torch.sum(-smoothed * F.log_softmax(logits, dim=1), dim=1).mean()


def default_loss(card: dict, mixup: float) -> str:
    """The release's loss for this data set: BCE per clip for Speech Commands trained with mixup, BCE per positive
    label for multi-label data (AudioSet), else cross-entropy (ESC-50, Speech Commands without mixup)."""
    if card["name"] == "speechcommands" and mixup > 0:
        return "bce_clip"
    return "bce" if card["multilabel"] else "ce"


def balanced_draw(settings: FinetuneSettings, card: dict) -> BalancedDraw | None:
    """Class-balanced passes enough for the run, or None when off (default: on for AudioSet's unbalanced split)."""
    on = settings.balanced_sampling
    if on is None:
        on = card["name"] == "audioset" and settings.split == "unbalanced"
    if not on:
        return None
    per_pass = min(settings.clips_per_pass, card["splits"][settings.split])
    draws = settings.steps * settings.batch_size * settings.workers
    return BalancedDraw(per_pass=per_pass, passes=math.ceil(draws / per_pass) + 1)


def build_classifier(config: ASDAConfig, num_classes: int, checkpoint: str | None, which: str,
                     readout: str = "cls") -> ASDAClassifier:
    encoder = load_encoder(checkpoint, which) if checkpoint else None
    if encoder is not None:
        # Keep the pretrained weights, take this run's drop path.
        fresh = type(encoder)(config)
        fresh.load_state_dict(encoder.state_dict())
        encoder = fresh
    return ASDAClassifier(config, num_classes, encoder=encoder, readout=readout)


def build_optimiser(model: ASDAClassifier, s: FinetuneSettings, depth: int) -> torch.optim.Optimizer:
    """AdamW over layer-decay groups, each at ``lr * lr_scale``. From scratch (no checkpoint) every parameter
    trains at the base rate: layer decay protects pretrained blocks, and a random encoder has none."""
    groups = param_groups_layer_decay(model, s.weight_decay, s.layer_decay if s.checkpoint else 1.0, depth=depth)
    for g in groups:
        g["lr"] = s.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2))


@dataclass(frozen=True, kw_only=True)
class FinetuneWorkerConfig(WorkerConfig):
    SETTINGS = FinetuneSettings

    num_classes: int
    multilabel: bool
    loss: str  # one of LOSSES
    target_length: int  # frames per clip fed to the encoder (the data set's unless overridden)
    norm_std: float  # the card's normalisation std (the gain augmentation shifts normalised log-mel)


def finetune_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker: one DDP rank of fine-tuning (the driver evaluates the final checkpoint)."""
    w = FinetuneWorkerConfig(**cfg)
    s = w.settings
    rank, world, device = worker.start_worker(w.threads, w.run_dir, s.in_process)
    torch.manual_seed(s.seed)  # identical initial weights on every rank
    model = build_classifier(w.model, w.num_classes, s.checkpoint, s.which, s.readout).to(device)
    optimiser = build_optimiser(model, s, depth=w.model.depth)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, worker.warmup_cosine(s.warmup_steps, s.steps, s.min_lr_ratio))
    checkpointer = worker.Checkpointer(rank=rank, run_dir=w.run_dir, every=s.checkpoint_every, last_step=s.steps,
                                       model=model, optimiser=optimiser, scheduler=scheduler, config=w.model,
                                       extra={"num_classes": w.num_classes, "readout": s.readout},
                                       in_process=s.in_process,
                                       report_to_tune=w.report_to_tune)
    step, epoch = checkpointer.restore(checkpointer.latest(), s.seed)
    logger = worker.RankZeroLogger(w.tracking_uri, w.run_id, enabled=rank == 0)
    job = FinetuneJob(worker.wrap_ddp(model, device, world), model, optimiser, scheduler, w, rank, device, world)
    return worker.run_steps(job, checkpointer, logger, steps=s.steps, log_every=s.log_every, start=(step, epoch))


class FinetuneJob:
    """One rank's fine-tuning: augmented labelled crops in, one supervised update per batch."""

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
        """One update: augment, forward (bf16 autocast on GPU), loss, backward, clip (if grad_clip), step, schedule."""
        s, w = self.w.settings, self.w
        x, y = batch["fbank"], batch["label"]
        y = F.one_hot(y, w.num_classes).float() if y.dim() == 1 else y.float()  # index or multi-hot
        x, y = augment(x, y, batch["frames"], s, w.norm_std)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.ddp(x.to(self.device))
        loss = classification_loss(logits, y.to(self.device), w.loss, label_smoothing(s))
        grad_norm = optimiser_step(loss, self.params, self.optimiser, self.scheduler, s.grad_clip)
        return worker.StepOutput(loss, grad_norm, x.shape[0] * self.world)

    def metrics(self, out: worker.StepOutput) -> dict[str, float]:
        return {"loss": out.loss.item(), "lr": self.optimiser.param_groups[-1]["lr"],
                "grad_norm": float(out.grad_norm)}

    def finish(self) -> dict[str, float]:
        return {}  # the evaluation runs on Ray Data once the run has ended (evaluate_classifier)

    def no_batch_reason(self) -> str:
        s = self.w.settings
        return (f"split {s.split!r} of {s.data} gives no batch of {s.batch_size} clips per worker; "
                f"lower --batch-size or --workers")

    def stop_reason(self) -> str | None:
        return None


def evaluate_classifier(checkpoint: str | Path, data: str, split: str, *, target_length: int, multilabel: bool,
                        folds: list[int] | None = None, batch_size: int = 64) -> dict[str, float]:
    """The eval_* metrics of a fine-tuning checkpoint's classifier on ``split`` (or its held-out ``folds``): its
    logits computed on Ray Data, so this process holds (N, C) logits and the labels, never the clips."""
    from .inference import model_outputs
    from .metrics import evaluate

    state, config = load_checkpoint(checkpoint)
    num_classes = int(state["num_classes"])
    model = ASDAClassifier(config, num_classes, readout=state.get("readout", "cls"))
    model.load_state_dict(state["model"])
    out = model_outputs(model, data, split, target_length=target_length,
                        labels="multihot" if multilabel else "index", folds=folds, batch_size=batch_size)
    return evaluate(torch.from_numpy(out["output"]), out["label"], num_classes, multilabel)


# --------------------------------------------------------------------------------------------------- driver


def finetune(config: ASDAConfig, settings: FinetuneSettings) -> dict[str, Any]:
    """Fine-tune (optionally per cross-validation fold) and evaluate; returns the metrics and run ids."""
    from .data.card import load_card

    settings = settings.resolved("finetune")
    if settings.checkpoint:
        settings = dataclasses.replace(settings, checkpoint=str(Path(settings.checkpoint).resolve()))
        _, config = load_checkpoint(settings.checkpoint)  # the architecture comes from the checkpoint
    settings, recipe, taken = resolve(settings, load_card(settings.data))
    print(recipe_line(recipe, taken, settings), flush=True)
    card = check_data(settings)
    multilabel = card["multilabel"]
    loss = settings.loss or default_loss(card, settings.mixup)
    if loss == "ce" and multilabel:
        raise ValueError(f"{card['name']} is multi-label: use loss 'bce' or 'bce_clip'")
    config = dataclasses.replace(config, drop_path=settings.drop_path)
    task = {"num_classes": len(card["class_names"]), "multilabel": multilabel, "loss": loss,
            "target_length": feed_length(card, settings.target_length, settings.data, config.patch_size),
            "norm_std": card["normalisation"]["std"]}  # the FinetuneWorkerConfig fields every fold shares
    if settings.cv_folds:
        return _cross_validate(config, settings, card, task)
    eval_split = settings.eval_split or next((s for s in ("test", "valid") if s in card["splits"]), None)
    if eval_split is None:
        raise ValueError(f"{settings.data} has no test or valid split; name one with --eval-split")
    return _one(config, settings, card, task, eval_split=eval_split)


def recipe_line(recipe: str, taken: dict[str, Any], settings: FinetuneSettings) -> str:
    """One line naming the recipe a fine-tuning run takes, the values it took from it and the flags that won."""
    from .recipes import GOVERNED

    fields = ", ".join(f"{k} {getattr(settings, k)}" for k in GOVERNED if k in taken)
    given = [k for k in GOVERNED if k not in taken]
    return (f"recipe {recipe}: {fields or 'nothing taken'}"
            + (f"; given: {', '.join(f'{k} {getattr(settings, k)}' for k in given)}" if given else ""))


def _one(config: ASDAConfig, settings: FinetuneSettings, card: dict, task: dict[str, Any], *, eval_split: str,
         train_folds: list[int] | None = None, eval_folds: list[int] | None = None) -> dict[str, Any]:
    from mlflow import MlflowClient

    from .data.feed import feed_dataset

    run_id = start_tracking(config, settings, card, kind=tracking.KIND_FINETUNE, length=task["target_length"],
                            extra_params={tracking.PARAM_FINETUNE_LOSS: task["loss"],
                                          tracking.PARAM_FINETUNE_EVAL_SPLIT: eval_split})
    dataset = feed_dataset(settings.data, settings.split, target_length=task["target_length"],
                           labels="multihot" if task["multilabel"] else "index", random_crop=True,
                           seed=settings.seed, folds=train_folds, workers=settings.workers,
                           balanced=balanced_draw(settings, card),
                           clips=settings.steps * settings.batch_size * settings.workers)
    result = fit(finetune_loop, FinetuneWorkerConfig, config=config, settings=settings, run_id=run_id,
                 datasets={"train": dataset}, **task)
    checkpoint = str(Path(result.checkpoint.path) / worker.CHECKPOINT_FILE)
    try:
        metrics = evaluate_classifier(checkpoint, settings.data, eval_split, target_length=task["target_length"],
                                      multilabel=task["multilabel"], folds=eval_folds,
                                      batch_size=settings.eval_batch_size)
    except Exception:
        tracking.end_run(run_id, "FAILED")
        raise
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=settings.steps)
    tracking.end_run(run_id, "FINISHED")
    return {**metrics, "run_id": run_id, "checkpoint": checkpoint, "name": settings.name}


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
