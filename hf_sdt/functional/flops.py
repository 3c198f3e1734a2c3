"""What each product really multiplies, in FLOPs (two per multiply-add, as `torch.utils.flop_counter` counts):
the formulas `FlopCounterMode` applies to hf_sdt's custom ops, and what the compute receipt counts for SDT layers.

Each formula asks the dispatch which product a call takes (blocked, dense, few-token, Triton) and counts that
product's work, so that a figure never claims a saving the path did not make (a dense fallback counts dense)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from ..blocks import mask_of
from ..masks import block_grid
from . import custom_ops  # noqa: F401  (defines the ops the formulas are registered for)
from .cpu_ops import compact_grad_flops
from .dispatch import choose_ops
from .layouts import _layout_of, build_blocked_layout, build_compact_layout, cached_compact_layout
from .triton_ops import triton_product_flops


def block_sparse_flops(
    backend: str, weight: torch.Tensor, index: torch.Tensor, block: tuple[int, int], shape: tuple[int, int],
    tokens: int, for_training: bool, need_x: bool = False, need_w: bool = False,
) -> tuple[int, int, int]:  # fmt: skip
    """FLOPs (forward, dX, dW) of a weights-mode product of `backend` ("torch" or "triton") on `tokens` tokens, for
    an (out, in) = `shape` weight, dense with its block mask or a compact store with its block ids as `index`.

    Example:
        >>> mask = torch.tensor([[True, False], [False, False]])  # one 64 x 64 block of a 128 x 128 weight
        >>> block_sparse_flops("torch", torch.zeros(128, 128), mask, (64, 64), (128, 128), 2048, True, True, True)
        (16777216, 16777216, 16777216)
        >>> block_sparse_flops("torch", torch.zeros(128, 128), mask, (64, 64), (128, 128), 8, True, True, True)
        (262144, 262144, 262144)

    (On 8 tokens the blocked path does not pay on a CPU: the call runs, and counts, one dense GEMM.)
    """
    layout = _layout_of(backend, weight, index, tuple(block), *shape)
    ops = choose_ops(backend, layout, tokens, for_training, weight.element_size())
    return ops.flops(layout, tokens, need_x, need_w)


def compact_update_grad_flops(
    backend: str, block_ids: torch.Tensor, block: tuple[int, int], shape: tuple[int, int], tokens: int
) -> int:
    """FLOPs of updates mode's compact gradient dY^T X at the blocks `block_ids` of an (out, in) = `shape` weight.

    Example:
        >>> compact_update_grad_flops("torch", torch.tensor([0]), (2, 2), (4, 4), 10)
        80
    """
    if backend == "triton":
        return triton_product_flops(tokens, block_ids.numel(), block)
    return compact_grad_flops(cached_compact_layout(backend, block_ids, tuple(block), tuple(shape)), tokens)


def block_sparse_flops_of_count(
    backend: str,
    shape: tuple[int, int],
    block: tuple[int, int],
    count: int,
    tokens: int,
    compact: bool,
    need_x: bool = True,
    backward: bool = True,
) -> int:
    """FLOPs of one training forward (and backward: dX when `need_x`, dW) of a weights-mode layer of `shape` with
    `count` active blocks (the first ones, row-major), dense or `compact` storage, as `backend` would run it: what
    a step at that density costs, before any mask of it exists.

    Example:
        >>> block_sparse_flops_of_count("torch", (128, 128), (64, 64), 1, 2048, compact=False)
        50331648
    """
    if backend == "triton":
        return triton_product_flops(tokens, count, block) * (1 + (1 + need_x) * backward)
    grid = block_grid(tuple(shape), tuple(block))
    ids = torch.arange(min(count, grid[0] * grid[1]))
    if compact:
        layout = build_compact_layout("torch", ids, tuple(block), tuple(shape))
    else:
        layout = build_blocked_layout(mask_of(ids, grid), tuple(block), tuple(shape))
    ops = choose_ops("torch", layout, tokens, backward)
    return sum(ops.flops(layout, tokens, need_x and backward, backward))


# The custom ops' formulas for FlopCounterMode, which sees each op as one call (get_raw: the index tensors matter).


@register_flop_formula(torch.ops.hf_sdt.block_sparse_mm, get_raw=True)
def _block_sparse_mm_flops(
    x, weight, index, block_rows, block_cols, out_features, backend, for_training, out_val=None
):
    shape = (out_features, x.shape[1])
    return block_sparse_flops(backend, weight, index, (block_rows, block_cols), shape, x.shape[0], for_training)[0]


@register_flop_formula(torch.ops.hf_sdt.block_sparse_mm_backward, get_raw=True)
def _block_sparse_mm_backward_flops(grad_out, x, weight, index, block_rows, block_cols, out_features, backend, need_x,
                                    need_w, out_val=None):  # fmt: skip
    shape, block = (out_features, x.shape[1]), (block_rows, block_cols)
    _, grad_x, grad_w = block_sparse_flops(backend, weight, index, block, shape, x.shape[0], True, need_x, need_w)
    return grad_x + grad_w


@register_flop_formula(torch.ops.hf_sdt.compact_update_grad, get_raw=True)
def _compact_update_grad_flops(grad_out, x, block_ids, block_rows, block_cols, backend, out_val=None):
    shape = (grad_out.shape[1], x.shape[1])
    return compact_update_grad_flops(backend, block_ids, (block_rows, block_cols), shape, x.shape[0])
