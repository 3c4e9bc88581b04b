"""ASDA pretraining: many masked students, one EMA teacher, frame- and utterance-level regression.

forward = teacher_targets -> draw_views (inverse block masks, mask-token noise) -> forward_students (student
encoder over each clone's visible patches, decoder) -> losses.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ASDAConfig
from .decoder import CNNDecoder
from .encoder import ASDAEncoder
from .masking import inverse_block_mask, keep_count, split_indices


def ema_decay(step: int, start: float, end: float, anneal_steps: int) -> float:
    """Teacher decay: linear from ``start`` at step 0 to ``end`` at ``anneal_steps``, constant after."""
    if step >= anneal_steps:
        return end
    return end - (end - start) * (1 - step / anneal_steps)


def objective_terms(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, utterance: torch.Tensor,
                    utterance_target: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame term, utterance term) from the element-wise squared error scaled by 1/√D (SPEC §4).

    pred, target: (B·S, P, D) per clone; mask: (B·S, P), True = masked; utterance, utterance_target: (B·S, D).
    "release" reduces as fairseq does for the release (each term summed, gradients divided by the masked-patch
    count M): frame = Σ over masked patches and channels / M, utterance = Σ over clones and channels. "mean"
    averages each term over its elements, which is the release's scaled by 1/D and 1/(D·B·S).
    """
    return reduce_terms(pred.float()[mask], target[mask], utterance, utterance_target, reduction)


