"""SDT layers: linear layers whose weight is cut into blocks, of which only the active ones are used.

`SDTLinear` (weights mode): the weight itself is block-sparse, stored dense; `SDTCompactLinear` (weights mode with
a fixed number of blocks): only the active blocks are stored, in a compact block store. Both derive from `SDTLayer`,
as updates mode's `SDTUpdateLinear` (`hf_sdt.update_layer`) does; the compact stores are those of `hf_sdt.blocks`,
and both modes use the same products.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import block_ids_of, check_block_ids, gather_blocks, mask_of, zero_inactive_blocks_
from .functional import (
    block_sparse_flops,
    block_sparse_flops_of_count,
    cached_compact_layout,
    cached_layout,
    compact_linear,
    dense_of_blocks,
    record_active_blocks,
    resolve_backend,
    sdt_linear,
)
from .masks import block_grid, expand_block_mask, masked_fraction
from .sharding import full_tensor, local_window, shard_like, zero_at_
from .topology import reassign_slots


class SDTLayer(nn.Module):
    """What both SDT layers share: the wrapped layer's parameters under their own names and layouts (`weight` is
    (out, in) for `nn.Linear` and (in, out) for `Conv1D`, so state dicts stay loadable by vanilla transformers),
    the block shape, the backend, and the bool `block_mask` of the (out, in) view of the weight."""

    def __init__(self, base_layer: nn.Module, block_size: tuple[int, int], backend: str):
        super().__init__()
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        if self.is_conv1d:  # transformers' Conv1D: weight (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape
        self.block_size = tuple(block_size)
        self.backend = backend
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        # Kept out of the module tree (no duplicate state-dict keys); `unload` hands it back.
        self.__dict__["base_layer"] = base_layer

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The weight as an (out, in) view, whatever the storage layout."""
        return self.weight.t() if self.is_conv1d else self.weight

    def local_out_in(self, tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The part of `tensor` (the weight, or its gradient) this process holds, as a view of the (out, in)
        layout, and its (row, column) offset there: the whole tensor at (0, 0), or under FSDP2 (between steps)
        the local shard, so that block edits write to every shard."""
        local, offset = local_window(tensor)
        return (local.t(), offset[::-1]) if self.is_conv1d else (local, offset)

    @property
    def grid(self) -> tuple[int, int]:
        """Block-rows and block-columns of the (out, in) weight."""
        return block_grid((self.out_features, self.in_features), self.block_size)

    @property
    def block_mask(self) -> torch.Tensor:
        """Bool (block-rows, block-columns) mask of the active blocks."""
        raise NotImplementedError

    @property
    def density(self) -> float:
        """Fraction of weight elements inside active blocks."""
        return masked_fraction(self.block_mask, self.block_size, (self.out_features, self.in_features))

    @property
    def flops_fraction(self) -> float:
        """Multiply-adds of a training step's three products (forward, dX, dW) relative to the dense layer's."""
        raise NotImplementedError

    def training_flops(self, tokens: int, need_x: bool = True, backward: bool = True) -> int:
        """FLOPs of one training forward of this layer on `tokens` tokens and of its backward (dX too when
        `need_x`), as its products really run on its device: a dense fallback counts dense (see
        `hf_sdt.functional.flops`).

        Example:
        >>> layer = SDTLinear(nn.Linear(128, 128), (64, 64), torch.eye(2, dtype=torch.bool), "reference")
        >>> layer.training_flops(10) == 3 * 2 * 10 * 128 * 128  # the reference backend multiplies densely
        True
        """
        raise NotImplementedError

    def dense_training_flops(self, tokens: int, need_x: bool = True, backward: bool = True) -> int:
        """`training_flops` of the dense layer this one replaced, its weight trained: the forward, then dX (when
        `need_x`) and dW, one dense GEMM each."""
        product = 2 * tokens * self.out_features * self.in_features
        return product * (1 + (1 + need_x) * backward)

    def _resolved_backend(self) -> str:
        return resolve_backend(self.backend, self.weight.device, self.block_size)

    def _base_layer_with(self, weight: torch.Tensor) -> nn.Module:
        base_layer = self.__dict__["base_layer"]
        base_layer.weight = weight
        base_layer.bias = self.bias
        return base_layer

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        return (
            f"{kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, active_blocks={int(self.block_mask.sum())}/{self.block_mask.numel()}, "
            f"backend={self.backend!r}"
        )


class SDTLinear(SDTLayer):
    """Block-sparse drop-in for `nn.Linear` and GPT-2's `Conv1D`.

    The parameters keep their original names, shapes and layouts (`weight` is (out, in) for `nn.Linear` and
    (in, out) for `Conv1D`), so state dicts stay loadable by vanilla transformers. The persistent bool buffer
    `sdt_mask` of shape (ceil(out / block_rows), ceil(in / block_cols)) marks the active blocks of the (out, in)
    view of the weight; weights outside active blocks are kept at exactly zero.

    Args:
        base_layer (`nn.Linear` or `Conv1D`): the layer to wrap; its parameters are reused, not copied.
        block_size (`tuple[int, int]`): block (rows, cols) in the (out, in) layout.
        mask (`torch.Tensor`): bool block mask.
        backend (`str`): `"auto"`, `"triton"`, `"torch"` or `"reference"`, see `SDTConfig.backend`.

    Example:
    >>> layer = SDTLinear(nn.Linear(8, 4), (2, 4), torch.tensor([[True, False], [False, True]]), "torch")
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    def __init__(self, base_layer: nn.Module, block_size: tuple[int, int], mask: torch.Tensor, backend: str = "auto"):
        super().__init__(base_layer, block_size, backend)
        expected = self.grid
        if tuple(mask.shape) != expected:
            raise ValueError(f"Mask of shape {tuple(mask.shape)} does not fit this layer: expected {expected}.")
        self.register_buffer("sdt_mask", mask.to(device=self.weight.device, dtype=torch.bool).clone())
        self.apply_mask_()
        # A loaded checkpoint may hold values outside its mask; every backend ignores them, and zeroing them keeps
        # the weights equal to what the layer computes with.
        self.register_load_state_dict_post_hook(_apply_mask_after_load)

    @property
    def block_mask(self) -> torch.Tensor:
        return self.sdt_mask

    @property
    def flops_fraction(self) -> float:
        return self.density  # each product reads only the active blocks

    def training_flops(self, tokens: int, need_x: bool = True, backward: bool = True) -> int:
        backend = self._resolved_backend()
        if backend == "reference":
            return self.dense_training_flops(tokens, need_x, backward)
        weight, index = self._product_operands()
        shape = (self.out_features, self.in_features)
        flops = block_sparse_flops(backend, weight, index, self.block_size, shape, tokens, backward, need_x, backward)
        return sum(flops)

    def training_flops_at(self, block_count: int, tokens: int, need_x: bool = True, backward: bool = True) -> int:
        """`training_flops` of this layer with `block_count` active blocks instead of its own: what a step at another
        density would cost (the compute-budget planner prices its schedule with it).

        Example:
        >>> layer = SDTLinear(nn.Linear(128, 128), (64, 64), torch.eye(2, dtype=torch.bool), "torch")
        >>> layer.training_flops_at(1, 2048) < layer.training_flops_at(2, 2048)
        True
        """
        backend = self._resolved_backend()
        if backend == "reference":
            return self.dense_training_flops(tokens, need_x, backward)
        shape, compact = (self.out_features, self.in_features), self.weight_parameter.dim() == 3
        return block_sparse_flops_of_count(backend, shape, self.block_size, block_count, tokens, compact, need_x,
                                           backward)  # fmt: skip

    def _product_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and topology the products take: the (out, in) weight and its block mask."""
        return self.weight_out_in, self.sdt_mask

    @property
    def weight_parameter(self) -> nn.Parameter:
        """The trainable parameter that holds the weight: `weight` here, `sdt_blocks` with compact storage."""
        return self.weight

    def storage_element_mask(self, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Element mask of `block_mask` (default: the layer's own mask) in the weight's storage layout, (in, out)
        for Conv1D; blocks beyond the edges are cut to the weight's shape."""
        block_mask = self.sdt_mask if block_mask is None else block_mask
        element_mask = expand_block_mask(block_mask, self.block_size, (self.out_features, self.in_features))
        return element_mask.t() if self.is_conv1d else element_mask

    def layout(self, backend: str):
        """The index structure of the current mask for `backend` ("torch" or "triton"), rebuilt only when the mask
        changes (in place or replaced) or the backend does (cached by `functional.cached_layout`)."""
        return cached_layout(backend, self.sdt_mask, self.block_size, (self.out_features, self.in_features))

    @torch.no_grad()
    def update_mask_(self, mask: torch.Tensor, n_active: int) -> tuple[nn.Parameter, torch.Tensor]:
        """Replace the block mask in place and zero the weights it no longer covers. Returns the trainable
        parameter and where its storage changed (an element mask), whose optimizer state the caller resets.

        `n_active` must be the number of active blocks of `mask`; passing it lets the Triton path rebuild its
        indices on the device without reading the mask back to the host.
        """
        changed = self.storage_element_mask(mask ^ self.sdt_mask)
        self.sdt_mask.copy_(mask)
        record_active_blocks(self.sdt_mask, n_active)
        self.apply_mask_()
        return self.weight, changed

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Set every weight outside the active blocks to exactly zero (the dense and few-token products rely on it)."""
        local, offset = self.local_out_in(self.weight)
        zero_inactive_blocks_(local, self.sdt_mask, self.block_size, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        return sdt_linear(x, self.weight_out_in, self.bias, self.sdt_mask, self.block_size, self.backend)

    def unload(self, merge: bool = True) -> nn.Module:
        """The original layer class with this layer's current parameters (zeros included; `merge` has no other
        choice in weights mode, where the sparse weight is the model)."""
        return self._base_layer_with(self.weight)


def _apply_mask_after_load(module: SDTLinear, incompatible_keys) -> None:
    module.apply_mask_()


class SDTCompactLinear(SDTLinear):
    """Weights mode with compact storage: an `SDTLinear` that stores only its active blocks.

    The trainable parameter `sdt_blocks` (n_active, block_rows, block_cols) holds one active block per slot, in the
    weight's dtype, at the row-major block ids of the buffer `sdt_block_ids` (n_active,); `sdt_mask` is kept beside
    them. Parameters, gradients and optimizer states take `density` of the dense layer's memory (plus the padding
    of partial edge blocks), the products read the slots directly, and no masking work remains after an optimizer
    step. The number of blocks is fixed: a topology change gives the slots of dropped blocks to grown ones (which
    start at zero, with a fresh optimizer state), so parameter shapes, optimizer states and DDP buckets stay valid.
    `SDTConfig(storage="auto")` picks it whenever the number of blocks is fixed (the `constant` schedule with the
    `uniform` or `erk` distribution).

    Checkpoints are unchanged for users: `state_dict()` holds the dense `weight` in the wrapped layer's layout
    (which vanilla transformers loads) and `sdt_mask`, as `SDTLinear`'s does, plus the slot order `sdt_block_ids`
    (so that a resumed optimizer state meets its blocks); `load_state_dict` compacts the dense weight again
    (a checkpoint without `sdt_block_ids` gets its mask's blocks in row-major order).

    Args:
        base_layer (`nn.Linear` or `Conv1D`): the layer to convert; its dense weight is not kept.
        block_size (`tuple[int, int]`): block (rows, cols) in the (out, in) layout.
        mask (`torch.Tensor`): bool block mask.
        backend (`str`): `"auto"`, `"triton"`, `"torch"` or `"reference"`, see `SDTConfig.backend`.
        block_ids (`torch.Tensor`, *optional*): the blocks of `mask` in slot order (default: row-major).

    Example:
    >>> layer = SDTCompactLinear(nn.Linear(8, 4), (2, 4), torch.tensor([[True, False], [False, True]]), "torch")
    >>> layer.sdt_blocks.shape, sorted(layer.state_dict())
    (torch.Size([2, 2, 4]), ['bias', 'sdt_block_ids', 'sdt_mask', 'weight'])
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    def __init__(self, base_layer: nn.Module, block_size, mask: torch.Tensor, backend="auto", block_ids=None):
        super().__init__(base_layer, block_size, mask, backend)
        ids = self._checked_ids(self.sdt_mask, block_ids)
        self.register_buffer("sdt_block_ids", ids.to(self.sdt_mask.device))
        dense = SDTLayer.weight_out_in.fget(self).detach()  # the wrapped layer's weight, still held
        blocks = gather_blocks(dense, self.sdt_block_ids, self.block_size)
        requires_grad = self.weight.requires_grad
        del self.weight  # only the active blocks are kept: neither this layer nor the held base layer keeps the rest
        self.__dict__["base_layer"].weight = None  # `unload` gives it a dense weight again
        self.sdt_blocks = nn.Parameter(blocks.contiguous(), requires_grad=requires_grad)
        self._register_state_dict_hook(_dense_weight_into_state_dict)
        self.register_load_state_dict_pre_hook(_compact_weight_from_state_dict)

    def _checked_ids(self, mask: torch.Tensor, block_ids: torch.Tensor | None) -> torch.Tensor:
        """`block_ids` (default: the mask's blocks in row-major order), checked to be exactly the mask's blocks."""
        if block_ids is None:
            return block_ids_of(mask)
        block_ids = block_ids.to(device=mask.device, dtype=torch.int64)
        check_block_ids(block_ids, self.grid)
        if not torch.equal(mask_of(block_ids, self.grid), mask.bool()):
            raise ValueError("The block ids are not the blocks of the mask; save and load them together.")
        return block_ids

    @property
    def weight_parameter(self) -> nn.Parameter:
        return self.sdt_blocks

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of the weight in the wrapped layer's layout, for code that reads `.weight` (its dtype,
        device or values, as some transformers models do); writing to it changes nothing: the trainable parameter
        is `sdt_blocks`. Each read builds the copy."""
        return self.storage_weight()

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The dense (out, in) weight, zero outside the active blocks (through autograd; gathered under FSDP2)."""
        shape = (self.out_features, self.in_features)
        return dense_of_blocks(full_tensor(self.sdt_blocks), self.sdt_block_ids, shape)

    def layout(self, backend: str):
        """The index structure of the current blocks for `backend`, rebuilt only when they change."""
        shape = (self.out_features, self.in_features)
        return cached_compact_layout(backend, self.sdt_block_ids, self.block_size, shape)

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Nothing to do: only the active blocks are stored."""

    @torch.no_grad()
    def update_mask_(self, mask: torch.Tensor, n_active: int) -> tuple[nn.Parameter, torch.Tensor]:
        """Move the blocks to `mask` (with as many active blocks as there are slots): the slots of dropped blocks
        take the grown ones, at zero. Returns `sdt_blocks` and the slots that changed, whose optimizer state the
        caller resets."""
        if n_active != self.sdt_block_ids.numel():
            raise ValueError(
                f"A compact SDT layer keeps {self.sdt_block_ids.numel()} blocks; the new mask has {n_active}. Only "
                "schedules with a fixed number of blocks can use compact storage (SDTConfig.storage='dense' for the "
                "others)."
            )
        slots, new_ids = reassign_slots(self.sdt_block_ids, self.sdt_mask & ~mask, mask & ~self.sdt_mask)
        ids = self.sdt_block_ids.clone()
        ids[slots] = new_ids.to(ids)
        self.sdt_block_ids.copy_(ids)
        self.sdt_mask.copy_(mask)
        zero_at_(self.sdt_blocks, slots)
        return self.sdt_blocks, slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        shape = (self.out_features, self.in_features)
        return compact_linear(x, self.sdt_blocks, self.bias, self.sdt_block_ids, shape, self.backend)

    def _product_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sdt_blocks, self.sdt_block_ids

    @torch.no_grad()
    def unload(self, merge: bool = True) -> nn.Module:
        """The original layer class with the dense weight of this layer's blocks (zeros elsewhere)."""
        return self._base_layer_with(nn.Parameter(self.storage_weight()))

    def storage_weight(self) -> torch.Tensor:
        """The dense weight in the wrapped layer's layout ((in, out) for Conv1D), as checkpoints hold it."""
        dense = self.weight_out_in.detach()
        return dense.t().contiguous() if self.is_conv1d else dense


