"""Patch embedding: (B, T, F) log-mel -> (B, P, D) tokens on a time-major (T/p) x (F/p) grid."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` x ``patch_size`` patches projected to ``embed_dim`` by one strided conv."""

    def __init__(self, embed_dim: int, patch_size: int = 16, num_mel_bins: int = 128):
        super().__init__()
        self.patch_size = patch_size
        self.num_mel_bins = num_mel_bins
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def grid(self, num_frames: int) -> tuple[int, int]:
        """(time, frequency) patch grid of an input with ``num_frames`` frames; a tail < patch_size is dropped."""
        return num_frames // self.patch_size, self.num_mel_bins // self.patch_size

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        if fbank.dim() != 3 or fbank.shape[-1] != self.num_mel_bins:
            raise ValueError(f"expected fbank (B, T, {self.num_mel_bins}), got {tuple(fbank.shape)}")
        if fbank.shape[1] < self.patch_size:
            raise ValueError(f"input has {fbank.shape[1]} frames, fewer than one patch ({self.patch_size})")
        x = self.proj(fbank.unsqueeze(1))  # (B, D, T/p, F/p)
        return x.flatten(2).transpose(1, 2)  # (B, P, D), index = t * (F/p) + f
