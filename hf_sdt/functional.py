"""Block-sparse linear products and backend dispatch.

Three backends compute the same thing, forward Y = X (W*M)^T + b, backward dX = dY (W*M), dW = (dY^T X) * M:

- ``reference``: the masked dense matmul, used by tests as the oracle (no saving at all);
- ``torch``: the blocked PyTorch path below, whose work is proportional to the number of active blocks;
- ``triton``: the GPU kernels of ``hf_sdt.kernels``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import BACKENDS
from .masks import block_grid, expand_block_mask

# When the blocked path pays, as a cost model: blocked time ~ density / crossing x dense time + GEMMs x overhead.
# `BLOCKED_CROSSING_DENSITY`: by the smaller block side, the density at which the blocked GEMMs alone take as long as
# the dense one. Measured crossings at 2048 tokens x 4096 -> 4096 on a 2-core CPU were about 0.33 / 0.5 / 0.65 /
# 0.75 for sides 16 / 32 / 64 / 128 (benchmarks/results/blocked_cpu.md); these values keep a margin below them.
# Sides below 16 were not measured and always run dense.
BLOCKED_CROSSING_DENSITY = ((128, 0.7), (64, 0.6), (32, 0.45), (16, 0.3))
# The fixed cost of one blocked GEMM (gathers, dispatch), in dense multiply-adds: fitted to layers of 256-1024
# features with 256-4096 tokens, where smaller layers lost to dense.
BLOCKED_GEMM_OVERHEAD_MACS = 8e6


@dataclass(frozen=True)
class BlockedLayout:
    """Where the active blocks of one layer are, in the form the blocked PyTorch path consumes.

    `row_slabs` holds, for each block-row with active blocks, (first row, end row, element indices of the
    active columns); `col_slabs` is the transposed view, per block-column, with element row indices.
    `density` is the fraction of weight elements inside active blocks.
    """

    row_slabs: tuple[tuple[int, int, torch.Tensor], ...]
    col_slabs: tuple[tuple[int, int, torch.Tensor], ...]
    shape: tuple[int, int]
    density: float


def build_blocked_layout(mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> BlockedLayout:
    """Index lists of the active blocks of a (out, in) matrix, rebuilt whenever the mask changes.

    Example:
        >>> layout = build_blocked_layout(torch.tensor([[True, False], [False, False]]), (2, 2), (4, 3))
        >>> [(start, end, idx.tolist()) for start, end, idx in layout.row_slabs]
        [(0, 2, [0, 1])]
    """
    if tuple(mask.shape) != block_grid(shape, block):
        raise ValueError(
            f"Block mask of shape {tuple(mask.shape)} does not fit a {shape[0]} x {shape[1]} weight with "
            f"blocks of {block}: expected {block_grid(shape, block)}."
        )
    host_mask = mask.detach().to("cpu", torch.bool)
    device = mask.device

    def slabs(grid: torch.Tensor, step: int, cross_step: int, length: int, cross_length: int):
        offsets = torch.arange(cross_step)
        result = []
        for index, line in enumerate(grid):
            active = line.nonzero().flatten()
            if active.numel() == 0:
                continue
            elements = (active[:, None] * cross_step + offsets).flatten()
            elements = elements[elements < cross_length].to(device)
            result.append((index * step, min((index + 1) * step, length), elements))
        return tuple(result)

    row_slabs = slabs(host_mask, block[0], block[1], shape[0], shape[1])
    col_slabs = slabs(host_mask.t(), block[1], block[0], shape[1], shape[0])
    active_elements = sum((end - start) * idx.numel() for start, end, idx in row_slabs)
    return BlockedLayout(row_slabs, col_slabs, shape, active_elements / (shape[0] * shape[1]))


def blocked_path_pays(layout: BlockedLayout, tokens: int, block: tuple[int, int]) -> bool:
    """Whether the blocked PyTorch path beats one dense GEMM on the masked weight for this call (measured rule).

    Example:
        >>> layout = build_blocked_layout(torch.eye(64, dtype=torch.bool), (64, 64), (4096, 4096))
        >>> blocked_path_pays(layout, 2048, (64, 64)), blocked_path_pays(layout, 8, (64, 64))
        (True, False)
    """
    side = min(block)
    crossing = next((density for min_side, density in BLOCKED_CROSSING_DENSITY if side >= min_side), 0.0)
    if layout.density >= crossing:
        return False
    dense_macs = 3 * tokens * layout.shape[0] * layout.shape[1]  # forward, dX and dW
    gemms = len(layout.row_slabs) + len(layout.col_slabs)
    return dense_macs * (1 - layout.density / crossing) >= gemms * BLOCKED_GEMM_OVERHEAD_MACS


def _slab_matmul(dense_t: torch.Tensor, slab_weights: list[torch.Tensor], slabs: tuple, out_features: int):
    """Dense (T, K), given transposed as `dense_t` (K, T), times a block-sparse (out_features, K) matrix, transposed.

    The sparse matrix is given as slabs: rows start:end hold `slab_weights[i]` (end - start, n) at the columns
    `idx` (n,). Gathering rows of the transposed activations is a plain memcpy, and each slab is one tall GEMM.
    """
    out = _slab_output(dense_t, dense_t.shape[1], out_features, slabs)  # (T, out_features)
    gathered = _gather_buffer(dense_t, slabs)
    for (start, end, idx), weight in zip(slabs, slab_weights, strict=True):
        rows = torch.index_select(dense_t, 0, idx, out=gathered[: idx.numel()])  # (n, T)
        torch.mm(rows.t(), weight.t(), out=out[:, start:end])
    return out


def _slab_output(like: torch.Tensor, tokens: int, features: int, slabs: tuple) -> torch.Tensor:
    """A (tokens, features) result that the slabs fill; zeroed only where some block-line is empty."""
    out = like.new_empty(tokens, features)
    if sum(end - start for start, end, _ in slabs) < features:
        out.zero_()
    return out


def _gather_buffer(dense_t: torch.Tensor, slabs: tuple) -> torch.Tensor:
    """One buffer for every gather of a pass: a fresh large allocation per slab costs page faults, not copies."""
    return dense_t.new_empty(max((idx.numel() for _, _, idx in slabs), default=0), dense_t.shape[1])


class BlockedTorchOps:
    """The blocked PyTorch products on a `BlockedLayout`."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout: BlockedLayout) -> torch.Tensor:
        row_weights = [weight[start:end].index_select(1, idx) for start, end, idx in layout.row_slabs]
        return _slab_matmul(x.t().contiguous(), row_weights, layout.row_slabs, layout.shape[0])  # (T, out)

    @staticmethod
    def backward(grad_out, x, weight, layout: BlockedLayout, need_x: bool, need_w: bool):
        grad_out_t = grad_out.t().contiguous()  # (out, T)
        grad_x = _slab_output(x, *x.shape, layout.col_slabs) if need_x else None  # (T, in)
        grad_w = torch.zeros_like(weight) if need_w else None
        # One pass over block-columns serves both gradients: the gathered rows of dY^T feed dX and dW alike.
        gathered = _gather_buffer(grad_out_t, layout.col_slabs)
        for start, end, idx in layout.col_slabs:
            grad_out_rows = torch.index_select(grad_out_t, 0, idx, out=gathered[: idx.numel()])  # (m, T)
            if need_x:
                torch.mm(grad_out_rows.t(), weight[idx, start:end], out=grad_x[:, start:end])
            if need_w:
                grad_w[:, start:end].index_copy_(0, idx, grad_out_rows @ x[:, start:end])  # (m, T) @ (T, cols)
        return grad_x, grad_w


