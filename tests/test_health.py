"""The collapse guard's measures and the recipe check before training (model.health)."""

import pytest
import torch

from model import ASDAConfig
from model.health import COLLAPSE, clip_means, collapse_risk, collapsed, effective_rank, representation_health


def test_effective_rank_counts_the_directions_the_rows_spread_along():
    torch.manual_seed(0)
    line = torch.randn(40, 1) * torch.randn(1, 16)  # every row on one line through the origin
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-4)  # float64 rounding leaves a trace
    # N orthonormal rows, centred, span N - 1 directions with equal singular values: exp(entropy) = N - 1
    assert effective_rank(torch.eye(8, 16)) == pytest.approx(7.0, rel=1e-6)
    assert effective_rank(torch.ones(5, 16)) == 0.0 and effective_rank(torch.randn(1, 16)) == 0.0


def test_clones_are_averaged_per_clip_before_the_spread_across_clips():
    torch.manual_seed(0)
    clips, students, dim = 6, 3, 8
    per_clip = torch.randn(clips, 1, dim)
    noise = torch.randn(clips, students, dim) * 0.1
    noise -= noise.mean(1, keepdim=True)  # the clones' differences cancel in their mean
    utterance = (per_clip + noise).reshape(clips * students, dim)
    targets = torch.randn(clips, 10, dim)
    assert torch.allclose(clip_means(utterance, clips), per_clip.squeeze(1), atol=1e-6)
    health = representation_health(clip_means(utterance, clips), targets)
    assert health["utterance_std"] == pytest.approx(float(per_clip.squeeze(1).std(0).mean()), rel=1e-5)
    assert health["target_std"] == pytest.approx(float(targets.std(0).mean()), rel=1e-5)
    assert health["utterance_rank"] == pytest.approx(effective_rank(per_clip.squeeze(1)), rel=1e-6)


def test_one_output_for_every_clip_is_a_collapse_and_a_spread_set_is_not():
    torch.manual_seed(0)
    same = torch.randn(1, 32).expand(16, 32) + 1e-4 * torch.randn(16, 32)
    found = collapsed(representation_health(same, torch.randn(16, 4, 32)))
    assert found is not None and found.startswith("utterance_std")
    assert collapsed(representation_health(torch.randn(16, 32), torch.randn(16, 4, 32))) is None
    # spread along one line only: the spread is large, the rank says collapse
    line = torch.randn(16, 1) * torch.randn(1, 32)
    found = collapsed(representation_health(line, torch.randn(16, 4, 32)))
    assert found == f"utterance_rank 1 < {COLLAPSE.utterance_rank:g}"


def test_alpha_effective_is_alpha_under_means_and_alpha_times_clips_times_clones_under_the_release_sums():
    assert ASDAConfig.tiny(loss_reduction="mean", alpha=0.5).alpha_effective(8) == 0.5
    assert ASDAConfig.tiny(loss_reduction="release", alpha=0.5, num_students=4).alpha_effective(8) == 16.0
    assert ASDAConfig(alpha=0.5, num_students=16).alpha_effective(12) == 96.0  # the release: 12 clips x 16 clones


def test_the_recipe_check_warns_where_the_measured_collapse_was_and_not_on_the_defaults():
    risk = collapse_risk(ASDAConfig.tiny(loss_reduction="release", alpha=0.5), 8)
    assert risk is not None and "16x" in risk and "loss_reduction=mean" in risk
    assert collapse_risk(ASDAConfig.tiny(), 8) is None  # the tiny preset's own recipe
    assert collapse_risk(ASDAConfig.tiny(loss_reduction="mean", alpha=2.0), 8) is None  # the grid's alpha = 2 cell
    assert collapse_risk(ASDAConfig.tiny(loss_reduction="mean", alpha=4.0), 8) is not None
    assert collapse_risk(ASDAConfig(), 12) is None  # nothing was measured at the base width


def test_the_guard_judges_only_a_full_window_of_clips():
    """A batch of 2 clips has rank at most 1: judged on so few, every run would be a collapse."""
    import collections

    from pipelines.pretrain import PretrainJob, PretrainSettings

    job = PretrainJob.__new__(PretrainJob)  # the guard alone, without a Ray Train context
    job.settings, job.world, job.logger, job.collapse = PretrainSettings(data="-", batch_size=2), 1, None, None
    job.window = collections.deque(maxlen=PretrainJob.HEALTH_CLIPS // 2)
    spread = {"utterance_std": 0.5, "target_std": 0.5, "utterance_rank": 1.0}
    job.window.extend(torch.randn(2, 8) for _ in range(PretrainJob.HEALTH_CLIPS // 2 - 1))
    job.guard(spread, step=39)
    assert job.collapse is None  # 78 clips: not yet judged
    job.window.append(torch.randn(2, 8))
    job.guard(spread, step=40)
    assert job.collapse == "update 40: utterance_rank 1 < 4"
