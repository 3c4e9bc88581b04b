"""ASDA pretraining: many masked students, one EMA teacher, frame- and utterance-level regression.

forward = teacher_targets -> student views (clone + inverse block mask) -> student encoder -> decoder -> losses.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ASDAConfig
from .decoder import CNNDecoder
from .encoder import ASDAEncoder
from .masking import inverse_block_mask, visible_indices


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
    scale = 1.0 / math.sqrt(pred.shape[-1])
    frame = (pred.float()[mask] - target[mask]).pow(2) * scale  # (M, D)
    utt = (utterance.float() - utterance_target).pow(2) * scale  # (B·S, D)
    if reduction == "release":
        return frame.sum() / frame.shape[0], utt.sum()
    if reduction == "mean":
        return frame.mean(), utt.mean()
    raise ValueError(f"loss_reduction={reduction!r} is not allowed: expected 'release' or 'mean'")


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
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.lerp_(s.detach().to(t.dtype), 1.0 - d)
        self.num_updates += 1
        return d

    @torch.no_grad()
    def teacher_targets(self, fbank: torch.Tensor) -> torch.Tensor:
        """(B, P, D): top-K layer MLP outputs, instance-normed over patches, averaged, layer-normed."""
        _, _, layers = self.teacher.forward_tokens(self.teacher.embed(fbank), return_layer_targets=True)
        top = layers[-self.config.average_top_k_layers:]
        # instance_norm normalises each channel over the patch axis: (B, D, P).
        y = sum(F.instance_norm(t.float().transpose(1, 2)) for t in top) / len(top)
        y = y.transpose(1, 2)  # (B, P, D)
        return F.layer_norm(y, y.shape[-1:])

    # --- students
    def forward(self, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        B, S, D = fbank.shape[0], c.num_students, c.embed_dim
        y = self.teacher_targets(fbank)  # (B, P, D), float32

        tokens = self.student.embed(fbank)  # (B, P, D): embed once, then clone
        P = tokens.shape[1]
        grid = self.student.patch_embed.grid(fbank.shape[1])
        tokens = tokens.repeat_interleave(S, dim=0)  # (B*S, P, D)
        mask = inverse_block_mask(
            B * S, grid, mask_ratio=c.mask_ratio, block_size=c.mask_block_size, adjust=c.mask_adjust,
            device=fbank.device,
        )  # (B*S, P), True = masked
        vis = visible_indices(mask)  # (B*S, k)
        visible = tokens.gather(1, vis.unsqueeze(-1).expand(-1, -1, D))  # (B*S, k, D)
        utterance, patches, _ = self.student.forward_tokens(visible, num_patches=P)
        pred = self.decoder(patches, vis, grid)  # (B*S, P, D)

        assert P == y.shape[1], f"teacher grid {y.shape[1]} != student grid {P}"
        loss_frame, loss_utterance = objective_terms(
            pred, y.repeat_interleave(S, dim=0), mask, utterance, y.mean(dim=1).repeat_interleave(S, dim=0),
            c.loss_reduction)
        return {
            "loss": c.alpha * loss_utterance + loss_frame,
            "loss_frame": loss_frame,
            "loss_utterance": loss_utterance,
        }

    def lambdas(self) -> list[float]:
        """λ of each student layer (differential attention), for logging."""
        return [float(b.attn.lambda_value()) for b in self.student.blocks if hasattr(b.attn, "lambda_value")]