@dataclass(frozen=True)
class TritonLayout:
    """Device-side block indices for the Triton kernels, and the block they tile with."""

    meta: Any  # hf_sdt.kernels.block_sparse.BlockMetadata
    block: tuple[int, int]


class TritonOps:
    """The Triton kernels of `hf_sdt.kernels` on a `TritonLayout`."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout: TritonLayout) -> torch.Tensor:
        return _kernels().block_sparse_forward(x, weight, layout.meta, layout.block)

    @staticmethod
    def backward(grad_out, x, weight, layout: TritonLayout, need_x: bool, need_w: bool):
        kernels = _kernels()
        grad_x = kernels.block_sparse_grad_input(grad_out, weight, layout.meta, layout.block) if need_x else None
        grad_w = kernels.block_sparse_grad_weight(grad_out, x, weight, layout.meta, layout.block) if need_w else None
        return grad_x, grad_w


class BlockSparseLinearFunction(torch.autograd.Function):
    """Y = X W^T reading only the active blocks of W (out, in), with `ops` (blocked torch or Triton) doing the
    products; dW is exactly zero outside the active blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, ops, layout) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.ops, ctx.layout = ops, layout
        return ops.forward(x, weight, layout)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = ctx.ops.backward(grad_out, x, weight, ctx.layout, need_x, need_w)
        return grad_x, grad_w, None, None


