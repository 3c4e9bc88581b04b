import pytest
import torch

from model import inverse_block_mask, visible_indices


@pytest.mark.parametrize("grid, ratio", [((64, 8), 0.8), ((16, 8), 0.8), ((8, 8), 0.5), ((32, 8), 0.6)])
def test_mask_count_is_exact_in_every_row(grid, ratio):
    P = grid[0] * grid[1]
    mask = inverse_block_mask(64, grid, mask_ratio=ratio)
    assert mask.shape == (64, P) and mask.dtype == torch.bool
    assert (mask.sum(1) == P - int(P * (1 - ratio))).all()


def test_base_geometry_keeps_102_of_512():
    mask = inverse_block_mask(4, (64, 8))
    assert ((~mask).sum(1) == 102).all()


def test_kept_patches_form_blocks():
    # A kept cell's 4-neighbours are far more often kept than under uniform random keeping (20 %).
    T, F = 64, 8
    keep = ~inverse_block_mask(256, (T, F)).view(256, T, F)
    k = keep.float()
    neighbours = torch.zeros_like(k)
    neighbours[:, 1:] += k[:, :-1]
    neighbours[:, :-1] += k[:, 1:]
    neighbours[:, :, 1:] += k[:, :, :-1]
    neighbours[:, :, :-1] += k[:, :, 1:]
    share = (neighbours[keep] / 4).mean().item()
    assert share > 0.5, share


def test_seeded_masks_reproduce_and_differ_across_seeds():
    a = inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(1))
    b = inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(1))
    c = inverse_block_mask(8, (64, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rows_are_independent():
    mask = inverse_block_mask(16, (64, 8))
    assert len({tuple(r.tolist()) for r in mask}) == 16


def test_visible_indices_are_the_kept_cells_in_order():
    mask = inverse_block_mask(3, (16, 8))
    idx = visible_indices(mask)
    assert idx.shape == (3, int(128 * (1 - 0.8)))
    for row, ids in zip(mask, idx, strict=True):
        assert torch.equal(ids, (~row).nonzero().squeeze(1))


def test_bad_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        inverse_block_mask(1, (4, 8), mask_ratio=0.99)
