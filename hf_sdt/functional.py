"""Block-sparse linear products and backend dispatch.

Weights mode (`sdt_linear`, and `compact_linear` for a weight stored as its active blocks only): three backends
compute the same thing, forward Y = X (W*M)^T + b, backward dX = dY (W*M), dW = (dY^T X) * M, for a weight W that
is zero outside its active blocks:

- ``reference``: the masked dense matmul, used by tests as the oracle (no saving at all);
- ``torch``: per call, the blocked PyTorch path (work proportional to the number of active blocks), the few-token
  product of inference (reads only the active blocks), or one dense GEMM where neither pays (`choose_ops`);
- ``triton``: the GPU kernels of ``hf_sdt.kernels``.

The ``torch`` and ``triton`` products run inside the custom op ``hf_sdt::block_sparse_mm`` (and its backward), so
that torch.compile traces them as single nodes with the mask as a tensor input; only inference on a few tokens with
a compact store is traced as plain tensor ops (`compact_few_tokens_traced`), which the compiled graph runs without
the per-call dispatch of the custom op. The same products take either storage of the weight: dense (out, in) with
its block mask, or a compact (n, block_rows, block_cols) store with its block ids (see `hf_sdt.blocks`), whose
gradient is compact too.

Updates mode (`sparse_update_linear`): the weight W = base + U is dense and frozen, the trainable updates U live in
a compact (n, block_rows, block_cols) store (see `hf_sdt.blocks`). Forward and dX are one dense GEMM each on W;
the gradient of U is dY^T X at its blocks only, written compact (blocked torch path or Triton kernel; the custom op
``hf_sdt::compact_update_grad`` under torch.compile); the ``reference`` backend forms the dense update and lets
autograd compute everything.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .blocks import block_ids_of, element_positions, gather_blocks, mask_of, scatter_blocks_, zero_inactive_blocks_
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
    the rows of its active blocks). `block_ids` (n,) are the active blocks' row-major ids, `block_rows` and
    `block_cols` (n,) their block coordinates, `row_sums` (R, n) the 0/1 matrix that sums the slots of each
    block-row, and `mask` a copy of the block mask, all on the mask's device, for the few-token and dense paths.
    When the block tiles the weight, `storage_rows` holds the rows of the (out * C, cols) and (in * R, rows) views
    of a contiguous weight and of a contiguous transposed one (Conv1D) that make up the active blocks, slot by
    slot, so that one `index_select` gathers them (None otherwise). `density` is the fraction of weight elements
    inside active blocks.
    """

    blocks: tuple[tuple[int, int, int, int], ...]
    col_slabs: tuple[tuple[int, int, torch.Tensor], ...]
    block_ids: torch.Tensor
    block_rows: torch.Tensor
    block_cols: torch.Tensor
    row_sums: torch.Tensor
    mask: torch.Tensor
    storage_rows: tuple[torch.Tensor, torch.Tensor] | None
    block: tuple[int, int]
    shape: tuple[int, int]
    density: float

    @property
    def gemm_calls(self) -> int:
        """GEMM calls of one training step of the blocked path (forward, dX, dW)."""
        return 2 * len(self.blocks) + len(self.col_slabs)


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
    block_ids, density = block_ids_of(host_mask).to(mask.device), masked_fraction(host_mask, block, shape)
    block_rows, block_cols, own_mask = block_ids // mask.shape[1], block_ids % mask.shape[1], mask.detach().clone()
    slots = torch.arange(block_ids.numel(), device=mask.device)
    row_sums = torch.zeros(mask.shape[0], block_ids.numel(), device=mask.device)
    row_sums[block_rows, slots] = 1.0
    storage_rows = None
    if shape[0] % block[0] == 0 and shape[1] % block[1] == 0:
        rows_of = torch.arange(block[0], device=mask.device)
        cols_of = torch.arange(block[1], device=mask.device)
        storage_rows = (
            (((block_rows * block[0])[:, None] + rows_of) * mask.shape[1] + block_cols[:, None]).flatten(),
            (((block_cols * block[1])[:, None] + cols_of) * mask.shape[0] + block_rows[:, None]).flatten(),
        )
    return BlockedLayout(
        blocks, tuple(col_slabs), block_ids, block_rows, block_cols, row_sums, own_mask, storage_rows, block, shape,
        density,
    )  # fmt: skip


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
    return dense_macs * (1 - layout.density / efficiency) >= layout.gemm_calls * BLOCKED_GEMM_OVERHEAD_MACS


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


