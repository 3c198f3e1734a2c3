"""Block-sparse linear products and backend dispatch.

Weights mode (`sdt_linear`): three backends compute the same thing, forward Y = X (W*M)^T + b, backward
dX = dY (W*M), dW = (dY^T X) * M:

- ``reference``: the masked dense matmul, used by tests as the oracle (no saving at all);
- ``torch``: the blocked PyTorch path below, whose work is proportional to the number of active blocks;
- ``triton``: the GPU kernels of ``hf_sdt.kernels``.

Updates mode (`sparse_update_linear`): the weight W = base + U is dense and frozen, the trainable updates U live in
a compact (n, block_rows, block_cols) store (see `hf_sdt.blocks`). Forward and dX are one dense GEMM each on W;
the gradient of U is dY^T X at its blocks only, written compact (blocked torch path or Triton kernel); the
``reference`` backend forms the dense update and lets autograd compute everything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import element_positions
from .config import BACKENDS
from .masks import block_grid, expand_block_mask, masked_fraction

# When the blocked path pays, as a cost model fitted to measurements on a 2-core CPU (fp32, fwd+bwd):
#   blocked time ~ density / efficiency x dense time + GEMM calls x overhead.
# `BLOCKED_GEMM_EFFICIENCY`, by the smaller block side: the blocked GEMMs' throughput relative to one dense GEMM. The
# blocked path stopped paying at densities of about 0.28 / 0.52 / 0.72 / 0.85 for sides 16 / 32 / 64 / 128 at
# 2048 tokens x 4096 -> 4096 (benchmarks/results/blocked_cpu*.md), the overhead term included. Sides below 16 were
# not measured and always run dense.
BLOCKED_GEMM_EFFICIENCY = ((128, 0.85), (64, 0.75), (32, 0.6), (16, 0.35))
# The fixed cost of one GEMM call of the blocked path, in dense multiply-adds (about 6-16 us each, fitted to layers
# of 256-1024 features with 256-4096 tokens).
BLOCKED_GEMM_OVERHEAD_MACS = 1e6


@dataclass(frozen=True)
class BlockedLayout:
    """Where the active blocks of one layer are, in the form the blocked PyTorch path consumes.

    `blocks` lists each active block as (first row, end row, first column, end column), edge blocks cropped;
    `col_slabs` holds, for each block-column with active blocks, (first column, end column, element indices of
    the rows of its active blocks). `density` is the fraction of weight elements inside active blocks.
    """

    blocks: tuple[tuple[int, int, int, int], ...]
    col_slabs: tuple[tuple[int, int, torch.Tensor], ...]
    shape: tuple[int, int]
    density: float


def build_blocked_layout(mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> BlockedLayout:
    """Index lists of the active blocks of a (out, in) matrix, rebuilt whenever the mask changes.

    Example:
        >>> layout = build_blocked_layout(torch.tensor([[True, False], [False, False]]), (2, 2), (4, 3))
        >>> layout.blocks, [(start, end, idx.tolist()) for start, end, idx in layout.col_slabs]
        (((0, 2, 0, 2),), [(0, 2, [0, 1])])
    """
    if tuple(mask.shape) != block_grid(shape, block):
        raise ValueError(
            f"Block mask of shape {tuple(mask.shape)} does not fit a {shape[0]} x {shape[1]} weight with "
            f"blocks of {block}: expected {block_grid(shape, block)}."
        )
    host_mask = mask.detach().to("cpu", torch.bool)
    blocks = tuple(
        (r * block[0], min((r + 1) * block[0], shape[0]), c * block[1], min((c + 1) * block[1], shape[1]))
        for r, c in host_mask.nonzero().tolist()
    )
    row_offsets = torch.arange(block[0])
    col_slabs = []
    for c, column in enumerate(host_mask.t()):
        active_rows = column.nonzero().flatten()
        if active_rows.numel():
            rows = (active_rows[:, None] * block[0] + row_offsets).flatten()
            rows = rows[rows < shape[0]].to(mask.device)
            col_slabs.append((c * block[1], min((c + 1) * block[1], shape[1]), rows))
    return BlockedLayout(blocks, tuple(col_slabs), shape, masked_fraction(host_mask, block, shape))


def blocked_path_pays(layout: BlockedLayout, tokens: int, block: tuple[int, int]) -> bool:
    """Whether the blocked PyTorch path beats one dense GEMM on the masked weight for this call (measured rule).

    Example:
        >>> layout = build_blocked_layout(torch.eye(64, dtype=torch.bool), (64, 64), (4096, 4096))
        >>> blocked_path_pays(layout, 2048, (64, 64)), blocked_path_pays(layout, 1, (64, 64))
        (True, False)
    """
    side = min(block)
    efficiency = next((value for min_side, value in BLOCKED_GEMM_EFFICIENCY if side >= min_side), 0.0)
    if layout.density >= efficiency:
        return False
    dense_macs = 3 * tokens * layout.shape[0] * layout.shape[1]  # forward, dX and dW
    gemm_calls = 2 * len(layout.blocks) + len(layout.col_slabs)
    return dense_macs * (1 - layout.density / efficiency) >= gemm_calls * BLOCKED_GEMM_OVERHEAD_MACS


class BlockedTorchOps:
    """The blocked PyTorch products on a `BlockedLayout`.

    Y and dX accumulate one GEMM per active block on strided views of the activations, with no gather or
    transpose; dW runs one tall GEMM per block-column on gathered rows of dY^T, because a GEMM with a
    block-sized output and a token-long reduction runs far below the CPU's peak.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout: BlockedLayout) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], layout.shape[0])  # (T, out)
        for r0, r1, c0, c1 in layout.blocks:
            out[:, r0:r1].addmm_(x[:, c0:c1], weight[r0:r1, c0:c1].t())
        return out

    @staticmethod
    def backward(grad_out, x, weight, layout: BlockedLayout, need_x: bool, need_w: bool):
        grad_x = grad_w = None
        if need_x:
            grad_x = grad_out.new_zeros(grad_out.shape[0], layout.shape[1])  # (T, in)
            for r0, r1, c0, c1 in layout.blocks:
                grad_x[:, c0:c1].addmm_(grad_out[:, r0:r1], weight[r0:r1, c0:c1])
        if need_w:
            grad_w = torch.zeros_like(weight)
            grad_out_t = grad_out.t().contiguous()  # (out, T): gathering its rows is a plain memcpy
            gathered = grad_out_t.new_empty(max((idx.numel() for *_, idx in layout.col_slabs), default=0), x.shape[0])
            for c0, c1, idx in layout.col_slabs:
                grad_out_rows = torch.index_select(grad_out_t, 0, idx, out=gathered[: idx.numel()])  # (m, T)
                grad_w[:, c0:c1].index_copy_(0, idx, grad_out_rows @ x[:, c0:c1])  # (m, T) @ (T, cols)
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
    x, weight, bias = _autocast_operands(x, weight, bias)
    if layout is None:
        layout = build_layout(backend, mask, block, tuple(weight.shape))
    if backend == "torch" and not blocked_path_pays(layout, x.numel() // x.shape[-1], block):
        return reference_linear(x, weight, bias, mask, block)
    ops = TritonOps if backend == "triton" else BlockedTorchOps
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in), row-major so that column slices are BLAS operands
    out = BlockSparseLinearFunction.apply(x2d, weight, ops, layout)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Custom autograd Functions bypass autocast; cast the operands as autocast casts F.linear's."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# -- updates mode -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactLayout:
    """Where the slots of a compact store lie in a (out, in) weight, for the gradient of updates mode.

    `block_rows` / `block_cols` give each slot's block (int32, on the store's device: the Triton kernel's input);
    `col_groups` (torch path only) holds, for each block-column with active blocks, (first column, end column,
    rows of a row-padded dY^T that its slots read, the slots), built on the host when the topology changes.
    """

    block_rows: torch.Tensor
    block_cols: torch.Tensor
    col_groups: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
    grid: tuple[int, int]
    block: tuple[int, int]
    shape: tuple[int, int]


