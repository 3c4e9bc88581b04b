import numpy as np
import pytest
import torch

from pipelines.metrics import accuracy, average_precision, mean_average_precision


def _sklearn_like_ap(scores, targets):
    # Reference by brute force: precision at every positive, ties broken pessimistically per distinct score.
    ap, positives = 0.0, targets.sum()
    for threshold in np.unique(scores)[::-1]:
        chosen = scores >= threshold
        tp = (targets * chosen).sum()
        prev_chosen = scores > threshold
        prev_tp = (targets * prev_chosen).sum()
        ap += (tp - prev_tp) / positives * tp / chosen.sum()
    return ap


def test_average_precision_matches_the_threshold_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.round(rng.random(50), 1)  # many ties
        targets = (rng.random(50) < 0.3).astype(float)
        targets[0] = 1
        assert average_precision(scores, targets) == pytest.approx(_sklearn_like_ap(scores, targets))


def test_known_values():
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1.0, 0.0, 1.0])) == pytest.approx((1 + 2 / 3) / 2)
    assert mean_average_precision(np.eye(3), np.eye(3)) == 1.0


def test_classes_without_positives_are_skipped():
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.5]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert mean_average_precision(scores, targets) == 1.0


def test_accuracy_and_shape_errors():
    assert accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match="must be"):
        accuracy(np.zeros((2, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="no class"):
        mean_average_precision(np.zeros((2, 2)), np.zeros((2, 2)))
