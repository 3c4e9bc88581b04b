"""Evaluation metrics with the conventions of the audio literature (SPEC §5)."""

from __future__ import annotations

import numpy as np


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of one class (sklearn's definition: Σ (R_k − R_{k−1}) P_k over score thresholds)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    # One point per distinct score: ties are ranked together, as sklearn does.
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(targets)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / targets.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, targets) -> float:
    """Mean over classes with at least one positive of the average precision. scores, targets: (N, C)."""
    scores, targets = _numpy(scores), _numpy(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N, C)")
    present = np.flatnonzero(targets.sum(axis=0) > 0)
    if present.size == 0:
        raise ValueError("no class has a positive target: mAP is undefined")
    return float(np.mean([average_precision(scores[:, c], targets[:, c]) for c in present]))


def accuracy(scores, labels) -> float:
    """Share of rows whose highest score is the label. scores (N, C), labels (N,) class indices."""
    scores, labels = _numpy(scores), _numpy(labels).astype(np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} must be (N, C) and labels {labels.shape} (N,)")
    return float(np.mean(scores.argmax(axis=1) == labels))


def evaluate(scores, labels: np.ndarray, num_classes: int, multilabel: bool) -> dict[str, float]:
    """eval_map always; eval_accuracy for single-label data."""
    if multilabel:
        return {"eval_map": mean_average_precision(scores, labels)}
    onehot = np.eye(num_classes, dtype=np.float32)[labels]
    return {"eval_accuracy": accuracy(scores, labels), "eval_map": mean_average_precision(scores, onehot)}


def fold_summary(per_fold: list[dict[str, float]], keys) -> dict[str, float]:
    """Mean and spread (``<key>_std``) over cross-validation folds of each metric in ``keys``."""
    summary = {k: float(np.mean([m[k] for m in per_fold])) for k in keys}
    summary.update({f"{k}_std": float(np.std([m[k] for m in per_fold])) for k in keys})
    return summary
