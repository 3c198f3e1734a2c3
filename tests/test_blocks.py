import pytest
import torch

from hf_sdt.blocks import (
    block_ids_of,
    check_block_ids,
    element_positions,
    gather_blocks,
    mask_of,
    scatter_blocks_,
    zero_inactive_blocks_,
)
from hf_sdt.masks import block_grid, expand_block_mask
from hf_sdt.topology import block_abs_sums

# (out, in), block: partial edge blocks on both sides, rectangular blocks, an exact fit.
SHAPES = [((100, 72), (32, 32)), ((50, 70), (16, 32)), ((64, 64), (16, 16))]


def random_ids(shape, block, count, seed=0):
    rows, cols = block_grid(shape, block)
    return torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:count]


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d-view"])
def test_gather_then_scatter_round_trips_and_leaves_the_rest(shape, block, transposed):
    storage = torch.randn(shape[::-1] if transposed else shape)
    matrix = storage.t() if transposed else storage  # (out, in), a strided view for Conv1D
    ids = random_ids(shape, block, 5)
    blocks = gather_blocks(matrix, ids, block)
    rows, cols, inside = element_positions(ids, block, shape)
    assert blocks.shape == (5, *block)
    assert torch.equal(blocks[inside], matrix[rows[inside], cols[inside]])
    assert (blocks[~inside] == 0).all(), "the padding of edge blocks is zero"
    before = matrix.clone()
    new_values = torch.randn(5, *block)
    scatter_blocks_(matrix, new_values, ids, block)
    written = expand_block_mask(mask_of(ids, block_grid(shape, block)), block, shape)
    assert torch.equal(matrix[~written], before[~written]), "nothing outside the blocks is written"
    assert torch.equal(gather_blocks(matrix, ids, block)[inside], new_values[inside])


def windows(shape, cut: int, along: int):
    """Two windows of a `shape` matrix split at `cut` along dimension `along` (FSDP2's Shard(0) of a Linear weight
    splits rows, of a Conv1D weight columns of the (out, in) view), as (slices, offset)."""
    if along == 0:
        return [((slice(0, cut), slice(None)), (0, 0)), ((slice(cut, None), slice(None)), (cut, 0))]
    return [((slice(None), slice(0, cut)), (0, 0)), ((slice(None), slice(cut, None)), (0, cut))]


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("cut", ["on-a-block-edge", "inside-a-block"])
@pytest.mark.parametrize("along", [0, 1], ids=["rows", "columns"])
def test_block_edits_on_windows_equal_edits_on_the_whole_matrix(shape, block, cut, along):
    """Each process of an FSDP2 run edits only its shard, at its offset: together they must do what one edit of the
    whole matrix does, wherever the shards are cut."""
    cut = block[along] if cut == "on-a-block-edge" else block[along] // 2 + 1
    generator = torch.Generator().manual_seed(0)
    matrix, ids = torch.randn(shape, generator=generator), random_ids(shape, block, 6)
    mask, values = mask_of(ids, block_grid(shape, block)), torch.randn(6, *block, generator=generator)
    whole_zeroed, whole_written = zero_inactive_blocks_(matrix.clone(), mask, block), matrix.clone()
    scatter_blocks_(whole_written, values, ids, block)
    zeroed, written, gathered, sums = matrix.clone(), matrix.clone(), torch.zeros(6, *block), torch.zeros(mask.shape)
    for where, offset in windows(shape, cut, along):
        zero_inactive_blocks_(zeroed[where], mask, block, offset)
        scatter_blocks_(written[where], values, ids, block, shape, offset)
        gathered += gather_blocks(matrix[where], ids, block, shape, offset)
        sums += block_abs_sums(matrix[where], block, shape, offset)
    assert torch.equal(zeroed, whole_zeroed)
    assert torch.equal(written, whole_written)
    assert torch.equal(gathered, gather_blocks(matrix, ids, block))
    torch.testing.assert_close(sums, block_abs_sums(matrix, block))


def test_ids_and_masks_convert_both_ways():
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.3
    assert torch.equal(mask_of(block_ids_of(mask), (5, 7)), mask)


@pytest.mark.parametrize(
    "ids,message",
    [(torch.tensor([0, 0]), "distinct"), (torch.tensor([12]), r"\[0, 12\)"), (torch.tensor([[0]]), "1-D")],
)
def test_bad_block_ids_are_refused(ids, message):
    with pytest.raises(ValueError, match=message):
        check_block_ids(ids, (3, 4))
