"""Positional encodings over the patch grid, sliced to the input's length so variable lengths work.

``sincos2d`` (the release): a fixed table, half the channels encode the frequency row, half the time column.
``learned1d`` (the paper's wording): one learned vector per slot of the flattened sequence.

The CLS token has a position too. Attention is permutation-equivariant, so a CLS without a positional code
computes the same function wherever it is inserted; its code is what makes ``cls_position`` a factor. The CLS's
slot comes from the full (unmasked) layout of ``num_patches`` patches, so a student that sees a few patches and
the teacher that sees all of them agree on it:

- ``learned1d``: the table has one row per patch plus one for the CLS. Head: the CLS takes row 0 and patch i row
  i + 1. Middle: the CLS takes the row of the first patch of the middle time column m = (P / F) // 2, i.e. row
  m·F; patches before it keep their index, later ones shift by one.
- ``sincos2d``: patch codes are unchanged; the CLS gets the time half of the code of a time column (head: column
  −1, one before the first; middle: column m) and zeros in the frequency half. The release puts the CLS at the
  head without a code, which is the same function up to a constant that the learned CLS vector absorbs.
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


def cls_column(cls_position: str, num_patches: int, freq_bins: int) -> int | None:
    """The time column the CLS token belongs to in a full layout of ``num_patches`` patches (None: no CLS)."""
    return {"head": -1, "middle": (num_patches // freq_bins) // 2, "none": None}[cls_position]


class SinCos2dPositionalEncoding(nn.Module):
    def __init__(self, embed_dim: int, max_grid: tuple[int, int], cls_position: str = "head"):
        super().__init__()
        self.freq_bins, self.cls_position = max_grid[1], cls_position
        self.register_buffer("table", sincos_2d_table(max_grid, embed_dim), persistent=False)
        # The CLS's code for every time column it can sit in (-1: before the first), computed once rather than on
        # every forward: row c + 1 is column c's.
        self.register_buffer("cls_table", self._cls_codes(torch.arange(-1, max_grid[0])), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.codes(x.shape[1]).to(x.dtype)

    def codes(self, num_patches: int) -> torch.Tensor:
        """(num_patches, D): the table's first rows; a fixed function, so a longer input gets a longer table."""
        if num_patches > self.table.shape[0]:
            grid = (-(-num_patches // self.freq_bins), self.freq_bins)
            return sincos_2d_table(grid, self.table.shape[1]).to(self.table.device)[:num_patches]
        return self.table[:num_patches]

    def _cls_codes(self, columns: torch.Tensor) -> torch.Tensor:
        """(len(columns), D): zeros in the frequency half, the time half at each column."""
        half = self.table.shape[1] // 2
        time = sincos_1d(columns, half)  # (n, D/2)
        return torch.cat([torch.zeros_like(time), time], dim=1)

    def cls_code(self, num_patches: int) -> torch.Tensor:
        """(D,) code of the CLS token for an input of ``num_patches`` patches."""
        column = cls_column(self.cls_position, num_patches, self.freq_bins)
        if column + 1 < self.cls_table.shape[0]:
            return self.cls_table[column + 1]
        return self._cls_codes(torch.tensor([column]))[0].to(self.table.device)  # beyond the table's length


class Learned1dPositionalEncoding(nn.Module):
    def __init__(self, embed_dim: int, max_grid: tuple[int, int], cls_position: str = "head"):
        super().__init__()
        self.freq_bins, self.cls_position = max_grid[1], cls_position
        rows = max_grid[0] * max_grid[1] + (cls_position != "none")
        self.table = nn.Parameter(torch.zeros(rows, embed_dim))
        nn.init.trunc_normal_(self.table, std=0.02)

    def cls_row(self, num_patches: int) -> int | None:
        column = cls_column(self.cls_position, num_patches, self.freq_bins)
        return None if column is None else max(column, 0) * self.freq_bins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_patches = x.shape[1]
        rows = torch.arange(num_patches, device=x.device)
        cls_row = self.cls_row(num_patches)
        if cls_row is not None:
            rows = rows + (rows >= cls_row).long()  # patches at or after the CLS's slot move up one row
        # The last patch's row, from Python integers: no device-to-host read, no break in a compiled graph.
        last = num_patches - 1 + (cls_row is not None and num_patches - 1 >= cls_row)
        if num_patches and last >= self.table.shape[0]:
            raise ValueError(
                f"input has {num_patches // self.freq_bins} patch columns, more than the "
                f"{self.table.shape[0] // self.freq_bins} that target_length allows; raise target_length or crop "
                f"the input")
        return x + self.table[rows]

    def cls_code(self, num_patches: int) -> torch.Tensor:
        return self.table[self.cls_row(num_patches)]


POSITIONAL_ENCODINGS = {"sincos2d": SinCos2dPositionalEncoding, "learned1d": Learned1dPositionalEncoding}
