import pytest
import torch

from hf_sdt.masks import (
    active_block_count,
    block_grid,
    block_norms,
    expand_block_mask,
    topk_block_mask,
)


def test_block_norms_match_a_loop_on_partial_blocks():
    weight = torch.randn(100, 72)
    norms = block_norms(weight, (32, 32))
    assert norms.shape == block_grid((100, 72), (32, 32)) == (4, 3)
    for r in range(4):
        for c in range(3):
            expected = weight[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32].norm()
            torch.testing.assert_close(norms[r, c], expected)


@pytest.mark.parametrize("density,n_blocks,expected", [(0.25, 10, 2), (0.01, 10, 1), (1.0, 7, 7), (0.5, 3, 2)])
def test_active_block_count(density, n_blocks, expected):
    assert active_block_count(density, n_blocks) == expected


def test_topk_keeps_exactly_the_largest():
    scores = torch.tensor([[0.1, 5.0, 3.0], [4.0, 0.2, 0.3]])
    mask = topk_block_mask(scores, 3)
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_topk_breaks_ties_at_random_but_reproducibly():
    scores = torch.zeros(8, 8)
    first = topk_block_mask(scores, 10, torch.Generator().manual_seed(1))
    again = topk_block_mask(scores, 10, torch.Generator().manual_seed(1))
    other = topk_block_mask(scores, 10, torch.Generator().manual_seed(2))
    assert first.sum() == 10 and torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="n_active"):
        topk_block_mask(scores, 0)


def test_expand_crops_partial_blocks():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    element_mask = expand_block_mask(mask, (32, 32), (40, 70))
    assert element_mask.shape == (40, 70)
    assert element_mask.sum() == 32 * 32 + 32 * 6 + 8 * 32 + 8 * 6
    assert element_mask[:32, :32].all() and not element_mask[:32, 32:64].any()