def reduce_terms(pred: torch.Tensor, target: torch.Tensor, utterance: torch.Tensor, utterance_target: torch.Tensor,
                 reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``objective_terms`` of the masked patches alone: pred, target (M, D), the M masked patches of every clone
    in (clone, patch) order; utterance, utterance_target (B·S, D)."""
    scale = 1.0 / math.sqrt(pred.shape[-1])
    frame = (pred.float() - target).pow(2) * scale  # (M, D)
    utt = (utterance.float() - utterance_target).pow(2) * scale  # (B·S, D)
    if reduction == "release":
        return frame.sum() / frame.shape[0], utt.sum()
    if reduction == "mean":
        return frame.mean(), utt.mean()
    raise ValueError(f"loss_reduction={reduction!r} is not allowed: expected 'release' or 'mean'")


class StudentViews(NamedTuple):
    """What an update draws at random for its students, drawn before the forward so that a compiled forward is a
    fixed function of its inputs (and draws exactly what the eager one does)."""

    visible: torch.Tensor  # (B·S, k) ascending indices of the patches each clone sees
    masked: torch.Tensor  # (B·S, P − k) ascending indices of the patches it predicts
    noise: torch.Tensor  # (B·S, P, D) N(0, 1); the decoder scales it into mask tokens


def _per_clip(indices: torch.Tensor, clips: int) -> torch.Tensor:
    """(B·S, n) per-clone patch indices -> (B, S·n, 1): clip b's clones one after another, ready for ``gather``
    along a clip's patch axis (the clone order of the batch, b·S + s, is kept)."""
    return indices.reshape(clips, -1).unsqueeze(-1)


class ASDA(nn.Module):
    """Pretraining module. ``forward(fbank)`` returns {"loss", "loss_frame", "loss_utterance"} with
    ``loss = alpha * loss_utterance + loss_frame``; the terms reduce as ``config.loss_reduction`` says
    (``objective_terms``). Under "release" the utterance term is a sum over the clips × clones of the batch, so
    α weighs it as in the paper and its effective weight grows with the per-device batch and the student count,
    as it did there.
    """

    def __init__(self, config: ASDAConfig):
        super().__init__()
        self.config = config
        self.student = ASDAEncoder(config)
        self.decoder = CNNDecoder(config)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> ASDA:
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed function between EMA steps
        return self

    # --- teacher
    @property
    def ema_decay(self) -> float:
        c = self.config
        return ema_decay(int(self.num_updates), c.ema_decay_start, c.ema_decay_end, c.ema_anneal_steps)

    @torch.no_grad()
    def update_teacher(self) -> float:
        """One EMA step ``teacher = d * teacher + (1 - d) * student`` at the current decay (float32); returns d."""
        d = self.ema_decay
        teacher, student = list(self.teacher.parameters()), list(self.student.parameters())
        assert len(teacher) == len(student), "teacher and student must have the same parameters"
        # One multi-tensor lerp over every parameter: the same arithmetic as a per-tensor lerp_, one launch on GPU.
        torch._foreach_lerp_(teacher, [s.detach().to(t.dtype) for t, s in zip(teacher, student, strict=True)], 1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def teacher_targets(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, P, D): top-K layer MLP outputs, instance-normed over patches, averaged, layer-normed."""
        _, _, layers = self.teacher.forward_tokens(self.teacher.embed(fbank), return_layer_targets=True)
        top = torch.stack(layers[-self.config.average_top_k_layers:]).float()  # (K, B, P, D)
        K, B, P, D = top.shape
        # instance_norm normalises each channel over the patch axis: all K layers in one call on (K·B, D, P).
        y = F.instance_norm(top.view(K * B, P, D).transpose(1, 2)).view(K, B, D, P).mean(dim=0)  # (B, D, P)
        y = y.transpose(1, 2)  # (B, P, D)
        return F.layer_norm(y, y.shape[-1:])

    # --- students
    def draw_views(self, fbank: torch.Tensor) -> StudentViews:
        """Each clone's inverse block mask and its mask-token noise, for a batch of ``fbank`` (B, T, F)."""
        c = self.config
        B, S, D = fbank.shape[0], c.num_students, c.embed_dim
        grid = self.student.patch_embed.grid(fbank.shape[1])
        P = grid[0] * grid[1]
        mask = inverse_block_mask(B * S, grid, mask_ratio=c.mask_ratio, block_size=c.mask_block_size,
                                  adjust=c.mask_adjust, device=fbank.device)  # (B·S, P), True = masked
        visible, masked = split_indices(mask, keep_count(P, c.mask_ratio))
        noise = torch.randn(B * S, P, D, device=fbank.device, dtype=self.decoder.proj.weight.dtype)
        return StudentViews(visible, masked, noise)

    def forward_students(self, fbank: torch.Tensor, views: StudentViews) -> tuple[torch.Tensor, torch.Tensor]:
        """Every clone's student pass: (utterance (B·S, D), decoder predictions (B·S, P, D)).

        The clip is embedded once; each clone's visible tokens are gathered from it directly, all clones of a
        clip in one gather (no B·S copy of the clip)."""
        B, S = fbank.shape[0], self.config.num_students
        tokens = self.student.embed(fbank)  # (B, P, D)
        _, P, D = tokens.shape
        clones, k = views.visible.shape
        assert clones == B * S, f"views for {clones} clones, batch has {B} clips x {S} students"
        index = _per_clip(views.visible, B).expand(-1, -1, D)  # (B, S·k, D)
        visible = tokens.gather(1, index).view(clones, k, D)  # (B·S, k, D)
        utterance, patches, _ = self.student.forward_tokens(visible, num_patches=P)
        pred = self.decoder(patches, views.visible, views.noise, self.student.patch_embed.grid(fbank.shape[1]))
        return utterance, pred  # (B·S, D), (B·S, P, D)

    def losses(self, pred: torch.Tensor, utterance: torch.Tensor, y: torch.Tensor,
               views: StudentViews) -> dict[str, torch.Tensor]:
        """The objective of every clone against the teacher's targets y (B, P, D) (``reduce_terms``)."""
        c = self.config
        B, P, D = y.shape
        assert pred.shape[1] == P, f"teacher grid {P} != student grid {pred.shape[1]}"
        # The masked patches of every clone in (clone, patch) order, (M, D): from pred (B·S, P, D), and from the
        # targets of the clone's clip in y (B, P, D) without repeating y per clone.
        masked = views.masked.unsqueeze(-1).expand(-1, -1, D)  # (B·S, m, D)
        pred_masked = pred.gather(1, masked).reshape(-1, D)
        target_masked = y.gather(1, _per_clip(views.masked, B).expand(-1, -1, D)).reshape(-1, D)
        loss_frame, loss_utterance = reduce_terms(
            pred_masked, target_masked, utterance, y.mean(dim=1).repeat_interleave(c.num_students, dim=0),
            c.loss_reduction)
        return {
            "loss": c.alpha * loss_utterance + loss_frame,
            "loss_frame": loss_frame,
            "loss_utterance": loss_utterance,
        }

    def forward(self, fbank: torch.Tensor, views: StudentViews | None = None) -> dict[str, torch.Tensor]:
        """fbank (B, T, F) -> {"loss", "loss_frame", "loss_utterance"}, and what the update computed on the way
        for a run to watch its health (``model.health``): "utterance" (B·S, D), every clone's student utterance
        vector, and "targets" (B, P, D), the teacher's, both without gradient. ``views``: the students' masks and
        noise (``draw_views``), drawn here when not given."""
        y = self.teacher_targets(fbank)  # (B, P, D), float32
        if views is None:
            views = self.draw_views(fbank)
        utterance, pred = self.forward_students(fbank, views)
        return {**self.losses(pred, utterance, y, views), "utterance": utterance.detach(), "targets": y}

    def lambdas(self) -> list[float]:
        """λ of each student layer (differential attention), for logging."""
        return [float(b.attn.lambda_value()) for b in self.student.blocks if hasattr(b.attn, "lambda_value")]
