import pytest
import torch

from hf_sdt.blocks import block_ids_of, check_block_ids, element_positions, gather_blocks, mask_of, scatter_blocks_
from hf_sdt.masks import block_grid, expand_block_mask

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
