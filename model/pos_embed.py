"""Positional encodings over the patch grid, sliced to the input's length so variable lengths work.

``sincos2d`` (the release): a fixed table, half the channels encode the frequency row, half the time column.
``learned1d`` (the paper's wording): one learned vector per flattened position.
"""

from __future__ import annotations

import torch
from torch import nn


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) sin/cos features at geometrically spaced frequencies."""
    assert dim % 2 == 0, f"sincos dimension must be even, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(T * F, dim) table for a time-major (T, F) grid: channels [0, dim/2) frequency, [dim/2, dim) time."""
    t_size, f_size = grid
    t_idx = torch.arange(t_size).repeat_interleave(f_size)  # (T*F,) time of each flattened patch
    f_idx = torch.arange(f_size).repeat(t_size)  # (T*F,) frequency of each flattened patch
    return torch.cat([sincos_1d(f_idx, dim // 2), sincos_1d(t_idx, dim // 2)], dim=1)


class SinCos2dPositionalEncoding(nn.Module):
    def __init__(self, embed_dim: int, max_grid: tuple[int, int]):
        super().__init__()
        self.freq_bins = max_grid[1]
        self.register_buffer("table", sincos_2d_table(max_grid, embed_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.codes(x.shape[1]).to(x.dtype)

    def codes(self, num_patches: int) -> torch.Tensor:
        """(num_patches, D): the table's first rows; a fixed function, so a longer input gets a longer table."""
        if num_patches > self.table.shape[0]:
            grid = (-(-num_patches // self.freq_bins), self.freq_bins)
            return sincos_2d_table(grid, self.table.shape[1]).to(self.table.device)[:num_patches]
        return self.table[:num_patches]


class Learned1dPositionalEncoding(nn.Module):
    def __init__(self, embed_dim: int, max_grid: tuple[int, int]):
        super().__init__()
        self.freq_bins = max_grid[1]
        self.table = nn.Parameter(torch.zeros(max_grid[0] * max_grid[1], embed_dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _slice(self.table, x.shape[1], self.freq_bins)


def _slice(table: torch.Tensor, num_patches: int, freq_bins: int) -> torch.Tensor:
    # Time-major flattening makes "the first t time columns" the first t * F rows.
    if num_patches > table.shape[0]:
        raise ValueError(
            f"input has {num_patches // freq_bins} patch columns, more than the "
            f"{table.shape[0] // freq_bins} that target_length allows; raise target_length or crop the input"
        )
    return table[:num_patches]


POSITIONAL_ENCODINGS = {"sincos2d": SinCos2dPositionalEncoding, "learned1d": Learned1dPositionalEncoding}
