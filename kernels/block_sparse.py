"""Triton kernels for a linear layer whose (out, in) weight is used only at active blocks, stored either dense
(out, in) or compact, as a (n_active, block_rows, block_cols) store of its active blocks, one slot per block.

Three products, each touching only the active blocks and accumulating in fp32:

- forward  Y  = X W^T: one program per (token tile, block-row), walking that row's active blocks (block-CSR); each
  entry's tile is read at its offset (its place in the dense weight, or its slot of the store) with in-tile strides,
  so one kernel serves both storages;
- backward dX = dY W = dY (W^T)^T: the same kernel on the transposed weight (a strided view), walking each
  block-column's active blocks through the transposed index (CSC): no atomics and no copies of values;
- backward dW = dY^T X at the active blocks only (SDD): one program per (active block, token split); with few
  active blocks the token reduction is split and fp32 partials are summed by a second kernel. It writes either
  into a weight-shaped tensor or into a compact (n_active, block_rows, block_cols) store, one slot per block (the
  trainable updates of updates mode).

The block of the mask is the tile of the kernels, so block rows and columns must be powers of two >= 16.
Launchers take and return tensors; `build_block_metadata` rebuilds the indices on the device without any
host synchronisation, given the number of active blocks (which the caller knows).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning benchmarks each config on first use of a (shape, block, dtype, density) key; HF_SDT_AUTOTUNE=0 keeps
# the default config (as does the CPU interpreter, which cannot time kernels).
AUTOTUNE = os.environ.get("HF_SDT_AUTOTUNE", "1") == "1" and not INTERPRETING
DEFAULT_CONFIG = triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3)
TUNED_CONFIGS = [
    triton.Config({"BLOCK_T": block_t}, num_warps=warps, num_stages=stages)
    for block_t in (64, 128)
    for warps in (4, 8)
    for stages in (2, 3, 4)
]
CONFIGS = TUNED_CONFIGS if AUTOTUNE else [DEFAULT_CONFIG]
TUNING_KEY = ["OUT", "IN", "T_BUCKET", "DENSITY_BUCKET", "BLOCK_N", "BLOCK_K"]


class BlockMetadata(NamedTuple):
    """Where the active blocks are: block-CSR (`row_offsets`, `block_rows`, `block_cols` in row-major order) and
    its transpose (`col_offsets`, `csc_rows`: for each block-column, the block-rows of its active blocks)."""

    row_offsets: torch.Tensor  # (n_block_rows + 1,) int32
    block_rows: torch.Tensor  # (n_active,) int32
    block_cols: torch.Tensor  # (n_active,) int32
    col_offsets: torch.Tensor  # (n_block_cols + 1,) int32
    csc_rows: torch.Tensor  # (n_active,) int32
    csr_slots: torch.Tensor | None = None  # (n_active,) int64: the store slot of each block-CSR entry (compact)
    csc_slots: torch.Tensor | None = None  # (n_active,) int64: ... of each CSC entry


def build_compact_metadata(block_ids: torch.Tensor, grid: tuple[int, int]) -> BlockMetadata:
    """`build_block_metadata` of the blocks `block_ids` (n,) (each a slot of a compact store, in slot order) on a
    `grid` (block-rows, block-columns), with the slot of each block-CSR and CSC entry. No host synchronisation.

    Example:
        >>> meta = build_compact_metadata(torch.tensor([3, 0, 2]), (2, 2))
        >>> meta.block_cols.tolist(), meta.csr_slots.tolist(), meta.csc_rows.tolist(), meta.csc_slots.tolist()
        ([0, 0, 1], [1, 2, 0], [0, 1, 1], [1, 2, 0])
    """
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool, device=block_ids.device)
    mask[block_ids] = True
    rows, cols = block_ids // grid[1], block_ids % grid[1]
    csr_slots = torch.sort(block_ids).indices  # row-major order is the block-CSR order
    csc_slots = torch.sort(cols * grid[0] + rows).indices
    return build_block_metadata(mask.view(grid), block_ids.numel())._replace(csr_slots=csr_slots, csc_slots=csc_slots)


def build_block_metadata(mask: torch.Tensor, n_active: int) -> BlockMetadata:
    """Block-CSR and CSC indices of a bool block mask with exactly `n_active` active blocks, built on its device.

    Only sorts, sums and cumulative sums of fixed-size tensors: no `.item()`, no data-dependent shapes.

    Example:
        >>> meta = build_block_metadata(torch.tensor([[True, False], [True, True]]), 3)
        >>> meta.row_offsets.tolist(), meta.block_cols.tolist(), meta.col_offsets.tolist(), meta.csc_rows.tolist()
        ([0, 1, 3], [0, 0, 1], [0, 2, 3], [0, 1, 1])
    """
    n_rows, n_cols = mask.shape
    # A stable sort puts the active block ids first, in row-major order.
    active_ids = torch.sort((~mask).flatten().to(torch.int8), stable=True).indices[:n_active]
    block_rows = active_ids // n_cols
    block_cols = active_ids % n_cols
    csc_rows = block_rows[torch.sort(block_cols * n_rows + block_rows).indices]

    def offsets(counts: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)

    return BlockMetadata(
        row_offsets=offsets(mask.sum(1)),
        block_rows=block_rows.to(torch.int32),
        block_cols=block_cols.to(torch.int32),
        col_offsets=offsets(mask.sum(0)),
        csc_rows=csc_rows.to(torch.int32),
    )


@triton.autotune(configs=CONFIGS, key=TUNING_KEY)
@triton.jit
def _dense_sparse_t_kernel(
    x_ptr, w_ptr, y_ptr, row_offsets_ptr, block_cols_ptr, tile_offsets_ptr,
    T, OUT, IN, T_BUCKET, DENSITY_BUCKET,
    stride_xt, stride_xk, stride_wn, stride_wk, stride_yt, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Y (T, OUT) = X (T, IN) @ W^T for W (OUT, IN) in block-CSR: one program per (token tile, block-row). Entry i's
    tile starts at `w_ptr + tile_offsets[i]` and its element (n, k) lies `n * stride_wn + k * stride_wk` further."""
    pid_t = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = (block_row * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    start = tl.load(row_offsets_ptr + block_row)
    end = tl.load(row_offsets_ptr + block_row + 1)
    tile = tl.arange(0, BLOCK_N)[:, None].to(tl.int64) * stride_wn + tl.arange(0, BLOCK_K)[None, :] * stride_wk
    for i in range(start, end):
        offs_k = tl.load(block_cols_ptr + i).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=(offs_t[:, None] < T) & (offs_k[None, :] < IN),
            other=0.0,
        )  # (BLOCK_T, BLOCK_K)
        w = tl.load(
            w_ptr + tl.load(tile_offsets_ptr + i) + tile,
            mask=(offs_n[:, None] < OUT) & (offs_k[None, :] < IN),
            other=0.0,
        )  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    tl.store(
        y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(offs_t[:, None] < T) & (offs_n[None, :] < OUT),
    )


