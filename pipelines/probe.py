"""`asda probe`: a linear classifier on frozen utterance vectors — the evaluation a sweep can afford on a CPU.

Features come from the encoder of a checkpoint (or a randomly initialised one, the baseline), computed on Ray Data
in one pass over the splits the probe needs (``pipelines.inference``): this process holds the (N, D) utterance
vectors, never the clips. The classifier is an L2-regularised logistic (softmax or per-class sigmoid) regression on
standardised features, fitted full-batch with L-BFGS. Reports ``eval_accuracy`` (single-label) and ``eval_map`` via
``pipelines.metrics``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model import ASDAConfig, ASDAEncoder, load_encoder

from . import tracking
from .inference import check_readout, forward, readout_columns, readout_width
from .metrics import evaluate, fold_summary


@dataclass(frozen=True)
class ProbeSettings:
    data: str
    checkpoint: str | None = None  # None: a randomly initialised encoder (the baseline)
    which: str = "student"  # encoder of a pretraining checkpoint: student or teacher
    train_split: str = "train"
    eval_split: str | None = None  # default: test, else valid
    cv_folds: int = 0  # > 0: k-fold cross-validation over the train split's folds 1..k (ESC-50: 5)
    # what the classifier reads per clip (inference.ENCODER_READOUTS): "cls" (the utterance vector), "mean" (the
    # release's mean pooling of the patch outputs) or "cls+mean" (both side by side)
    readout: str = "cls"
    # also score the eval split with seeded white noise at these SNRs (dB), by the classifier fitted on clean
    # features (``<metric>_snr<dB>``; not with cv_folds)
    noise_snrs: tuple[float, ...] = ()
    task: str | None = None  # a sweep's task of this name: params and metrics logged under it (task_<name>/...)
    features: str | None = None  # the older name of readout ("utterance", "utterance+mean"), read with a warning
    l2: float = 1e-3  # weight of the L2 penalty on the classifier weights
    max_iter: int = 300
    batch_size: int = 64  # clips per feature-extraction batch
    seed: int = 0
    target_length: int | None = None  # frames per clip fed to the encoder; None: the data set's (its card)
    experiment: str = tracking.DEFAULT_EXPERIMENT
    name: str | None = None
    run_id: str | None = None  # log into this existing run (e.g. the pretraining run) instead of a new one
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        if self.which not in ("student", "teacher"):
            raise ValueError(f"which={self.which!r} is not allowed: expected 'student' or 'teacher'")
        if self.l2 < 0 or self.max_iter < 1 or self.batch_size < 1 or self.cv_folds < 0:
            raise ValueError("l2 and cv_folds must be >= 0, max_iter and batch_size >= 1")
        if self.features is not None:
            readout = check_readout(self.features)
            warnings.warn(f"the probe's features={self.features!r} is now readout={readout!r}", UserWarning,
                          stacklevel=3)
            object.__setattr__(self, "readout", readout)
            object.__setattr__(self, "features", None)
        object.__setattr__(self, "readout", check_readout(self.readout))
        snrs = self.noise_snrs if isinstance(self.noise_snrs, list | tuple) else [self.noise_snrs]
        bad = [v for v in snrs if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)]
        if bad or len(set(snrs)) != len(snrs):
            raise ValueError(f"noise_snrs={self.noise_snrs!r} is not allowed: expected distinct finite numbers (dB)")
        object.__setattr__(self, "noise_snrs", tuple(float(v) for v in snrs))


@torch.no_grad()
def encoder_features(encoder: ASDAEncoder, fbank: np.ndarray, batch_size: int = 64,
                     readout: str = "cls") -> torch.Tensor:
    """The probe's ``readout`` of clips already in this process, in batches of ``batch_size`` (without Ray:
    ``model_outputs`` gives the same bits at the same batch size and torch thread count)."""
    from .console import progress

    encoder.eval()
    shown = progress(len(fbank), "clips encoded")
    parts = []
    for i in range(0, len(fbank), batch_size):
        parts.append(forward(encoder, torch.as_tensor(fbank[i:i + batch_size]), readout))
        if shown:
            shown.update(min(i + batch_size, len(fbank)))
    if shown:
        shown.finish()
    return torch.cat(parts) if parts else torch.empty(0, readout_width(encoder.config, readout))


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, multilabel: bool, l2: float,
               max_iter: int, seed: int = 0) -> torch.nn.Module:
    """Logistic regression on standardised features; returns a module mapping raw features to logits."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = torch.nn.Linear(x.shape[1], num_classes).double()
    xs = ((x - mean) / std).double()
    target = y.double() if multilabel else y.long()
    loss_fn = torch.nn.BCEWithLogitsLoss() if multilabel else torch.nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(linear(xs), target) + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.nn.Sequential(_Standardise(mean, std), linear).float()


