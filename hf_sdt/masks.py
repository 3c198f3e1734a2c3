"""Block masks: pure tensor functions, no modules and no training state.

A block mask is a bool tensor of shape (ceil(out / block_rows), ceil(in / block_cols)) over a weight in the
(out, in) layout; edge blocks may be partial when a dimension is not a multiple of the block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Number of block-rows and block-columns that cover a (out, in) matrix.

    Example:
        >>> block_grid((100, 72), (32, 32))
        (4, 3)
    """
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def active_block_count(density: float, n_blocks: int) -> int:
    """Exact number of active blocks a layer of `n_blocks` blocks keeps at `density`: `max(1, round(d * n))`.

    Example:
        >>> active_block_count(0.25, 10)
        2
    """
    return min(n_blocks, max(1, round(density * n_blocks)))


def block_norms(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Frobenius norm of every block of a (out, in) matrix, in fp32, shape (n_block_rows, n_block_cols).

    Example:
        >>> block_norms(torch.ones(3, 4), (2, 2))
        tensor([[2.0000, 2.0000],
                [1.4142, 1.4142]])
    """
    rows, cols = block_grid(tuple(weight.shape), block)
    padded = F.pad(
        weight.detach().float(), (0, cols * block[1] - weight.shape[1], 0, rows * block[0] - weight.shape[0])
    )
    squares = padded.square().view(rows, block[0], cols, block[1]).sum(dim=(1, 3))
    return squares.sqrt()


def topk_block_mask(scores: torch.Tensor, n_active: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool mask of the `n_active` highest-scoring blocks; ties are broken at random with `generator`.

    Example:
        >>> topk_block_mask(torch.tensor([[3.0, 1.0], [2.0, 0.0]]), 2)
        tensor([[ True, False],
                [ True, False]])
    """
    flat = scores.detach().flatten().float()
    if not 1 <= n_active <= flat.numel():
        raise ValueError(f"n_active must be in [1, {flat.numel()}], got {n_active}.")
    shuffle = torch.randperm(flat.numel(), generator=generator, device="cpu").to(flat.device)
    # A stable sort of the shuffled scores keeps tied blocks in random order.
    order = torch.sort(flat[shuffle], descending=True, stable=True).indices[:n_active]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[shuffle[order]] = True
    return mask.view(scores.shape)


def expand_block_mask(mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Element mask of a (out, in) matrix from its block mask (edge blocks cropped).

    Example:
        >>> expand_block_mask(torch.tensor([[True, False]]), (2, 2), (2, 3))
        tensor([[ True,  True, False],
                [ True,  True, False]])
    """
    expanded = mask.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return expanded[: shape[0], : shape[1]]


def block_element_counts(block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Number of matrix elements in each block (fewer at partial edges), shape of the block mask, int64.

    Example:
        >>> block_element_counts((2, 2), (3, 3))
        tensor([[4, 2],
                [2, 1]])
    """
    rows, cols = block_grid(shape, block)
    row_sizes = torch.full((rows,), block[0], dtype=torch.int64)
    col_sizes = torch.full((cols,), block[1], dtype=torch.int64)
    row_sizes[-1] = shape[0] - (rows - 1) * block[0]
    col_sizes[-1] = shape[1] - (cols - 1) * block[1]
    return row_sizes[:, None] * col_sizes[None, :]


def masked_fraction(mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> float:
    """Fraction of the elements of a (out, in) matrix that lie in active blocks (partial edge blocks count less).

    Example:
        >>> masked_fraction(torch.tensor([[True, False]]), (2, 2), (2, 3))
        0.6666666666666666
    """
    return block_element_counts(block, shape)[mask.cpu()].sum().item() / (shape[0] * shape[1])
