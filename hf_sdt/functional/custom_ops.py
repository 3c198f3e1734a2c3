"""The autograd Function and the `torch.library` custom ops of the products (with their fake implementations):
`hf_sdt::block_sparse_mm` and its backward for weights mode, `hf_sdt::compact_update_grad` for updates mode, so
that torch.compile keeps each product whole with its topology as a tensor input."""

from __future__ import annotations

import torch

from .cpu_ops import compact_grad_torch
from .dispatch import choose_ops
from .layouts import _layout_of, cached_compact_layout
from .triton_ops import compact_grad_triton


def _block_sparse_forward(x, weight, index, block_rows: int, block_cols: int, out_features: int, backend: str,
                          for_training: bool):  # fmt: skip
    layout = _layout_of(backend, weight, index, (block_rows, block_cols), out_features, x.shape[1])
    return choose_ops(backend, layout, x.shape[0], for_training, weight.element_size()).forward(x, weight, layout)


def _block_sparse_backward(grad_out, x, weight, index, block_rows: int, block_cols: int, out_features: int,
                           backend: str, need_x, need_w):  # fmt: skip
    layout = _layout_of(backend, weight, index, (block_rows, block_cols), out_features, x.shape[1])
    ops = choose_ops(backend, layout, x.shape[0], for_training=True)
    return ops.backward(grad_out.contiguous(), x, weight, layout, need_x, need_w)


class BlockSparseMatmul(torch.autograd.Function):
    """X W^T at the active blocks, in eager mode: x (T, in), and either a dense weight (out, in), zero outside the
    active blocks of the block mask `index`, or a compact store (n, block_rows, block_cols) at the block ids
    `index` -> (T, out); the weight's gradient is laid out like it (exactly zero outside the active blocks, or
    compact). (`block_sparse_mm` is the same product as a custom op for torch.compile; in eager mode a custom op's
    dispatch would cost about 45 us per call.)"""

    @staticmethod
    def forward(ctx, x, weight, index, block_rows: int, block_cols: int, out_features: int, backend: str,
                for_training: bool):  # fmt: skip
        inputs = (x, weight, index, block_rows, block_cols, out_features, backend, for_training)
        _save_for_block_sparse_backward(ctx, inputs, None)
        return _block_sparse_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _block_sparse_input_grads(ctx, grad_out, _block_sparse_backward)


def _save_for_block_sparse_backward(ctx, inputs, output) -> None:
    x, weight, index, block_rows, block_cols, out_features, backend, _ = inputs
    ctx.save_for_backward(x, weight, index)
    ctx.arguments = (block_rows, block_cols, out_features, backend)


def _block_sparse_input_grads(ctx, grad_out: torch.Tensor, backward) -> tuple:
    """The gradients of (x, weight, index, block_rows, block_cols, out_features, backend, for_training), by
    `backward` (the implementation, or its custom op under torch.compile)."""
    x, weight, index = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x, grad_w = backward(grad_out, x, weight, index, *ctx.arguments, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None, None, None, None, None, None


@torch.library.custom_op("hf_sdt::block_sparse_mm", mutates_args=())
def block_sparse_mm(
    x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, block_rows: int, block_cols: int, out_features: int,
    backend: str, for_training: bool,
) -> torch.Tensor:  # fmt: skip
    """`BlockSparseMatmul` as a custom op (with a fake implementation and autograd), so that torch.compile keeps it
    whole, with the mask or block ids as a tensor input; `backend` is "torch" or "triton"; `for_training` says
    whether a backward will follow (the few-token path is inference only)."""
    out = _block_sparse_forward(x, weight, index, block_rows, block_cols, out_features, backend, for_training)
    return out.contiguous()  # as the fake implementation says: the few-token product may return a column slice


@block_sparse_mm.register_fake
def _block_sparse_mm_fake(x, weight, index, block_rows, block_cols, out_features, backend, for_training):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("hf_sdt::block_sparse_mm_backward", mutates_args=())
def block_sparse_mm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, block_rows: int,
    block_cols: int, out_features: int, backend: str, need_x: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dX, dW) of `block_sparse_mm`, dW laid out like the weight; an unneeded one is empty."""
    grad_x, grad_w = _block_sparse_backward(
        grad_out, x, weight, index, block_rows, block_cols, out_features, backend, need_x, need_w
    )
    return (grad_x if need_x else x.new_empty(0)), (grad_w if need_w else weight.new_empty(0))


@block_sparse_mm_backward.register_fake
def _block_sparse_mm_backward_fake(grad_out, x, weight, index, block_rows, block_cols, out_features, backend, need_x,
                                   need_w):  # fmt: skip
    return x.new_empty(x.shape if need_x else (0,)), weight.new_empty(weight.shape if need_w else (0,))


@torch.compiler.disable
def _block_sparse_mm_grads(ctx, grad_out: torch.Tensor) -> tuple:
    """The autograd formula of `block_sparse_mm`. Disabled for dynamo: when `backward()` runs inside a compiled
    function whose graph was not compiled with its backward (backend "eager"), autograd calls this from inside the
    compiled region, and dynamo would compile it as a frame of its own, once per layer shape; AOTAutograd's
    tracing of the backward (every other backend) goes through it unchanged."""
    return _block_sparse_input_grads(ctx, grad_out, block_sparse_mm_backward)


block_sparse_mm.register_autograd(_block_sparse_mm_grads, setup_context=_save_for_block_sparse_backward)


def _compact_update_grad(grad_out, x, block_ids, block_rows: int, block_cols: int, backend: str) -> torch.Tensor:
    """dY^T X at the blocks `block_ids` of a (out, in) weight, compact (n, block_rows, block_cols), by `backend`."""
    block, shape = (block_rows, block_cols), (grad_out.shape[1], x.shape[1])
    layout = cached_compact_layout(backend, block_ids, block, shape)
    grad = compact_grad_triton if backend == "triton" else compact_grad_torch
    return grad(grad_out, x, layout)


@torch.library.custom_op("hf_sdt::compact_update_grad", mutates_args=())
def compact_update_grad(
    grad_out: torch.Tensor, x: torch.Tensor, block_ids: torch.Tensor, block_rows: int, block_cols: int, backend: str
) -> torch.Tensor:
    """The compact gradient of updates mode as a custom op, so that torch.compile keeps it whole, with the block
    ids as a tensor input (a topology change recompiles nothing); `backend` is "torch" or "triton"."""
    return _compact_update_grad(grad_out, x, block_ids, block_rows, block_cols, backend)


@compact_update_grad.register_fake
def _compact_update_grad_fake(grad_out, x, block_ids, block_rows, block_cols, backend):
    return grad_out.new_empty(block_ids.shape[0], block_rows, block_cols)
