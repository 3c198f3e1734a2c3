import pytest
import torch

from hf_sdt.masks import block_element_counts
from hf_sdt.topology import block_abs_sums, drop_and_grow, global_block_counts, keep_top, prune_scores


def test_keep_top_is_a_subset_with_the_exact_count():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=generator) < 0.6
    scores = torch.rand(6, 5, generator=generator)
    kept = keep_top(mask, scores, 5)
    assert int(kept.sum()) == 5 and not (kept & ~mask).any()
    assert scores[kept].min() >= scores[mask & ~kept].max()


def test_drop_and_grow_keeps_the_count_and_never_regrows_what_it_dropped():
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(8, 8, generator=generator) < 0.3
    drop_scores, grow_scores = torch.rand(8, 8, generator=generator), torch.rand(8, 8, generator=generator)
    grow_scores[mask] = 10.0  # the dropped blocks look most promising: they still must not come back
    new, dropped, grown = drop_and_grow(mask, drop_scores, grow_scores, 4)
    assert int(new.sum()) == int(mask.sum())
    assert int(dropped.sum()) == int(grown.sum()) == 4
    assert not (dropped & grown).any() and not (grown & mask).any() and (dropped <= mask).all()
    assert drop_scores[dropped].max() <= drop_scores[mask & ~dropped].min()


def test_global_counts_compare_blocks_across_layers_and_keep_one_per_layer():
    strong, weak = torch.full((2, 2), 5.0), torch.full((2, 2), 0.1)
    masks = [torch.ones(2, 2, dtype=torch.bool)] * 2
    counts = [block_element_counts((4, 4), (8, 8))] * 2
    assert global_block_counts([strong, weak], masks, counts, 5) == [4, 1]
    assert global_block_counts([strong, weak], masks, counts, 2) == [1, 1]


def test_scores():
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    assert prune_scores("magnitude", weight, (1, 2)).flatten().tolist() == pytest.approx([5**0.5, 5.0])
    wanda = prune_scores("wanda", weight, (2, 1), input_sq_norm=torch.tensor([4.0, 0.0]))
    assert wanda.flatten().tolist() == pytest.approx([2 * 10**0.5, 0.0])
    assert block_abs_sums(weight * -1, (2, 2)).tolist() == [[10.0]]
