"""The CPU products of the torch backend: blocked GEMMs (work proportional to the active blocks), one dense GEMM
where that does not pay, the few-token product of decoding, and the compact gradient dY^T X at a store's blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import gather_blocks, scatter_blocks_, zero_inactive_blocks_
from ..masks import block_grid
from .layouts import CompactLayout


def block_tiles(weight: torch.Tensor, layout) -> list[torch.Tensor]:
    """The active blocks of `weight` as 2-D tiles in `layout.blocks` order, edge blocks cropped: views of a dense
    (out, in) weight (`BlockedLayout`), or the slots of a compact (n, rows, cols) store (`CompactLayout`)."""
    if weight.dim() == 3:
        return [weight[slot, : r1 - r0, : c1 - c0] for slot, (r0, r1, c0, c1) in enumerate(layout.blocks)]
    return [weight[r0:r1, c0:c1] for r0, r1, c0, c1 in layout.blocks]


def dense_weight(weight: torch.Tensor, layout) -> torch.Tensor:
    """The (out, in) weight: `weight` itself when dense, a compact store scattered into zeros."""
    if weight.dim() == 2:
        return weight
    dense = weight.new_zeros(layout.shape)
    scatter_blocks_(dense, weight, layout.block_ids, layout.block)
    return dense


def _sum_into(out: torch.Tensor, products, strips) -> torch.Tensor:
    """out[:, lo:hi] = the sum of a @ b over the `products` (lo, hi, a, b) of each strip, in place, with no zero fill
    of `out` first (an uninitialised tensor: the first product of a strip overwrites it, beta=0); the `strips`
    (lo, hi) that no product reaches are zeroed. Zero-filling a (T, out) output costs as much as a quarter of a
    blocked forward at density 0.1 on a CPU."""
    written = set()
    for lo, hi, a, b in products:
        out[:, lo:hi].addmm_(a, b, beta=int(lo in written))
        written.add(lo)
    for lo, hi in strips:
        if lo not in written:
            out[:, lo:hi].zero_()
    return out


def _strips(size: int, side: int) -> list[tuple[int, int]]:
    return [(start, min(start + side, size)) for start in range(0, size, side)]


class BlockedTorchOps:
    """The blocked PyTorch products on a `BlockedLayout` (dense weight) or a `CompactLayout` (compact store).

    Y and dX accumulate one GEMM per active block on strided views of the activations, with no gather or
    transpose; dW runs one tall GEMM per block-column on gathered rows of dY^T, because a GEMM with a
    block-sized output and a token-long reduction runs far below the CPU's peak.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        out = x.new_empty(x.shape[0], layout.shape[0])  # (T, out)
        products = (
            (r0, r1, x[:, c0:c1], tile.t())
            for (r0, r1, c0, c1), tile in zip(layout.blocks, block_tiles(weight, layout), strict=True)
        )
        return _sum_into(out, products, _strips(layout.shape[0], layout.block[0]))

    @staticmethod
    def flops(layout, tokens: int, need_x: bool, need_w: bool) -> tuple[int, int, int]:
        """FLOPs (forward, dX, dW) of one call on `tokens` tokens: a GEMM per cropped active block for Y and dX; for
        dW one per block-column over the rows of its blocks (a compact store's whole block-rows, see
        `compact_grad_flops`)."""
        product = 2 * tokens * layout.block_elements
        grad_w = compact_grad_flops(layout, tokens) if isinstance(layout, CompactLayout) else product
        return product, need_x * product, need_w * grad_w

    @staticmethod
    def backward(grad_out, x, weight, layout, need_x: bool, need_w: bool):
        grad_x = grad_w = None
        if need_x:
            grad_x = grad_out.new_empty(grad_out.shape[0], layout.shape[1])  # (T, in)
            products = (
                (c0, c1, grad_out[:, r0:r1], tile)
                for (r0, r1, c0, c1), tile in zip(layout.blocks, block_tiles(weight, layout), strict=True)
            )
            _sum_into(grad_x, products, _strips(layout.shape[1], layout.block[1]))
        if need_w and weight.dim() == 3:
            grad_w = compact_grad_torch(grad_out, x, layout)
        elif need_w:
            grad_w = torch.zeros_like(weight)
            grad_out_t = grad_out.t().contiguous()  # (out, T): gathering its rows is a plain memcpy
            gathered = grad_out_t.new_empty(max((idx.numel() for *_, idx in layout.col_slabs), default=0), x.shape[0])
            for c0, c1, idx in layout.col_slabs:
                grad_out_rows = torch.index_select(grad_out_t, 0, idx, out=gathered[: idx.numel()])  # (m, T)
                grad_w[:, c0:c1].index_copy_(0, idx, grad_out_rows @ x[:, c0:c1])  # (m, T) @ (T, cols)
        return grad_x, grad_w