def reference_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """The masked dense product X (W*M)^T + b: every backend must match it.

    Example:
        >>> x, w = torch.ones(1, 4), torch.ones(2, 4)
        >>> reference_linear(x, w, None, torch.tensor([[True, False]]), (2, 2))
        tensor([[2., 2.]])
    """
    element_mask = expand_block_mask(mask, block, tuple(weight.shape))
    return F.linear(x, weight * element_mask.to(weight.dtype), bias)


def _kernels():
    from .kernels import block_sparse  # imports triton: only when the Triton backend runs

    return block_sparse


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: triton imports, and the device is CUDA (or, for tests, the
    CPU under `TRITON_INTERPRET=1`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device, block: tuple[int, int] = (64, 64)) -> str:
    """The concrete backend for `backend` on `device`: `"auto"` means Triton on CUDA (when triton imports and the
    block suits the kernels), the blocked torch path otherwise.

    Example:
        >>> resolve_backend("auto", torch.device("cpu"))
        'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown SDT backend {backend!r}; use one of {BACKENDS}.")
    if backend == "auto":
        if device.type == "cuda" and triton_available(device) and _kernels().supports_block(block):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(
                "backend='triton' needs the `triton` package and a CUDA device; "
                f"this tensor is on {device}. Use backend='auto' or backend='torch'."
            )
        if not _kernels().supports_block(block):
            raise ValueError(
                f"backend='triton' needs block sides that are powers of two >= 16, got {block}; "
                "change SDTConfig.block_size or use backend='torch'."
            )
    return backend


def build_layout(
    backend: str, mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int], n_active: int | None = None
):
    """The index structure `backend` ("torch" or "triton") needs for `mask`; `n_active` (the number of active
    blocks, when the caller knows it) spares the Triton path a host synchronisation."""
    if backend == "triton":
        if n_active is None:
            n_active = int(mask.sum())
        return TritonLayout(_kernels().build_block_metadata(mask, n_active), block)
    return build_blocked_layout(mask, block, shape)


def sdt_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    block: tuple[int, int],
    backend: str = "auto",
    layout=None,
) -> torch.Tensor:
    """Block-sparse `F.linear`: x (..., in), weight (out, in), bool block mask -> (..., out).

    `layout` is the cached `build_layout(...)` of the resolved backend; it is built here when omitted.

    Example:
        >>> x, w = torch.randn(5, 8), torch.randn(4, 8)
        >>> mask = torch.tensor([[True, False], [False, True]])
        >>> y = sdt_linear(x, w, None, mask, (2, 4), backend="torch")
        >>> torch.allclose(y, reference_linear(x, w, None, mask, (2, 4)), atol=1e-6)
        True
    """
    backend = resolve_backend(backend, x.device, block)
    if backend == "reference":
        return reference_linear(x, weight, bias, mask, block)
    if layout is None:
        layout = build_layout(backend, mask, block, tuple(weight.shape))
    if backend == "torch" and not blocked_path_pays(layout, x.numel() // x.shape[-1], block):
        return reference_linear(x, weight, bias, mask, block)
    ops = TritonOps if backend == "triton" else BlockedTorchOps
    out = BlockSparseLinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, ops, layout)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])