def _dense_weight_into_state_dict(module: SDTCompactLinear, state_dict, prefix, local_metadata) -> None:
    state_dict.pop(prefix + "sdt_blocks")
    state_dict[prefix + "weight"] = module.storage_weight()


def _compact_weight_from_state_dict(module: SDTCompactLinear, state_dict, prefix, *args) -> None:
    """A dense `weight` (and `sdt_mask`, `sdt_block_ids`) in `state_dict` becomes the compact `sdt_blocks`."""
    weight = state_dict.pop(prefix + "weight", None)
    if weight is None:
        return
    mask = state_dict.get(prefix + "sdt_mask", module.sdt_mask).to(module.sdt_mask.device).bool()
    ids = module._checked_ids(mask, state_dict.get(prefix + "sdt_block_ids"))
    if ids.numel() != module.sdt_block_ids.numel():
        raise ValueError(
            f"The checkpoint's layer {prefix[:-1]!r} has {ids.numel()} active blocks, this compact layer "
            f"{module.sdt_block_ids.numel()} slots: load it into a model converted with the same SDTConfig."
        )
    weight_out_in = (weight.t() if module.is_conv1d else weight).to(module.sdt_blocks.device)
    state_dict[prefix + "sdt_block_ids"] = ids
    state_dict[prefix + "sdt_blocks"] = shard_like(
        gather_blocks(weight_out_in, ids, module.block_size), module.sdt_blocks
    )
