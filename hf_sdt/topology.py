"""Block scores and mask changes (prune, drop and grow): pure tensor functions, no modules, no training state."""

from __future__ import annotations

import torch

from .blocks import block_ids_of
from .masks import block_grid, block_norms, topk_block_mask


def prune_scores(
    criterion: str,
    weight: torch.Tensor,
    block: tuple[int, int],
    taylor: torch.Tensor | None = None,
    input_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-block usefulness of a (out, in) weight, higher is better, shape of the block mask, fp32.

    `"magnitude"`: Frobenius norm; `"taylor"`: the accumulated block sums of |w * g| (`taylor`); `"wanda"`: Frobenius
    norm of |w_ij| * ||x_j|| with `input_sq_norm` the accumulated squared norms of the input features.

    Example:
        >>> prune_scores("magnitude", torch.ones(2, 4), (2, 2))
        tensor([[2., 2.]])
    """
    if criterion == "magnitude":
        return block_norms(weight, block)
    if criterion == "taylor":
        if taylor is None:
            raise ValueError("The 'taylor' criterion needs accumulated |w * g| block sums.")
        return taylor.float()
    if criterion == "wanda":
        if input_sq_norm is None:
            raise ValueError("The 'wanda' criterion needs accumulated input-feature norms.")
        return block_norms(weight.detach().float().abs() * input_sq_norm.float().sqrt()[None, :], block)
    raise ValueError(f"Unknown prune criterion {criterion!r}.")


def block_abs_sums(values: torch.Tensor, block: tuple[int, int], shape=None, offset=(0, 0)) -> torch.Tensor:
    """Sum of |values| over each block of a (out, in) matrix, fp32 (the Taylor score of w * g). With `shape` and
    `offset`, `values` is a window (an FSDP2 shard) of a `shape` matrix at `offset`: the sums over what it holds, on
    the whole block grid (summed over the shards, they give the whole matrix's sums).

    Example:
        >>> block_abs_sums(-torch.ones(2, 4), (2, 2))
        tensor([[4., 4.]])
        >>> block_abs_sums(torch.ones(1, 3), (2, 2), shape=(2, 4), offset=(1, 1))
        tensor([[1., 2.]])
    """
    if shape is not None and (any(offset) or tuple(shape) != tuple(values.shape)):
        grid = block_grid(tuple(shape), block)
        rows = (offset[0] + torch.arange(values.shape[0], device=values.device)) // block[0]
        cols = (offset[1] + torch.arange(values.shape[1], device=values.device)) // block[1]
        sums = torch.zeros(grid[0] * grid[1], device=values.device)
        ids = (rows[:, None] * grid[1] + cols[None, :]).flatten()
        return sums.index_add_(0, ids, values.detach().float().abs().flatten()).view(grid)
    rows, cols = block_grid(tuple(values.shape), block)
    padded = torch.nn.functional.pad(
        values.detach().float().abs(), (0, cols * block[1] - values.shape[1], 0, rows * block[0] - values.shape[0])
    )
    return padded.view(rows, block[0], cols, block[1]).sum(dim=(1, 3))


def keep_top(mask: torch.Tensor, scores: torch.Tensor, count: int, generator: torch.Generator | None = None):
    """The `count` highest-scoring blocks among the active ones of `mask` (a subset of it).

    Example:
        >>> keep_top(torch.tensor([[True, True, False]]), torch.tensor([[1.0, 2.0, 9.0]]), 1)
        tensor([[False,  True, False]])
    """
    if count > int(mask.sum()):
        raise ValueError(f"Cannot keep {count} blocks of a mask with {int(mask.sum())} active ones.")
    candidates = torch.where(mask, scores.float(), torch.tensor(float("-inf"), device=scores.device))
    return topk_block_mask(candidates, count, generator) & mask


def drop_and_grow(
    mask: torch.Tensor,
    drop_scores: torch.Tensor,
    grow_scores: torch.Tensor,
    count: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the `count` lowest-scoring active blocks and grow as many inactive ones with the highest `grow_scores`;
    blocks just dropped are not grown back. Returns (new mask, dropped, grown); the active count never changes.

    Example:
        >>> mask, drop_scores = torch.tensor([[True, True, False, False]]), torch.tensor([[1.0, 5, 0, 0]])
        >>> new, dropped, grown = drop_and_grow(mask, drop_scores, torch.tensor([[0.0, 0, 3, 4]]), 1)
        >>> new.tolist(), dropped.tolist(), grown.tolist()
        ([[False, True, False, True]], [[True, False, False, False]], [[False, False, False, True]])
    """
    candidates = ~mask
    count = min(count, int(candidates.sum()), int(mask.sum()))
    if count == 0:
        empty = torch.zeros_like(mask)
        return mask.clone(), empty, empty
    kept = keep_top(mask, drop_scores, int(mask.sum()) - count, generator) if count < int(mask.sum()) else None
    dropped = mask & ~kept if kept is not None else mask.clone()
    grown = keep_top(candidates, grow_scores, count, generator)
    return (mask & ~dropped) | grown, dropped, grown


def reassign_slots(
    block_ids: torch.Tensor, dropped: torch.Tensor, grown: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots of a compact store whose blocks were `dropped` (bool block mask), in slot order, and the `grown`
    block ids (ascending) they take: the other slots keep their blocks, values and optimizer state.

    Example:
        >>> dropped = torch.tensor([[False, False], [True, False]])
        >>> grown = torch.tensor([[False, True], [False, False]])
        >>> reassign_slots(torch.tensor([0, 2]), dropped, grown)
        (tensor([1]), tensor([1]))
    """
    slots = dropped.flatten()[block_ids].nonzero().flatten()
    new_ids = block_ids_of(grown)
    if slots.numel() != new_ids.numel():
        raise ValueError(f"{slots.numel()} slots were freed but {new_ids.numel()} blocks grown; they must match.")
    return slots, new_ids


def global_block_counts(
    scores: list[torch.Tensor], masks: list[torch.Tensor], element_counts: list[torch.Tensor], total: int
) -> list[int]:
    """Per-layer counts that keep the `total` best active blocks over all layers, at least one per layer.

    Scores are compared per element (a block's score over the square root of its element count, so Frobenius
    norms of blocks of any size compare as root-mean-square values).

    Example:
        >>> scores = [torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0, 0.5]])]
        >>> masks = [torch.ones(1, 2, dtype=torch.bool)] * 2
        >>> global_block_counts(scores, masks, [torch.ones(1, 2)] * 2, 3)
        [2, 1]
    """
    normalized = [
        torch.where(mask, score.float() / count.float().sqrt(), torch.tensor(float("-inf")))
        for score, mask, count in zip(scores, masks, element_counts, strict=True)
    ]
    best = [int(values.flatten().argmax()) for values in normalized]  # every layer keeps its best block
    flat = torch.cat([values.flatten() for values in normalized])
    offsets = [0]
    for values in normalized:
        offsets.append(offsets[-1] + values.numel())
    for layer, index in enumerate(best):
        flat[offsets[layer] + index] = float("inf")
    chosen = torch.topk(flat, total).indices
    return [int(((chosen >= offsets[i]) & (chosen < offsets[i + 1])).sum()) for i in range(len(normalized))]
