"""Updates mode's product: `F.linear` with a frozen effective weight whose compact trainable updates get their
gradient at their blocks only, and its dense oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import element_positions
from .custom_ops import _compact_update_grad, compact_update_grad
from .dispatch import resolve_backend, seen_by_dispatch_mode
from .linear import _autocast_operands


class SparseUpdateLinearFunction(torch.autograd.Function):
    """Y = X W^T for the frozen effective weight W = base + scale * U (materialized by the layer); backward gives dX
    and the gradient of the compact updates U, scale * dY^T X at their blocks only: no dense weight gradient is
    formed.

    torch.compile traces it whole: the two GEMMs as plain ops, the compact gradient as its custom op (called
    directly in eager mode, where a custom op's dispatch costs tens of microseconds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, updates: torch.Tensor, block_ids: torch.Tensor,
                backend: str, scale: float) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight, block_ids)
        ctx.backend, ctx.updates_dtype, ctx.block, ctx.scale = backend, updates.dtype, tuple(updates.shape[1:]), scale
        return x @ weight.t()  # (T, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, block_ids = ctx.saved_tensors
        need_x, _, need_updates = ctx.needs_input_grad[:3]
        grad_x = grad_out @ weight if need_x else None
        grad_updates = None
        if need_updates:
            as_op = torch.compiler.is_compiling() or seen_by_dispatch_mode()
            grad = compact_update_grad if as_op else _compact_update_grad
            grad_updates = grad(grad_out.contiguous(), x, block_ids, *ctx.block, ctx.backend).to(ctx.updates_dtype)
            if ctx.scale != 1.0:
                grad_updates = grad_updates * ctx.scale
        return grad_x, None, grad_updates, None, None, None


def reference_update_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    updates: torch.Tensor,
    block_ids: torch.Tensor,
    block: tuple[int, int],
    scale: float = 1.0,
) -> torch.Tensor:
    """The dense oracle of updates mode: F.linear with the effective weight `weight` (= base + scale * updates,
    already materialized) plus `scale * (updates - updates.detach())` scattered densely, which adds exact zeros but
    routes the dense weight gradient (times `scale`) to the updates (their padding gets none).

    Example:
        >>> x, weight, updates = torch.ones(1, 3), torch.ones(2, 3), torch.zeros(1, 2, 2, requires_grad=True)
        >>> reference_update_linear(x, weight, None, updates, torch.tensor([1]), (2, 2)).sum().backward()
        >>> updates.grad
        tensor([[[1., 0.],
                 [1., 0.]]])
    """
    rows, cols, inside = element_positions(block_ids, block, tuple(weight.shape))
    zeros = (scale * (updates - updates.detach())).to(weight.dtype)
    dense = weight.new_zeros(weight.shape).index_put((rows[inside], cols[inside]), zeros[inside])
    return F.linear(x, weight + dense, bias)


def sparse_update_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    updates: torch.Tensor,
    block_ids: torch.Tensor,
    block: tuple[int, int],
    backend: str = "auto",
    scale: float = 1.0,
) -> torch.Tensor:
    """`F.linear` with a frozen effective weight (out, in) = base + scale * updates, whose compact `updates`
    (n, block_rows, block_cols) at the blocks `block_ids` (n,) get their gradient, scale * dY^T X, at those blocks
    only. The index structure of the gradient is cached until the block ids change (see `cached_compact_layout`).

    Example:
        >>> x, weight = torch.randn(5, 8), torch.randn(4, 8)
        >>> updates, ids = torch.zeros(2, 2, 4, requires_grad=True), torch.tensor([0, 3])
        >>> y = sparse_update_linear(x, weight, None, updates, ids, (2, 4), backend="torch")
        >>> y.sum().backward()
        >>> updates.grad.shape
        torch.Size([2, 2, 4])
    """
    backend = resolve_backend(backend, x.device, block)
    if backend == "reference":
        return reference_update_linear(x, weight, bias, updates, block_ids, block, scale)
    x, weight, bias = _autocast_operands(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in), row-major so that column slices are BLAS operands
    out = SparseUpdateLinearFunction.apply(x2d, weight, updates, block_ids, backend, scale)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])
