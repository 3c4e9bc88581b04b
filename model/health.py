"""Representation health: does pretraining keep clips apart, or has it collapsed to one output for every input?

Collapse is the known failure of EMA-teacher self-distillation (data2vec, EAT, BYOL): the student learns to
output one vector whatever the clip, the teacher follows it, and the loss is small for the wrong reason. The
measures here are read from what an update computes anyway (the students' utterance vectors, the teacher's
targets), so a run can watch them at every log step:

- ``utterance_std``: the standard deviation across the batch's clips of the student's utterance vector, per
  channel, averaged over channels (each clip's clones averaged first: the clones of one clip differ only in their
  masks);
- ``target_std``: the same across clips for the teacher's targets, per patch position and channel, averaged;
- ``utterance_rank``: the effective rank of the clips' centred utterance vectors, exp of the entropy of their
  normalised singular values (1 when every clip lies on one line, at most the number of clips); a run takes it
  over a window of recent clips (``pipelines.pretrain.PretrainJob.HEALTH_CLIPS``), a batch alone holds too few.

The blocks are post-LN, so the utterance vectors leave a LayerNorm and their spread is on one scale in every
model. The thresholds (``COLLAPSE``) were set on tiny runs of 300 updates (rank over 80 clips), where the probe
said which encoders were broken:

| run | probe vs random init | lowest rank | lowest std |
|---|---|---|---|
| recorded drum hits, release reduction | 0.46 vs 0.75 | 1.4 | 0.002 |
| synthesized speech, release reduction | 0.16 vs 0.41 | 3.2 | 0.006 |
| synthetic events, release reduction | 0.14 vs 0.19 | 2.6 | 0.35 |
| drum hits, per-element means, alpha = 0.5 | 0.58 vs 0.75 | 3.0 | 0.023 |
| synthetic events, per-element means | 0.28 vs 0.19 | 4.3 | 0.19 |
| the default grid's centre / alpha = 2 | 0.72 / 0.70 vs 0.48 | 7.8 / 5.2 | 0.22 / 0.40 |
| synthesized speech, per-element means | 0.58 vs 0.41 | 11.9 | 0.030 |
| drum hits, the tiny preset's recipe | 0.78 vs 0.75 | 8.4 | 0.15 |

A rank under 4 caught every broken run and none of the learning ones; the spread alone did not (it stays high
when the vectors vary along one or two directions that carry no class), so it counts only where it is near zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CollapseThresholds:
    """A run has collapsed when its utterance vectors' spread across clips, or their effective rank, falls below
    these (either alone is enough: a rank-1 set of vectors can still be spread along its one line)."""

    utterance_std: float = 0.01
    utterance_rank: float = 4.0


COLLAPSE = CollapseThresholds()


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of ``x`` (N, D) after centring its rows; 0 for N < 2 or a
    matrix of identical rows."""
    if x.shape[0] < 2:
        return 0.0
    s = torch.linalg.svdvals(x.double() - x.double().mean(0, keepdim=True))
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def clip_means(utterance: torch.Tensor, clips: int) -> torch.Tensor:
    """(B·S, D) every clone's utterance vector, clip b's clones at rows b·S .. b·S + S − 1 -> (B, D) each clip's
    mean over its clones (the clones of one clip differ only in their masks), float32, without gradient."""
    return utterance.detach().float().reshape(clips, -1, utterance.shape[-1]).mean(1)


@torch.no_grad()
def representation_health(utterance: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``utterance`` (N, D): one utterance vector per clip (``clip_means``; a run passes its window of recent
    clips); ``targets`` (B, P, D): the teacher's targets of a batch. Returns {"utterance_std", "target_std",
    "utterance_rank"}."""

    def spread(v: torch.Tensor) -> float:
        return float(v.std(0).mean()) if len(v) > 1 else 0.0

    return {"utterance_std": spread(utterance.float()), "target_std": spread(targets.detach().float()),
            "utterance_rank": effective_rank(utterance)}


def collapsed(health: dict[str, float], thresholds: CollapseThresholds = COLLAPSE) -> str | None:
    """Which measure says the representation collapsed, as text ("utterance_rank 1.42 < 4"), or None."""
    for name in ("utterance_std", "utterance_rank"):
        value, limit = health[name], getattr(thresholds, name)
        if value < limit:
            return f"{name} {value:.3g} < {limit:g}"
    return None


# The utterance term's effective weight (ASDAConfig.alpha_effective) measured at the tiny preset's width: up to 2
# learned (the default grid's alpha = 2 cell, per-element means); 16 (the release's sums at batch 8 x 4 students,
# alpha = 0.5) collapsed on the synthetic set, synthesized speech and recorded drum hits alike.
LEARNED_ALPHA_EFFECTIVE = 2.0
COLLAPSED_ALPHA_EFFECTIVE = 16.0
MEASURED_WIDTH = 128  # embed_dim of those runs: the warning holds for models this narrow


def collapse_risk(config, clips_per_device: int) -> str | None:
    """A warning, before anything trains, where ``config`` at ``clips_per_device`` gives the utterance term an
    effective weight beyond what was measured to learn at this width; None otherwise (or for wider models, where
    nothing was measured)."""
    if config.embed_dim > MEASURED_WIDTH:
        return None
    weight = config.alpha_effective(clips_per_device)
    if weight <= LEARNED_ALPHA_EFFECTIVE:
        return None
    how = (f"alpha {config.alpha:g} under loss_reduction 'release' x {clips_per_device} clips x "
           f"{config.num_students} students" if config.loss_reduction == "release" else f"alpha {config.alpha:g}")
    return (f"the utterance term weighs {weight:g}x the frame term per element ({how}); at this model width "
            f"{LEARNED_ALPHA_EFFECTIVE:g} is the most measured to learn and {COLLAPSED_ALPHA_EFFECTIVE:g} collapsed "
            f"the encoder on every data set tried: expect a collapse (use loss_reduction=mean, a smaller alpha, or "
            f"model.hold_alpha_effective in a grid)")
