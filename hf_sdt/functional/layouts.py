"""Index layouts of the active blocks and their caches: what each product consumes, rebuilt only when the topology
changes.

`BlockedLayout` (a dense weight's block mask, CPU products), `TritonLayout` (the kernels' device-side indices),
`CompactLayout` (a compact store's block ids); `cached_layout` / `cached_compact_layout` key them on the index
tensor and its version counter."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..blocks import block_ids_of, mask_of
from ..masks import block_grid, masked_fraction
from .triton_ops import _kernels


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

    @cached_property
    def block_elements(self) -> int:
        """Weight elements inside the active blocks (edge blocks cropped): the multiply-adds per token of each
        blocked product."""
        return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.blocks)


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


@dataclass(frozen=True)
class TritonLayout:
    """Device-side block indices for the Triton kernels, the block they tile with and the (out, in) shape."""

    meta: Any  # hf_sdt.kernels.block_sparse.BlockMetadata
    block: tuple[int, int]
    shape: tuple[int, int]


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

    @cached_property
    def block_elements(self) -> int:
        """Weight elements inside the slots' blocks (edge blocks cropped; torch path only)."""
        return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in self.blocks)

    @cached_property
    def padded_row_elements(self) -> int:
        """Multiply-adds per token of the torch path's compact gradient: each slot's whole block-rows (the padding
        of a partial edge row included) times its cropped columns."""
        return sum(padded_rows.numel() * (c1 - c0) for c0, c1, padded_rows, _ in self.col_groups)


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