class _Standardise(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def probe(settings: ProbeSettings, config: ASDAConfig | None = None,
          also: Sequence[str] = ()) -> dict[str, Any]:
    """Fit and evaluate the probe on ``settings.readout``; metrics go to MLflow. ``config`` builds the random
    encoder when there is no checkpoint (default: the tiny preset). ``also``: further read-outs scored from the
    same encoding (one pass over the clips gives every read-out), returned under "readouts" and logged as
    ``readout_<name>/<metric>``."""
    from .data.card import load_card, padding_note
    from .inference import model_outputs

    card = load_card(settings.data)
    folds, eval_split = _evaluation(settings, card)
    if settings.checkpoint:
        encoder = load_encoder(settings.checkpoint, settings.which)
    else:
        torch.manual_seed(settings.seed)
        encoder = ASDAEncoder(config or ASDAConfig.tiny())
    length = input_length(encoder.config, card, settings.target_length, settings.data)
    padding, warning = padding_note(card, settings.train_split, length)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # One pass over every clip the probe needs (the encoder runs once per clip, one actor pool is started), each
    # clip's CLS output beside its mean patch output: every read-out is a slice of it.
    splits = list(dict.fromkeys([settings.train_split] if folds else [settings.train_split, eval_split]))
    encoded = model_outputs(encoder, settings.data, splits, target_length=length,
                            labels="multihot" if card["multilabel"] else "index", folds=folds,
                            batch_size=settings.batch_size, readout="cls+mean")
    noisy = None
    if settings.noise_snrs and not folds:  # the eval split again, with noise at each level, in one pass
        noisy = model_outputs(encoder, settings.data, [eval_split], target_length=length, labels="none",
                              batch_size=settings.batch_size, readout="cls+mean",
                              noise_snrs=settings.noise_snrs)["noisy"]
    scored = {}
    for readout in dict.fromkeys([settings.readout, *map(check_readout, also)]):
        columns = readout_columns(encoder.config, readout)
        scored[readout] = _score(settings, card, folds, eval_split, {**encoded, "output": encoded["output"][:, columns]},
                                 None if noisy is None else noisy[:, :, columns])
    metrics, num_train, num_eval = scored.pop(settings.readout)
    warning = near_chance(metrics, card)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    extra = {f"readout_{r}/{k}": v for r, (m, _, _) in scored.items() for k, v in m.items()}
    run_id = _log(settings, {**metrics, **extra}, eval_split, encoder.config, length, padding)
    return {**metrics, "run_id": run_id, "eval_split": eval_split, "num_train": num_train, "num_eval": num_eval,
            "readouts": {r: m for r, (m, _, _) in scored.items()}}


def _score(settings: ProbeSettings, card: dict, folds: list[int] | None, eval_split: str,
           encoded: dict[str, np.ndarray], noisy: np.ndarray | None = None) -> tuple[dict[str, float], int, int]:
    """(metrics, training clips, scored clips) of the probe fitted on ``encoded``'s train split (or each fold's
    complement) and scored on its eval split (or the held-out fold). ``noisy`` (L, N, ·): the eval split's features
    with noise at each of ``settings.noise_snrs``, scored by the same classifier (fitted on clean features) as
    ``<metric>_snr<dB>``."""
    multilabel, num_classes = card["multilabel"], len(card["class_names"])

    def features(keep: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return torch.from_numpy(encoded["output"][keep]), encoded["label"][keep]

    def fit_and_score(train: tuple, test: tuple, noisy: np.ndarray | None = None) -> dict[str, float]:
        classifier = fit_linear(train[0], torch.as_tensor(train[1]), num_classes, multilabel=multilabel,
                                l2=settings.l2, max_iter=settings.max_iter, seed=settings.seed)
        with torch.no_grad():
            metrics = evaluate(classifier(test[0]), test[1], num_classes, multilabel)
            train_metrics = evaluate(classifier(train[0]), train[1], num_classes, multilabel)
            for snr, features in zip(settings.noise_snrs, noisy if noisy is not None else [], strict=False):
                scored = evaluate(classifier(torch.from_numpy(features)), test[1], num_classes, multilabel)
                metrics.update({f"{k}{snr_suffix(snr)}": v for k, v in scored.items()})
        return {**metrics, **{f"train_{k[5:]}": v for k, v in train_metrics.items()}}

    if not folds:
        train, test = features(encoded["split"] == settings.train_split), features(encoded["split"] == eval_split)
        return fit_and_score(train, test, noisy), len(train[0]), len(test[0])
    parts = {k: features(encoded["fold"] == k) for k in folds}
    per_fold = {}
    for k in folds:
        rest = [parts[j] for j in folds if j != k]
        per_fold[k] = fit_and_score((torch.cat([x for x, _ in rest]), np.concatenate([y for _, y in rest])), parts[k])
    first = per_fold[folds[0]]
    metrics = fold_summary(list(per_fold.values()), [k for k in first if k.startswith("eval_")])
    metrics.update({key: float(np.mean([m[key] for m in per_fold.values()])) for key in first
                    if key.startswith("train_")})
    metrics.update({f"{key}_fold{k}": m[key] for k, m in per_fold.items() for key in m if key.startswith("eval_")})
    num_train = sum(len(x) for x, _ in parts.values())
    return metrics, num_train, num_train


def snr_suffix(snr: float) -> str:
    """The suffix of a metric measured with noise at ``snr`` dB: "_snr10", "_snr-5", "_snr2.5"."""
    return f"_snr{snr:g}"


NEAR_CHANCE = 0.1  # "near chance": a train accuracy less than this share of the way from chance to 1


def near_chance(metrics: dict[str, float], card: dict) -> str | None:
    """A warning where the classifier does not separate even the clips it was fitted on (train accuracy less than
    NEAR_CHANCE of the way from chance, the largest class's share, to 1; single-label only): the features carry
    little of the classes, the mark of a collapsed encoder (measured: a collapsed tiny run's probe fits its train
    split at 0.18 with 8 classes, where the line is 0.21; a random-init encoder's at 0.42, healthy pretrained ones'
    at 0.32-0.9). None otherwise."""
    train = metrics.get("train_accuracy")
    if card["multilabel"] or train is None:
        return None
    counts = card.get("class_counts", {}).get("train") or []
    chance = max(counts) / sum(counts) if counts and sum(counts) else 1 / len(card["class_names"])
    if train >= chance + NEAR_CHANCE * (1 - chance):
        return None
    return (f"warning: the probe fits its own training clips at {train:.3f}, near chance ({chance:.3f}, the "
            f"largest class's share): the encoder's features hardly tell the classes apart; if it was pretrained, "
            f"check its run for a collapse (MLflow tag asda.collapsed)")


def _evaluation(settings: ProbeSettings, card: dict) -> tuple[list[int] | None, str]:
    """(the folds to cross-validate over or None, the name of what the probe is scored on)."""
    if settings.cv_folds:
        from .data.card import cv_folds

        folds = cv_folds(card, settings.train_split, settings.cv_folds, settings.data)
        return folds, f"{settings.train_split} folds 1-{settings.cv_folds}"
    eval_split = settings.eval_split or next((s for s in ("test", "valid") if s in card["splits"]), None)
    if eval_split is None:
        raise ValueError(f"{settings.data} has no test or valid split; name one with --eval-split, or "
                         f"cross-validate over its folds with --cv-folds")
    return None, eval_split


def input_length(config: ASDAConfig, card: dict, override: int | None, data: str) -> int:
    """Frames per clip to feed ``config``'s encoder: the data set's (or ``override``), never the checkpoint's.
    A fixed sincos table serves any length; a learned one only up to the length it was trained with."""
    from .data.card import feed_length

    length = feed_length(card, override, data, config.patch_size)
    if config.pos_embed == "learned1d" and length > config.target_length:
        raise ValueError(f"target_length={length} for {data} is longer than the {config.target_length} frames the "
                         f"encoder's learned positions cover; pass --target-length <= {config.target_length}")
    return length


def _log(settings: ProbeSettings, metrics: dict[str, float], eval_split: str, config: ASDAConfig,
         length: int, padding: dict[str, str]) -> str:
    from mlflow import MlflowClient

    experiment_id = tracking.setup(settings.experiment)
    client = MlflowClient()
    run_id = settings.run_id
    # A task's probe logs into another run beside its main probe: its params and metrics under the task's name.
    prefix = f"{tracking.PARAM_TASK}{settings.task}." if settings.task else tracking.PARAM_PROBE
    params = {f"{prefix}{k}": str(v) for k, v in dataclasses.asdict(settings).items()
              if k not in ("run_id", "parent_run_id", "name", "features", "task")}
    params[f"{prefix}eval_split_resolved"] = eval_split
    params[prefix + tracking.PARAM_DATA_TARGET_LENGTH] = str(length)
    params.update({prefix + k: v for k, v in padding.items()})
    if settings.task:
        metrics = {f"{tracking.METRIC_TASK}{settings.task}/{k}": v for k, v in metrics.items()}
    if run_id is None:
        tags = {tracking.TAG_KIND: tracking.KIND_PROBE,
                tracking.TAG_CHECKPOINT: str(settings.checkpoint or "random-init")}
        if settings.parent_run_id:
            tags[tracking.TAG_PARENT] = settings.parent_run_id
        run = client.create_run(experiment_id, run_name=settings.name or "probe", tags=tags)
        run_id = run.info.run_id
        params.update(tracking.flatten(config.to_dict(), tracking.PARAM_MODEL))
        params[tracking.PARAM_DATA_TARGET_LENGTH] = str(length)  # a run of its own: the frames it fed
        params.update(padding)
    tracking.log_params(client, run_id, params)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if settings.run_id is None:
        tracking.end_run(run_id, "FINISHED")
    return run_id
