"""The compact block store: which blocks of a (out, in) matrix are active, one per slot of a (n, rows, cols) tensor.

Pure tensor functions, no modules and no training state. A slot holds one block; slots are not ordered by block
position, so that a topology change can give the slot of a dropped block to a grown one without moving the others
(parameter shapes, optimizer states and DDP buckets stay valid). Edge blocks of a matrix whose sides are not
multiples of the block are partial: their slots are padded, and the padding is never read back into the matrix.
"""

from __future__ import annotations

import torch

from .masks import block_grid


def block_ids_of(mask: torch.Tensor) -> torch.Tensor:
    """Row-major ids of the active blocks of a bool block mask, ascending, int64.

    Example:
        >>> block_ids_of(torch.tensor([[False, True], [True, False]]))
        tensor([1, 2])
    """
    return mask.flatten().nonzero().flatten()


def mask_of(block_ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The bool block mask of `grid` whose active blocks are `block_ids`.

    Example:
        >>> mask_of(torch.tensor([2, 1]), (2, 2))
        tensor([[False,  True],
                [ True, False]])
    """
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool, device=block_ids.device)
    mask[block_ids] = True
    return mask.view(grid)


def check_block_ids(block_ids: torch.Tensor, grid: tuple[int, int]) -> None:
    """Raise a ValueError unless `block_ids` is a 1-D integer tensor of distinct ids inside `grid`."""
    if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.dtype == torch.bool:
        raise ValueError(f"Block ids must be a 1-D integer tensor, got {block_ids.dtype} of shape {block_ids.shape}.")
    if block_ids.numel() and not (0 <= int(block_ids.min()) and int(block_ids.max()) < grid[0] * grid[1]):
        raise ValueError(f"Block ids must lie in [0, {grid[0] * grid[1]}) for a {grid[0]} x {grid[1]} block grid.")
    if block_ids.unique().numel() != block_ids.numel():
        raise ValueError("Block ids must be distinct: one slot per block.")


def element_positions(block_ids: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]):
    """(rows, cols, inside), each (n, block_rows, block_cols): every slot element's row and column in a (out, in)
    matrix, and whether it lies inside the matrix (the padding of partial edge blocks does not).

    Example:
        >>> rows, cols, inside = element_positions(torch.tensor([1]), (2, 2), (2, 3))
        >>> cols[inside].tolist(), inside.sum().item()
        ([2, 2], 2)
    """
    n_cols = block_grid(shape, block)[1]
    rows = (block_ids // n_cols * block[0])[:, None] + torch.arange(block[0], device=block_ids.device)  # (n, rows)
    cols = (block_ids % n_cols * block[1])[:, None] + torch.arange(block[1], device=block_ids.device)  # (n, cols)
    inside = (rows < shape[0])[:, :, None] & (cols < shape[1])[:, None, :]
    return rows[:, :, None].expand_as(inside), cols[:, None, :].expand_as(inside), inside


def _window_positions(block_ids, block, shape, offset, window_shape):
    """For a window of a (out, in) matrix of `shape` (a shard: `window_shape` at `offset`): the window rows and
    columns of the slot elements it holds, and which slot elements those are, (n, rows, cols) bool."""
    rows, cols, inside = element_positions(block_ids, block, shape)
    rows, cols = rows - offset[0], cols - offset[1]
    held = inside & (rows >= 0) & (rows < window_shape[0]) & (cols >= 0) & (cols < window_shape[1])
    return rows[held], cols[held], held


def _is_window(matrix: torch.Tensor, shape, offset) -> bool:
    return any(offset) or (shape is not None and tuple(shape) != tuple(matrix.shape))


def _blocked_view(matrix: torch.Tensor, block_ids: torch.Tensor, block: tuple[int, int]):
    """When the block tiles the matrix exactly: a (block-rows, rows, block-cols, cols) view of it (a strided view
    too) and the slots' block coordinates, so that `view[r, :, c, :]` indexes whole blocks with n-long indices
    instead of n * rows * cols element indices. None for a matrix with partial edge blocks."""
    if matrix.shape[0] % block[0] or matrix.shape[1] % block[1]:
        return None
    grid = block_grid(tuple(matrix.shape), block)
    return matrix.view(grid[0], block[0], grid[1], block[1]), block_ids // grid[1], block_ids % grid[1]


def gather_blocks(
    matrix: torch.Tensor, block_ids: torch.Tensor, block: tuple[int, int], shape=None, offset=(0, 0)
) -> torch.Tensor:
    """The blocks `block_ids` of a (out, in) matrix (any strides) as a (n, rows, cols) tensor; padding is zero.

    With `shape` and `offset`, `matrix` is a window (an FSDP2 shard) of a `shape` matrix at `offset`: the values it
    holds, zero elsewhere (summed over the shards, they give the blocks).

    Example:
        >>> gather_blocks(torch.arange(6.0).view(2, 3), torch.tensor([1]), (2, 2))
        tensor([[[2., 0.],
                 [5., 0.]]])
    """
    if _is_window(matrix, shape, offset):
        rows, cols, held = _window_positions(block_ids, block, tuple(shape), offset, tuple(matrix.shape))
        values = matrix.new_zeros(block_ids.numel(), *block)  # (n, rows, cols)
        values[held] = matrix[rows, cols]
        return values
    blocked = _blocked_view(matrix, block_ids, block)
    if blocked is not None:
        view, block_rows, block_cols = blocked
        return view[block_rows, :, block_cols, :]  # (n, rows, cols)
    rows, cols, inside = element_positions(block_ids, block, tuple(matrix.shape))
    values = matrix[rows.clamp(max=matrix.shape[0] - 1), cols.clamp(max=matrix.shape[1] - 1)]  # (n, rows, cols)
    return values.masked_fill(~inside, 0)


@torch.no_grad()
def scatter_blocks_(
    matrix: torch.Tensor, values: torch.Tensor, block_ids: torch.Tensor, block: tuple[int, int], shape=None,
    offset=(0, 0),
):  # fmt: skip
    """Write the (n, rows, cols) `values` into the blocks `block_ids` of a (out, in) matrix in place (a strided view
    writes through to its storage); the padding of edge slots is not written. With `shape` and `offset`, `matrix`
    is a window (an FSDP2 shard) of a `shape` matrix at `offset`, which takes the values that fall inside it.

    No host synchronisation: padded positions are clamped onto the block's last row or column and write that
    position's own value again, so duplicate indices always carry equal values.

    Example:
        >>> matrix = torch.zeros(2, 3)
        >>> scatter_blocks_(matrix, torch.ones(1, 2, 2), torch.tensor([1]), (2, 2))
        >>> matrix
        tensor([[0., 0., 1.],
                [0., 0., 1.]])
    """
    if _is_window(matrix, shape, offset):
        rows, cols, held = _window_positions(block_ids, block, tuple(shape), offset, tuple(matrix.shape))
        matrix[rows, cols] = values[held].to(matrix.dtype)
        return
    blocked = _blocked_view(matrix, block_ids, block)
    if blocked is not None:
        view, block_rows, block_cols = blocked
        view[block_rows, :, block_cols, :] = values.to(matrix.dtype)
        return
    rows, cols, _ = element_positions(block_ids, block, tuple(matrix.shape))
    rows, cols = rows.clamp(max=matrix.shape[0] - 1), cols.clamp(max=matrix.shape[1] - 1)
    local_rows, local_cols = rows - rows[:, :1, :], cols - cols[:, :, :1]  # (n, rows, cols), clamped too
    slots = torch.arange(values.shape[0], device=values.device)[:, None, None]
    matrix[rows, cols] = values[slots, local_rows, local_cols].to(matrix.dtype)


@torch.no_grad()
def zero_inactive_blocks_(
    matrix: torch.Tensor, block_mask: torch.Tensor, block: tuple[int, int], offset=(0, 0)
) -> torch.Tensor:
    """Set every element of a (out, in) matrix (any strides) outside the active blocks of `block_mask` to exactly
    zero, in place, and return it. The mask is broadcast over block views of the whole blocks and of the partial
    edge strips: no element-sized mask is formed. A window (an FSDP2 shard) of the matrix at `offset` takes the part
    of the mask it covers; only a window that starts inside a block needs an element mask.

    Example:
        >>> zero_inactive_blocks_(torch.ones(3, 3), torch.tensor([[True, False], [False, True]]), (2, 2))
        tensor([[1., 1., 0.],
                [1., 1., 0.],
                [0., 0., 1.]])
    """
    if offset[0] % block[0] or offset[1] % block[1]:
        rows = (offset[0] + torch.arange(matrix.shape[0], device=block_mask.device)) // block[0]
        cols = (offset[1] + torch.arange(matrix.shape[1], device=block_mask.device)) // block[1]
        return matrix.masked_fill_(~block_mask[rows[:, None], cols[None, :]], 0)
    first_row, first_col = offset[0] // block[0], offset[1] // block[1]
    grid = block_grid(tuple(matrix.shape), block)  # of the window, which starts on a block boundary
    inactive = ~block_mask[first_row : first_row + grid[0], first_col : first_col + grid[1]]
    whole_rows, whole_cols = matrix.shape[0] // block[0], matrix.shape[1] // block[1]
    top, left = whole_rows * block[0], whole_cols * block[1]
    extra_rows, extra_cols = matrix.shape[0] - top, matrix.shape[1] - left
    matrix[:top, :left].view(whole_rows, block[0], whole_cols, block[1]).masked_fill_(
        inactive[:whole_rows, None, :whole_cols, None], 0
    )
    if extra_rows:  # the bottom strip of partial blocks
        matrix[top:, :left].view(extra_rows, whole_cols, block[1]).masked_fill_(inactive[-1, :whole_cols, None], 0)
    if extra_cols:  # the right strip
        matrix[:top, left:].view(whole_rows, block[0], extra_cols).masked_fill_(inactive[:whole_rows, None, -1:], 0)
    if extra_rows and extra_cols:
        matrix[top:, left:].masked_fill_(inactive[-1, -1], 0)
    return matrix
