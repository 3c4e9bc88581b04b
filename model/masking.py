"""Inverse block masking (EAT): choose the few patches a student *sees* as 5x5 blocks, mask the rest."""

from __future__ import annotations

import torch


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """How many of ``num_patches`` patches a student sees at ``mask_ratio``: the rest are masked."""
    return int(num_patches * (1 - mask_ratio))


def inverse_block_mask(
    batch_size: int,
    grid: tuple[int, int],
    *,
    mask_ratio: float = 0.8,
    block_size: int = 5,
    adjust: float = 0.07,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(batch_size, T * F) bool on a time-major (T, F) grid; True = masked, False = kept (visible).

    Exactly ``P - keep_count(P, mask_ratio)`` cells per row are masked. Kept cells are grown as
    ``block_size`` x ``block_size`` blocks (clamped at the grid edges) around random centres, then random cells
    are added or removed until the kept count is exact.
    """
    T, F = grid
    P = T * F
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} is not allowed: expected a number in (0, 1)")
    kept = keep_count(P, mask_ratio)
    if kept < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no patch of a {T}x{F} grid")
    device = torch.device("cpu") if device is None else torch.device(device)
    gen_device = generator.device if generator is not None else device

    num_centres = max(1, int(P * (1 - mask_ratio + adjust) / block_size**2))
    centres = torch.randint(0, P, (batch_size, num_centres), generator=generator, device=gen_device)
    ct, cf = centres // F, centres % F  # (B, n)
    r = torch.arange(block_size, device=gen_device) - block_size // 2  # e.g. -2..2
    # Every (centre, dt, df) cell, clamped into the grid: (B, n, bs, bs).
    t = (ct[:, :, None, None] + r[None, None, :, None]).clamp(0, T - 1)
    f = (cf[:, :, None, None] + r[None, None, None, :]).clamp(0, F - 1)
    cells = (t * F + f).flatten(1)  # (B, n * bs * bs)
    blocks = torch.zeros(batch_size, P, dtype=torch.bool, device=gen_device)
    blocks.scatter_(1, cells, True)

    # Exact count: rank block cells above all others (score >= 1 vs < 1), random order within each group,
    # keep the top ``kept``. Too many block cells -> a random subset; too few -> random extra cells.
    scores = torch.rand(batch_size, P, generator=generator, device=gen_device) + blocks.float()
    keep_idx = scores.topk(kept, dim=1).indices
    keep = torch.zeros_like(blocks).scatter_(1, keep_idx, True)
    return (~keep).to(device)


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """(B, P) mask with the same kept count per row -> (B, k) ascending indices of the kept patches."""
    B = mask.shape[0]
    return (~mask).nonzero(as_tuple=False)[:, 1].view(B, -1)


def split_indices(mask: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) mask with ``kept`` kept cells per row -> (visible (B, k), masked (B, P - k)), each ascending.

    The same indices as ``visible_indices`` and ``mask.nonzero``, but of shapes known before the mask is drawn:
    no device-to-host sync, and a compiled graph needs no dynamic shape. A stable sort puts the kept cells (0)
    before the masked ones (1), each group in index order.
    """
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices  # (B, P)
    return order[:, :kept], order[:, kept:]