def build_compact_layout(
    backend: str, block_ids: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]
) -> CompactLayout:
    """The index structure the compact gradient of `backend` ("torch" or "triton") needs for `block_ids` (n,).

    Example:
        >>> layout = build_compact_layout("torch", torch.tensor([3, 0, 2]), (2, 2), (4, 4))
        >>> [(c0, c1, slots.tolist()) for c0, c1, _, slots in layout.col_groups]
        [(0, 2, [1, 2]), (2, 4, [0])]
    """
    grid = block_grid(shape, block)
    rows, cols = block_ids // grid[1], block_ids % grid[1]
    groups = []
    if backend == "torch":
        host_rows, host_cols = rows.cpu(), cols.cpu()
        offsets = torch.arange(block[0])
        for column in host_cols.unique().tolist():
            slots = (host_cols == column).nonzero().flatten()
            padded_rows = (host_rows[slots, None] * block[0] + offsets).flatten()  # (m * block_rows,)
            c0, c1 = column * block[1], min((column + 1) * block[1], shape[1])
            groups.append((c0, c1, padded_rows.to(block_ids.device), slots.to(block_ids.device)))
    return CompactLayout(rows.to(torch.int32), cols.to(torch.int32), tuple(groups), grid, block, shape)


def compact_grad_torch(grad_out: torch.Tensor, x: torch.Tensor, layout: CompactLayout) -> torch.Tensor:
    """dY^T X at the slots' blocks, (n, block_rows, block_cols): one tall GEMM per block-column on gathered rows
    of a row-padded dY^T (a GEMM per block, with its token-long reduction and block-sized output, runs far below
    a CPU's peak). grad_out (T, out), x (T, in).

    Example:
        >>> layout = build_compact_layout("torch", torch.tensor([1]), (2, 2), (2, 3))
        >>> compact_grad_torch(torch.ones(4, 2), torch.ones(4, 3), layout)
        tensor([[[4., 0.],
                 [4., 0.]]])
    """
    n_slots, block = layout.block_rows.numel(), layout.block
    grad = grad_out.new_zeros(n_slots, *block)  # (n, rows, cols)
    padded_t = grad_out.new_zeros(layout.grid[0] * block[0], grad_out.shape[0])  # (R * rows, T)
    padded_t[: layout.shape[0]] = grad_out.t()
    for c0, c1, padded_rows, slots in layout.col_groups:
        products = padded_t.index_select(0, padded_rows) @ x[:, c0:c1]  # (m * rows, T) @ (T, w)
        grad[:, :, : c1 - c0].index_copy_(0, slots, products.view(slots.numel(), block[0], c1 - c0))
    return grad