class DenseTorchOps:
    """One dense GEMM per product where the blocked path's per-GEMM overhead would not pay (few tokens, small
    layers, high density). A dense weight must be zero outside its active blocks (`SDTLinear` keeps it so), which
    makes Y and dX exact with no masking; dW is zeroed outside the active blocks on block views (no element mask).
    A compact store is scattered into a zero weight first, and its gradient gathered back into slots."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        return x @ dense_weight(weight, layout).t()  # (T, out)

    @staticmethod
    def flops(layout, tokens: int, need_x: bool, need_w: bool) -> tuple[int, int, int]:
        """FLOPs (forward, dX, dW) of one call: a dense GEMM per product, the zeros included."""
        dense = 2 * tokens * layout.shape[0] * layout.shape[1]
        return dense, need_x * dense, need_w * dense

    @staticmethod
    def backward(grad_out, x, weight, layout, need_x: bool, need_w: bool):
        grad_x = grad_out @ dense_weight(weight, layout) if need_x else None
        grad_w = None
        if need_w and weight.dim() == 3:
            grad_w = gather_blocks(grad_out.t() @ x, layout.block_ids, layout.block)
        elif need_w:
            grad_w = zero_inactive_blocks_(grad_out.t() @ x, layout.mask, layout.block)
        return grad_x, grad_w


class FewTokensOps:
    """Y = X W^T for a few tokens (decoding) reading only the active blocks: `few_tokens_product` of the gathered
    blocks of a dense weight, or of a compact store as it is. Inference only (no backward)."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        blocks = FewTokensOps.active_blocks(weight, layout)  # (n, rows, cols)
        return few_tokens_product(x, blocks, layout.block_cols, layout.row_sums, layout.shape[0])

    @staticmethod
    def flops(layout, tokens: int, need_x: bool, need_w: bool) -> tuple[int, int, int]:
        """FLOPs of one call: the batched product of the whole (padded) blocks, then the block-row sums."""
        (rows, cols), n_blocks = layout.block, layout.block_ids.numel()
        block_row_sums = 2 * layout.row_sums.shape[0] * n_blocks * tokens * rows
        return 2 * tokens * n_blocks * rows * cols + block_row_sums, 0, 0

    @staticmethod
    def active_blocks(weight: torch.Tensor, layout) -> torch.Tensor:
        """The active blocks (n, rows, cols): a compact store itself; one row gather of a dense weight's storage
        when the block tiles it (six times faster than indexing the blocks of a 4-D view), else `gather_blocks`."""
        if weight.dim() == 3:
            return weight
        if layout.storage_rows is not None:
            (rows, cols), (out_rows, in_rows) = layout.block, layout.storage_rows
            if weight.is_contiguous():
                return weight.view(-1, cols).index_select(0, out_rows).view(-1, rows, cols)
            if weight.t().is_contiguous():  # a Conv1D weight, stored (in, out)
                return weight.t().view(-1, rows).index_select(0, in_rows).view(-1, cols, rows).transpose(1, 2)
        return gather_blocks(weight, layout.block_ids, layout.block)


