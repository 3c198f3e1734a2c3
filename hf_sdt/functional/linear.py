"""Weights mode's block-sparse `F.linear`: `sdt_linear` (dense storage with a block mask), `compact_linear` (a
compact store with its block ids) and their masked dense oracles."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import element_positions
from ..masks import expand_block_mask
from .cpu_ops import compact_few_tokens_traced
from .custom_ops import BlockSparseMatmul, _block_sparse_forward, block_sparse_mm
from .dispatch import few_token_inference, resolve_backend, seen_by_dispatch_mode


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    block: tuple[int, int],
    on_dense_grad=None,
) -> torch.Tensor:
    """The masked dense product X (W*M)^T + b: every backend must match it.

    With `on_dense_grad`, the dense weight gradient dY^T X (every block, active or not) is handed to it during
    backward, while the weight itself still gets the masked gradient: the steps whose topology update grows blocks
    by gradient (RigL) run this.

    Example:
        >>> x, w = torch.ones(1, 4), torch.ones(2, 4)
        >>> reference_linear(x, w, None, torch.tensor([[True, False]]), (2, 2))
        tensor([[2., 2.]])
        >>> x, w, grads = torch.randn(3, 4), torch.randn(2, 4, requires_grad=True), []
        >>> y = reference_linear(x, w, None, torch.tensor([[True, False]]), (2, 2), on_dense_grad=grads.append)
        >>> y.sum().backward()
        >>> bool(grads[0][:, 2:].abs().sum() > 0), bool(w.grad[:, 2:].abs().sum() == 0)
        (True, True)
    """
    element_mask = expand_block_mask(mask, block, tuple(weight.shape))
    masked_weight = weight * element_mask.to(weight.dtype)
    if on_dense_grad is not None and masked_weight.requires_grad:
        masked_weight.register_hook(on_dense_grad)
    return F.linear(x, masked_weight, bias)


def sdt_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    block: tuple[int, int],
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse `F.linear`: x (..., in), weight (out, in), bool block mask -> (..., out).

    `weight` must be zero outside the active blocks (as `SDTLinear` keeps it): the blocked and Triton paths never
    read those entries, the dense and few-token paths rely on them being zero, and `reference_linear` masks them.
    The layout of `mask` is cached until the mask changes (see `cached_layout`).

    Example:
        >>> mask = torch.tensor([[True, False], [False, True]])
        >>> x, w = torch.randn(5, 8), torch.randn(4, 8) * expand_block_mask(mask, (2, 4), (4, 8))
        >>> y = sdt_linear(x, w, None, mask, (2, 4), backend="torch")
        >>> torch.allclose(y, reference_linear(x, w, None, mask, (2, 4)), atol=1e-6)
        True
    """
    backend = resolve_backend(backend, x.device, block)
    if backend == "reference":
        return reference_linear(x, weight, bias, mask, block)
    return _block_sparse_linear(x, weight, bias, mask, block, weight.shape[0], backend)


def compact_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    bias: torch.Tensor | None,
    block_ids: torch.Tensor,
    shape: tuple[int, int],
    backend: str = "auto",
) -> torch.Tensor:
    """`F.linear` with a weight stored as its active blocks only: x (..., in), `blocks` (n, block_rows, block_cols)
    at the row-major block ids `block_ids` (n,) of an (out, in) = `shape` weight that is zero elsewhere ->
    (..., out). The gradient of `blocks` is compact (and zero in the padding of partial edge blocks).

    Example:
        >>> blocks, ids = torch.randn(2, 2, 4, requires_grad=True), torch.tensor([0, 3])
        >>> y = compact_linear(torch.randn(5, 8), blocks, None, ids, (4, 8), backend="torch")
        >>> y.sum().backward()
        >>> y.shape, blocks.grad.shape
        (torch.Size([5, 4]), torch.Size([2, 2, 4]))
    """
    block = tuple(blocks.shape[1:])
    backend = resolve_backend(backend, x.device, block)
    if backend == "reference":
        return F.linear(x, dense_of_blocks(blocks, block_ids, tuple(shape)), bias)
    return _block_sparse_linear(x, blocks, bias, block_ids, block, shape[0], backend)


def dense_of_blocks(blocks: torch.Tensor, block_ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The (out, in) = `shape` matrix holding `blocks` (n, rows, cols) at `block_ids` and zero elsewhere, through
    autograd (the dense oracle of `compact_linear`, and what scores and checkpoints read).

    Example:
        >>> dense_of_blocks(torch.ones(1, 2, 2), torch.tensor([1]), (2, 3))
        tensor([[0., 0., 1.],
                [0., 0., 1.]])
    """
    rows, cols, inside = element_positions(block_ids, tuple(blocks.shape[1:]), tuple(shape))
    return blocks.new_zeros(shape).index_put((rows[inside], cols[inside]), blocks[inside])


def _block_sparse_linear(x, weight, bias, index, block, out_features: int, backend: str) -> torch.Tensor:
    x, weight, bias = _autocast_operands(x, weight, bias)
    for_training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in), row-major so that column slices are BLAS operands
    compiling = torch.compiler.is_compiling()
    if compiling and weight.dim() == 3 and backend == "torch" and few_token_inference(x2d.shape[0], for_training):
        out = compact_few_tokens_traced(x2d, weight, index, out_features)  # (T, out)
    elif compiling or seen_by_dispatch_mode():
        out = block_sparse_mm(x2d, weight, index, block[0], block[1], out_features, backend, for_training)  # (T, out)
    else:  # eager inference skips the autograd bookkeeping, about 25 us of a 100 us decoding call
        product = BlockSparseMatmul.apply if for_training else _block_sparse_forward
        out = product(x2d, weight, index, block[0], block[1], out_features, backend, for_training)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], out_features)


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Custom autograd Functions bypass autocast; cast the operands as autocast casts F.linear's."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