def compact_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, layout: CompactLayout) -> torch.Tensor:
    """The same product by the Triton kernel of `hf_sdt.kernels`, with no host synchronisation."""
    return _kernels().block_sparse_grad_compact(
        grad_out, x, layout.block_rows, layout.block_cols, layout.grid, layout.block
    )


class SparseUpdateLinearFunction(torch.autograd.Function):
    """Y = X W^T for the frozen effective weight W = base + U (materialized by the layer); backward gives dX and
    the gradient of the compact updates U, dY^T X at their blocks only: no dense weight gradient is formed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, updates: torch.Tensor, grad_fn, layout) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.grad_fn, ctx.layout, ctx.updates_dtype = grad_fn, layout, updates.dtype
        return x @ weight.t()  # (T, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, _, need_updates = ctx.needs_input_grad[:3]
        grad_x = grad_out @ weight if need_x else None
        grad_updates = ctx.grad_fn(grad_out, x, ctx.layout).to(ctx.updates_dtype) if need_updates else None
        return grad_x, None, grad_updates, None, None


def reference_update_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    updates: torch.Tensor,
    block_ids: torch.Tensor,
    block: tuple[int, int],
) -> torch.Tensor:
    """The dense oracle of updates mode: F.linear with the effective weight `weight` (= base + updates, already
    materialized) plus `updates - updates.detach()` scattered densely, which adds exact zeros but routes the dense
    weight gradient to the updates (their padding gets none).

    Example:
        >>> x, weight, updates = torch.ones(1, 3), torch.ones(2, 3), torch.zeros(1, 2, 2, requires_grad=True)
        >>> reference_update_linear(x, weight, None, updates, torch.tensor([1]), (2, 2)).sum().backward()
        >>> updates.grad
        tensor([[[1., 0.],
                 [1., 0.]]])
    """
    rows, cols, inside = element_positions(block_ids, block, tuple(weight.shape))
    zeros = (updates - updates.detach()).to(weight.dtype)
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
    layout: CompactLayout | None = None,
) -> torch.Tensor:
    """`F.linear` with a frozen effective weight (out, in) = base + updates, whose compact `updates`
    (n, block_rows, block_cols) at the blocks `block_ids` (n,) get their gradient at those blocks only.

    `layout` is the cached `build_compact_layout(...)` of the resolved backend; it is built here when omitted.

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
        return reference_update_linear(x, weight, bias, updates, block_ids, block)
    x, weight, bias = _autocast_operands(x, weight, bias)
    if layout is None:
        layout = build_compact_layout(backend, block_ids, block, tuple(weight.shape))
    grad_fn = compact_grad_triton if backend == "triton" else compact_grad_torch
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in), row-major so that column slices are BLAS operands
    out = SparseUpdateLinearFunction.apply(x2d, weight, updates, grad_fn, layout)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])