@triton.autotune(configs=CONFIGS, key=TUNING_KEY)
@triton.jit
def _grad_weight_kernel(
    dy_ptr, x_ptr, dw_ptr, partial_ptr, block_rows_ptr, block_cols_ptr,
    T, OUT, IN, T_BUCKET, DENSITY_BUCKET, N_ACTIVE, TOKENS_PER_SPLIT,
    stride_dyt, stride_dyn, stride_xt, stride_xk, stride_dwn, stride_dwk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, COMPACT: tl.constexpr,
):  # fmt: skip
    """dW at the active block of program 0, over the token split of program 1 (see `_grad_weight_launch`)."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = (tl.load(block_rows_ptr + block).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (tl.load(block_cols_ptr + block).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    t_start = split * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, T)
    for t in range(t_start, t_end, BLOCK_T):
        offs_t = (t + tl.arange(0, BLOCK_T)).to(tl.int64)
        dy = tl.load(
            dy_ptr + offs_t[:, None] * stride_dyt + offs_n[None, :] * stride_dyn,
            mask=(offs_t[:, None] < t_end) & (offs_n[None, :] < OUT),
            other=0.0,
        )  # (BLOCK_T, BLOCK_N)
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=(offs_t[:, None] < t_end) & (offs_k[None, :] < IN),
            other=0.0,
        )  # (BLOCK_T, BLOCK_K)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
    if SPLIT == 1:
        tl.store(
            _grad_weight_address(dw_ptr, block, offs_n, offs_k, stride_dwn, stride_dwk, BLOCK_N, BLOCK_K, COMPACT),
            acc.to(dw_ptr.dtype.element_ty),
            mask=(offs_n[:, None] < OUT) & (offs_k[None, :] < IN),
        )
    else:
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        tl.store(partial_ptr + (split * N_ACTIVE + block).to(tl.int64) * BLOCK_N * BLOCK_K + tile, acc)


@triton.jit
def _grad_weight_address(dw_ptr, block, offs_n, offs_k, stride_dwn, stride_dwk, BLOCK_N, BLOCK_K, COMPACT):
    """Where the tile of active block `block` (global rows `offs_n`, columns `offs_k`) goes: its place in the
    weight, or its slot of the compact (n_active, BLOCK_N, BLOCK_K) store."""
    if COMPACT:
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        return dw_ptr + block.to(tl.int64) * BLOCK_N * BLOCK_K + tile
    return dw_ptr + offs_n[:, None] * stride_dwn + offs_k[None, :] * stride_dwk


@triton.jit
def _sum_partials_kernel(
    partial_ptr, dw_ptr, block_rows_ptr, block_cols_ptr,
    OUT, IN, N_ACTIVE, stride_dwn, stride_dwk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, COMPACT: tl.constexpr,
):  # fmt: skip
    block = tl.program_id(0)
    offs_n = tl.load(block_rows_ptr + block).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.load(block_cols_ptr + block).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for split in range(SPLIT):
        acc += tl.load(partial_ptr + (split * N_ACTIVE + block).to(tl.int64) * BLOCK_N * BLOCK_K + tile)
    tl.store(
        _grad_weight_address(dw_ptr, block, offs_n, offs_k, stride_dwn, stride_dwk, BLOCK_N, BLOCK_K, COMPACT),
        acc.to(dw_ptr.dtype.element_ty),
        mask=(offs_n[:, None] < OUT) & (offs_k[None, :] < IN),
    )


def supports_block(block: tuple[int, int]) -> bool:
    """Whether the kernels can use `block` (rows, cols) as their tile: powers of two, at least 16.

    Example:
        >>> supports_block((64, 128)), supports_block((24, 32))
        (True, False)
    """
    return all(size >= 16 and size & (size - 1) == 0 for size in block)


def _launch_args(
    x: torch.Tensor, weight_shape: tuple[int, int], n_active: int, grid: tuple[int, int], block: tuple[int, int]
) -> dict:
    """Checks shapes and returns the arguments every product kernel shares (`weight_shape`: (out, in); `grid`:
    block-rows, block-columns)."""
    if not supports_block(block):
        raise ValueError(f"The Triton kernels need block sides that are powers of two >= 16, got {block}.")
    if x.dim() != 2 or len(weight_shape) != 2:
        raise ValueError(f"Expected 2-D tensors, got {tuple(x.shape)} and {tuple(weight_shape)}.")
    # fp32 follows PyTorch's own matmul setting, so the kernels agree with F.linear on the same inputs.
    tf32 = x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {
        "T": x.shape[0],
        "OUT": weight_shape[0],
        "IN": weight_shape[1],
        "T_BUCKET": triton.next_power_of_2(max(x.shape[0], 1)),
        "DENSITY_BUCKET": round(20 * n_active / (grid[0] * grid[1])),
        "BLOCK_N": block[0],
        "BLOCK_K": block[1],
        "PRECISION": "tf32" if tf32 else "ieee",
    }


def _dense_sparse_t(
    x: torch.Tensor,
    weight: torch.Tensor,
    shape: tuple[int, int],
    row_offsets: torch.Tensor,
    block_cols: torch.Tensor,
    tile_offsets: torch.Tensor,
    tile_strides: tuple[int, int],
    block: tuple[int, int],
) -> torch.Tensor:
    """x (T, in) @ W^T for a block-sparse W of `shape` (out, in) given in block-CSR, whose entries' tiles lie at
    `tile_offsets` (elements from `weight`'s start) with in-tile strides `tile_strides` (rows, columns)."""
    grid = (row_offsets.numel() - 1, triton.cdiv(shape[1], block[1]))
    args = _launch_args(x, shape, block_cols.numel(), grid, block)
    if x.shape[1] != args["IN"]:
        raise ValueError(f"The input has {x.shape[1]} features but the weight expects {args['IN']}.")
    y = x.new_empty(args["T"], args["OUT"])
    launch_grid = lambda config: (triton.cdiv(args["T"], config["BLOCK_T"]), grid[0])  # noqa: E731
    _dense_sparse_t_kernel[launch_grid](
        x, weight, y, row_offsets, block_cols, tile_offsets,
        stride_xt=x.stride(0), stride_xk=x.stride(1), stride_wn=tile_strides[0], stride_wk=tile_strides[1],
        stride_yt=y.stride(0), stride_yn=y.stride(1), **args,
    )  # fmt: skip
    return y


def _tile_offsets(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, slots, block: tuple[int, int]):
    """Where each entry's tile starts (int64 elements) and the in-tile strides: at (rows, cols) x block in a dense
    (out, in) weight (any strides), or at its slot of a contiguous compact (n, rows, cols) store."""
    if weight.dim() == 3:
        return slots * (block[0] * block[1]), (block[1], 1)
    rows, cols = rows.to(torch.int64), cols.to(torch.int64)
    return rows * (block[0] * weight.stride(0)) + cols * (block[1] * weight.stride(1)), tuple(weight.stride())


def block_sparse_forward(
    x: torch.Tensor, weight: torch.Tensor, meta: BlockMetadata, block: tuple[int, int], out_features: int | None = None
) -> torch.Tensor:
    """Y (T, out) = x (T, in) @ W^T, reading only the active blocks of W: a dense `weight` (out, in), or a
    compact store (n, block_rows, block_cols) with `meta` from `build_compact_metadata` and `out_features`.

    Example:
        >>> x, weight, mask = torch.randn(8, 32), torch.randn(16, 32), torch.tensor([[True, False]])
        >>> y = block_sparse_forward(x, weight, build_block_metadata(mask, 1), (16, 16))  # doctest: +SKIP
    """
    shape = tuple(weight.shape) if weight.dim() == 2 else (out_features, x.shape[1])
    offsets, strides = _tile_offsets(weight, meta.block_rows, meta.block_cols, meta.csr_slots, block)
    return _dense_sparse_t(x, weight, shape, meta.row_offsets, meta.block_cols, offsets, strides, block)


def block_sparse_grad_input(
    grad_out: torch.Tensor, weight: torch.Tensor, meta: BlockMetadata, block: tuple[int, int], in_features=None
) -> torch.Tensor:
    """dX (T, in) = grad_out (T, out) @ W, reading only the active blocks of W: a dense `weight` (out, in), or a
    compact store with `meta` from `build_compact_metadata` and `in_features`.

    It is the forward product on the transposed weight: a strided view (of the weight, or of each slot), whose
    block-CSR is the mask's CSC.
    """
    if weight.dim() == 2:
        shape, transposed = tuple(weight.shape[::-1]), weight.t()
        csc_cols = torch.repeat_interleave(
            torch.arange(meta.col_offsets.numel() - 1, device=weight.device), meta.col_offsets.diff().long(),
            output_size=meta.csc_rows.numel(),
        )  # fmt: skip
        offsets, strides = _tile_offsets(transposed, csc_cols, meta.csc_rows, None, block[::-1])
    else:
        shape, transposed = (in_features, grad_out.shape[1]), weight
        offsets, strides = meta.csc_slots * (block[0] * block[1]), (1, block[1])
    return _dense_sparse_t(grad_out, transposed, shape, meta.col_offsets, meta.csc_rows, offsets, strides, block[::-1])


def block_sparse_grad_weight(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    meta: BlockMetadata,
    block: tuple[int, int],
    target_programs: int | None = None,
) -> torch.Tensor:
    """dW = grad_out^T (out, T) @ x (T, in) at the active blocks only; zero elsewhere, laid out like `weight`.

    When there are fewer active blocks than `target_programs` (default: two waves of the GPU's SMs), the token
    reduction is split and fp32 partials are summed by a second kernel, which keeps the result deterministic.
    """
    grid = (meta.row_offsets.numel() - 1, meta.col_offsets.numel() - 1)
    grad_w = torch.zeros_like(weight)
    strides = (grad_w.stride(0), grad_w.stride(1))
    return _grad_weight_launch(grad_out, x, grad_w, strides, meta.block_rows, meta.block_cols, grid, block,
                               target_programs, compact=False)  # fmt: skip


def block_sparse_grad_compact(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    block_rows: torch.Tensor,
    block_cols: torch.Tensor,
    grid: tuple[int, int],
    block: tuple[int, int],
    target_programs: int | None = None,
) -> torch.Tensor:
    """dW = grad_out^T (out, T) @ x (T, in) at the blocks (`block_rows`, `block_cols`) (n,), written compact as
    (n, block_rows, block_cols), slot i for block i; the padding of partial edge blocks is zero. `grid` is the
    (block-rows, block-columns) grid of the (out, in) weight.

    Example:
        >>> dy, x, rows, cols = torch.randn(8, 32), torch.randn(8, 32), torch.tensor([1]), torch.tensor([0])
        >>> block_sparse_grad_compact(dy, x, rows, cols, (2, 2), (16, 16)).shape  # doctest: +SKIP
        torch.Size([1, 16, 16])
    """
    grad = torch.zeros(block_rows.numel(), *block, dtype=x.dtype, device=x.device)  # (n, rows, cols)
    rows, cols = block_rows.to(torch.int32), block_cols.to(torch.int32)
    return _grad_weight_launch(grad_out, x, grad, (0, 0), rows, cols, grid, block, target_programs, compact=True)


def _grad_weight_launch(
    grad_out, x, grad, grad_strides, block_rows, block_cols, grid, block, target_programs, compact: bool
) -> torch.Tensor:
    """Runs the dW kernel over the blocks (`block_rows`, `block_cols`) into `grad` (weight-shaped or compact)."""
    n_active = block_rows.numel()
    args = _launch_args(x, (grad_out.shape[1], x.shape[1]), n_active, grid, block)
    if grad_out.shape[0] != args["T"]:
        raise ValueError(f"grad_out has {grad_out.shape[0]} tokens but x has {args['T']}.")
    if n_active == 0:
        return grad
    if target_programs is None:
        target_programs = 2 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    max_split = triton.cdiv(args["T"], 64)  # the smallest token tile of the configs
    split = max(1, min(triton.cdiv(target_programs, n_active), max_split))
    tokens_per_split = triton.cdiv(triton.cdiv(args["T"], split), 128) * 128  # a multiple of every token tile
    split = triton.cdiv(args["T"], tokens_per_split)
    partial = x.new_empty((split, n_active, *block) if split > 1 else (1,), dtype=torch.float32)
    _grad_weight_kernel[(n_active, split)](
        grad_out, x, grad, partial, block_rows, block_cols,
        N_ACTIVE=n_active, TOKENS_PER_SPLIT=tokens_per_split,
        stride_dyt=grad_out.stride(0), stride_dyn=grad_out.stride(1), stride_xt=x.stride(0), stride_xk=x.stride(1),
        stride_dwn=grad_strides[0], stride_dwk=grad_strides[1], SPLIT=split, COMPACT=compact, **args,
    )  # fmt: skip
    if split > 1:
        _sum_partials_kernel[(n_active,)](
            partial, grad, block_rows, block_cols, args["OUT"], args["IN"], n_active,
            grad_strides[0], grad_strides[1], BLOCK_N=block[0], BLOCK_K=block[1], SPLIT=split, COMPACT=compact,
        )  # fmt: skip
    return grad