@dataclass(frozen=True)
class TritonLayout:
    """Device-side block indices for the Triton kernels, the block they tile with and the (out, in) shape."""

    meta: Any  # hf_sdt.kernels.block_sparse.BlockMetadata
    block: tuple[int, int]
    shape: tuple[int, int]


class TritonOps:
    """The Triton kernels of `hf_sdt.kernels` on a `TritonLayout`, or on the `CompactLayout` of a compact store."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        return _kernels().block_sparse_forward(x, weight, layout.meta, layout.block, layout.shape[0])

    @staticmethod
    def backward(grad_out, x, weight, layout, need_x: bool, need_w: bool):
        kernels = _kernels()
        grad_x = None
        if need_x:
            grad_x = kernels.block_sparse_grad_input(grad_out, weight, layout.meta, layout.block, layout.shape[1])
        grad_w = None
        if need_w and weight.dim() == 3:
            grad_w = compact_grad_triton(grad_out, x, layout)
        elif need_w:
            grad_w = kernels.block_sparse_grad_weight(grad_out, x, weight, layout.meta, layout.block)
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


# Few-token inference (decoding) runs `FewTokensOps` up to `FEW_TOKENS` tokens per call when it reads fewer bytes than
# one dense GEMM on the zero-filled weight: it costs about FEW_TOKENS_OVERHEAD_BYTES of fixed work per call (80-100 us
# on a 2-core CPU, the time to read about 1 MB there) plus twice the bytes of the active blocks (gathered, then read
# again by the product). Fitted to benchmarks/bench_decode.py (SDT 0.5 on the SmolLM2 shape ran slower than dense
# with the factor 1) and the per-layer timings behind it.
FEW_TOKENS = 16
FEW_TOKENS_OVERHEAD_BYTES = 1e6


def few_token_inference(tokens: int, for_training: bool) -> bool:
    """Whether a call may take the few-token product: inference (no backward follows) on at most `FEW_TOKENS`.

    Example:
        >>> few_token_inference(1, for_training=False), few_token_inference(1, for_training=True)
        (True, False)
    """
    return not for_training and tokens <= FEW_TOKENS


def few_tokens_pay(layout: BlockedLayout, element_size: int) -> bool:
    """Whether the few-token product beats one dense GEMM on the zero-filled weight (measured rule, see above):
    at fp32, below density 0.36 for a 1536 x 576 layer, 0.12 for 576 x 576, never for 1 MB or less.

    Example:
        >>> quarter = torch.arange(216).view(24, 9) % 4 == 0
        >>> layout = build_blocked_layout(quarter, (64, 64), (1536, 576))
        >>> few_tokens_pay(layout, 4), few_tokens_pay(layout, 2)  # fp32, bf16
        (True, False)
    """
    weight_bytes = layout.shape[0] * layout.shape[1] * element_size
    return FEW_TOKENS_OVERHEAD_BYTES + 2 * layout.density * weight_bytes < weight_bytes


def choose_ops(backend: str, layout, tokens: int, for_training: bool, element_size: int = 4):
    """The products of one call: Triton kernels; or on the torch backend the few-token product (inference, when
    `few_tokens_pay`, and always for a compact store, whose dense product would first scatter it into a whole
    weight), the blocked path when it pays (`blocked_path_pays`), else one dense GEMM on the zero-filled weight."""
    if backend == "triton":
        return TritonOps
    compact = isinstance(layout, CompactLayout)
    if few_token_inference(tokens, for_training) and (compact or few_tokens_pay(layout, element_size)):
        return FewTokensOps
    return BlockedTorchOps if blocked_path_pays(layout, tokens, layout.block) else DenseTorchOps


class TensorKeyedCache:
    """Values cached per tensor, by identity, dropped when the tensor is: a dict keyed by `id` whose entries hold a
    weak reference to check identity. A lookup costs about 0.15 us, where `WeakIdKeyDictionary.get` (which builds a
    weak reference per call) costs 1.8 us: the decoding path looks a layout up in every call of every SDT layer.

    Example:
        >>> cache, tensor = TensorKeyedCache(), torch.zeros(1)
        >>> cache[tensor] = "layout"
        >>> cache.get(tensor), cache.get(torch.zeros(1)), len(cache)
        ('layout', None, 1)
        >>> del tensor
        >>> len(cache)
        0
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def get(self, tensor: torch.Tensor, default: Any = None) -> Any:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else default

    def __setitem__(self, tensor: torch.Tensor, value: Any) -> None:
        key, entries = id(tensor), self._entries
        entries[key] = (weakref.ref(tensor, lambda _: entries.pop(key, None)), value)

    def __len__(self) -> int:
        return len(self._entries)