def few_tokens_product(
    x: torch.Tensor, blocks: torch.Tensor, block_cols: torch.Tensor, row_sums: torch.Tensor, out_features: int
) -> torch.Tensor:
    """Y = X W^T for a few tokens x (T, in) from the active blocks (n, rows, cols) of W alone: gather each block's
    slice of X, one batched product, then one small GEMM with the 0/1 matrix `row_sums` (R, n) that sums the
    slots of each block-row (an index_add_ of these few values costs 30 us on a CPU). `block_cols` (n,) are the
    blocks' block-columns. A handful of tensor ops whatever the number of blocks, where the blocked path would run
    one GEMM per block; memory traffic about `density` of the weight's bytes.

    Example:
        >>> blocks, x = torch.ones(2, 2, 2), torch.ones(1, 4)  # blocks (0, 1) and (1, 1) of a 4 x 4 weight
        >>> few_tokens_product(x, blocks, torch.tensor([1, 1]), torch.eye(2), 4)
        tensor([[2., 2., 2., 2.]])
    """
    tokens, (_, block_rows, block_cols_size) = x.shape[0], blocks.shape
    if x.shape[1] % block_cols_size:
        x = F.pad(x, (0, block_cols_size - x.shape[1] % block_cols_size))  # (T, C * cols)
    x_blocks = x.view(tokens, -1, block_cols_size).index_select(1, block_cols)  # (T, n, cols)
    products = torch.bmm(x_blocks.transpose(0, 1), blocks.transpose(1, 2))  # (n, T, rows)
    row_sums = row_sums if row_sums.dtype == x.dtype else row_sums.to(x.dtype)  # a no-op .to still costs a dispatch
    out = torch.mm(row_sums, products.view(-1, tokens * block_rows))  # (R, n) @ (n, T * rows)
    if tokens == 1:  # (R, rows) is already the row-major (1, R * rows)
        out = out.view(1, -1)
    else:
        out = out.view(-1, tokens, block_rows).transpose(0, 1).reshape(tokens, -1)  # (T, R * rows)
    return out if out.shape[1] == out_features else out[:, :out_features]  # (T, out)


def compact_few_tokens_traced(x: torch.Tensor, blocks: torch.Tensor, block_ids: torch.Tensor, out_features: int):
    """`few_tokens_product` of a compact store with its indices computed from `block_ids` by tensor ops: what
    torch.compile traces (into the graph, where the eager path's per-call dispatch costs nothing) for inference
    calls of a few tokens, instead of the opaque custom op, whose layouts are built on the host."""
    grid = block_grid((out_features, x.shape[1]), tuple(blocks.shape[1:]))
    row_sums = torch.arange(grid[0], device=block_ids.device)[:, None] == block_ids // grid[1]  # (R, n)
    return few_tokens_product(x, blocks, block_ids % grid[1], row_sums, out_features)


def compact_grad_flops(layout: CompactLayout, tokens: int) -> int:
    """FLOPs of `compact_grad_torch`: each block-column's GEMM over the padded rows of its slots."""
    return 2 * tokens * layout.padded_row_elements


def compact_grad_torch(grad_out: torch.Tensor, x: torch.Tensor, layout: CompactLayout) -> torch.Tensor:
    """dY^T X at the slots' blocks, (n, block_rows, block_cols): one tall GEMM per block-column on gathered rows
    of a row-padded dY^T (a GEMM per block, with its token-long reduction and block-sized output, runs far below
    a CPU's peak). grad_out (T, out), x (T, in).

    Example:
        >>> from hf_sdt.functional.layouts import build_compact_layout
        >>> layout = build_compact_layout("torch", torch.tensor([1]), (2, 2), (2, 3))
        >>> compact_grad_torch(torch.ones(4, 2), torch.ones(4, 3), layout)
        tensor([[[4., 0.],
                 [4., 0.]]])
    """
    n_slots, block = layout.block_rows.numel(), layout.block
    grad = grad_out.new_zeros(n_slots, *block)  # (n, rows, cols)
    padded_t = grad_out.new_empty(layout.grid[0] * block[0], grad_out.shape[0])  # (R * rows, T)
    padded_t[: layout.shape[0]] = grad_out.t()
    padded_t[layout.shape[0] :].zero_()
    for c0, c1, padded_rows, slots in layout.col_groups:
        products = padded_t.index_select(0, padded_rows) @ x[:, c0:c1]  # (m * rows, T) @ (T, w)
        grad[:, :, : c1 - c0].index_copy_(0, slots, products.view(slots.numel(), block[0], c1 - c0))
    return grad