# Layouts are cached per index tensor (the block mask, or updates mode's block ids; by identity, with its version
# counter), not by the layer: the products are custom ops, which take tensors only, so that torch.compile traces an
# SDT layer as one opaque node whose mask is an input (a drop/grow step changes the mask's values, not the graph).
_LAYOUT_CACHE = TensorKeyedCache()  # index tensor -> ((kind, backend, block, shape, version), layout)
_ACTIVE_COUNTS = TensorKeyedCache()  # mask -> (version, number of active blocks)


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The in-place version counter of `tensor`, which cached structures are keyed on; None for an inference tensor,
    which has none (one made under `torch.inference_mode()`, e.g. by loading a model there).

    Example:
        >>> tensor_version(torch.zeros(2)), tensor_version(torch.zeros(2).add_(1))
        (0, 1)
    """
    return None if tensor.is_inference() else tensor._version


def record_active_blocks(mask: torch.Tensor, n_active: int) -> None:
    """Tell the layout cache how many blocks `mask` has active at its current version: the Triton layout is then
    rebuilt on the device without reading the mask back to the host."""
    _ACTIVE_COUNTS[mask] = (tensor_version(mask), n_active)


def _cached(index: torch.Tensor, key: tuple, build):
    """`build()`, cached for `index` until `key` or the tensor's version changes."""
    key = (*key, tensor_version(index))
    cached = _LAYOUT_CACHE.get(index)
    if cached is None or cached[0] != key:
        cached = (key, build())
        _LAYOUT_CACHE[index] = cached
    return cached[1]


def cached_layout(backend: str, mask: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]):
    """`build_layout(...)` of `mask`, rebuilt only when the mask changes (in place, or a new tensor) or the backend
    does.

    Example:
        >>> mask = torch.tensor([[True, False]])
        >>> cached_layout("torch", mask, (2, 2), (2, 4)) is cached_layout("torch", mask, (2, 2), (2, 4))
        True
    """

    def build():
        version, n_active = _ACTIVE_COUNTS.get(mask, (None, None))
        n_active = n_active if version is not None and version == tensor_version(mask) else None
        return build_layout(backend, mask, tuple(block), tuple(shape), n_active)

    return _cached(mask, ("blocked", backend, tuple(block), tuple(shape)), build)


def cached_compact_layout(backend: str, block_ids: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]):
    """`build_compact_layout(...)` of `block_ids`, rebuilt only when the ids change or the backend does."""
    key = ("compact", backend, tuple(block), tuple(shape))
    return _cached(block_ids, key, lambda: build_compact_layout(backend, block_ids, tuple(block), tuple(shape)))


def _layout_of(backend: str, weight: torch.Tensor, index: torch.Tensor, block, out_features: int, in_features: int):
    """The cached layout of a dense weight's block mask, or of a compact store's block ids."""
    shape = (out_features, in_features)
    if weight.dim() == 3:
        return cached_compact_layout(backend, index, block, shape)
    return cached_layout(backend, index, block, shape)


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


block_sparse_mm.register_autograd(
    lambda ctx, grad_out: _block_sparse_input_grads(ctx, grad_out, block_sparse_mm_backward),
    setup_context=_save_for_block_sparse_backward,
)


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
        return TritonLayout(_kernels().build_block_metadata(mask, n_active), block, shape)
    return build_blocked_layout(mask, block, shape)


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
    else:  # eager inference skips the autograd bookkeeping, about 25 us of a 100 us decoding call
        product = block_sparse_mm if compiling else BlockSparseMatmul.apply if for_training else _block_sparse_forward
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


# -- updates mode -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactLayout:
    """Where the slots of a compact store lie in a (out, in) weight: for its products in weights mode, and for the
    gradient of updates mode.

    `block_ids` (n,) are the slots' row-major block ids, `block_rows` / `block_cols` each slot's block (int32, on
    the store's device: the Triton kernels' input). Torch path only, built on the host when the topology changes:
    `blocks` lists each slot's block as (first row, end row, first column, end column), edge blocks cropped;
    `col_groups` holds, for each block-column with active blocks, (first column, end column, rows of a row-padded
    dY^T that its slots read, the slots); `row_sums` (R, n) sums the slots of each block-row. `meta` (Triton only)
    holds the kernels' block-CSR / CSC indices with each entry's slot. `density` is the fraction of weight
    elements inside the blocks.
    """

    block_ids: torch.Tensor
    block_rows: torch.Tensor
    block_cols: torch.Tensor
    blocks: tuple[tuple[int, int, int, int], ...]
    col_groups: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]
    row_sums: torch.Tensor | None
    meta: Any
    grid: tuple[int, int]
    block: tuple[int, int]
    shape: tuple[int, int]
    density: float

    @property
    def gemm_calls(self) -> int:
        """GEMM calls of one training step of the blocked path (forward, dX, dW)."""
        return 2 * len(self.blocks) + len(self.col_groups)


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
    groups, blocks, row_sums, meta = [], (), None, None
    if backend == "torch":
        host_rows, host_cols = rows.cpu(), cols.cpu()
        offsets = torch.arange(block[0])
        for column in host_cols.unique().tolist():
            slots = (host_cols == column).nonzero().flatten()
            padded_rows = (host_rows[slots, None] * block[0] + offsets).flatten()  # (m * block_rows,)
            c0, c1 = column * block[1], min((column + 1) * block[1], shape[1])
            groups.append((c0, c1, padded_rows.to(block_ids.device), slots.to(block_ids.device)))
        blocks = tuple(
            (r * block[0], min((r + 1) * block[0], shape[0]), c * block[1], min((c + 1) * block[1], shape[1]))
            for r, c in zip(host_rows.tolist(), host_cols.tolist(), strict=True)
        )
        row_sums = torch.zeros(grid[0], block_ids.numel(), device=block_ids.device)
        row_sums[rows, torch.arange(block_ids.numel(), device=block_ids.device)] = 1.0
        density = masked_fraction(mask_of(block_ids.cpu(), grid), block, shape)
    else:  # no host synchronisation: the density only steers the torch path's dispatch
        meta = _kernels().build_compact_metadata(block_ids, grid)
        density = block_ids.numel() / (grid[0] * grid[1])
    return CompactLayout(
        block_ids, rows.to(torch.int32), cols.to(torch.int32), blocks, tuple(groups), row_sums, meta, grid, block,
        shape, density,
    )  # fmt: skip


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
    padded_t = grad_out.new_empty(layout.grid[0] * block[0], grad_out.shape[0])  # (R * rows, T)
    padded_t[: layout.shape[0]] = grad_out.t()
    padded_t[layout.shape[0] :].zero_()
    for c0, c1, padded_rows, slots in layout.col_groups:
        products = padded_t.index_select(0, padded_rows) @ x[:, c0:c1]  # (m * rows, T) @ (T, w)
        grad[:, :, : c1 - c0].index_copy_(0, slots, products.view(slots.numel(), block[0], c1 - c0))
    return grad


def compact_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, layout: CompactLayout) -> torch.Tensor:
    """The same product by the Triton kernel of `hf_sdt.kernels`, with no host synchronisation."""
    return _kernels().block_sparse_grad_compact(
        grad_out, x, layout.block_rows, layout.block_cols, layout.grid, layout.block
    )


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


class SparseUpdateLinearFunction(torch.autograd.Function):
    """Y = X W^T for the frozen effective weight W = base + U (materialized by the layer); backward gives dX and
    the gradient of the compact updates U, dY^T X at their blocks only: no dense weight gradient is formed.

    torch.compile traces it whole: the two GEMMs as plain ops, the compact gradient as its custom op (called
    directly in eager mode, where a custom op's dispatch costs tens of microseconds)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, updates: torch.Tensor, block_ids: torch.Tensor,
                backend: str) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, weight, block_ids)
        ctx.backend, ctx.updates_dtype, ctx.block = backend, updates.dtype, tuple(updates.shape[1:])
        return x @ weight.t()  # (T, out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, block_ids = ctx.saved_tensors
        need_x, _, need_updates = ctx.needs_input_grad[:3]
        grad_x = grad_out @ weight if need_x else None
        grad_updates = None
        if need_updates:
            grad = compact_update_grad if torch.compiler.is_compiling() else _compact_update_grad
            grad_updates = grad(grad_out.contiguous(), x, block_ids, *ctx.block, ctx.backend).to(ctx.updates_dtype)
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
) -> torch.Tensor:
    """`F.linear` with a frozen effective weight (out, in) = base + updates, whose compact `updates`
    (n, block_rows, block_cols) at the blocks `block_ids` (n,) get their gradient at those blocks only. The index
    structure of the gradient is cached until the block ids change (see `cached_compact_layout`).

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
    x2d = x.reshape(-1, x.shape[-1]).contiguous()  # (T, in), row-major so that column slices are BLAS operands
    out = SparseUpdateLinearFunction.apply(x2d, weight, updates, block_ids, backend)  # (T, out)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])
