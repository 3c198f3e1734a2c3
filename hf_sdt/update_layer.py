"""Updates mode's layer: `SDTUpdateLinear`, a frozen pretrained linear layer plus a compact store of trainable
block updates (see `hf_sdt.blocks`), whose gradient is computed at its blocks only."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import check_block_ids, gather_blocks, mask_of, scatter_blocks_
from .functional import (
    compact_update_grad_flops,
    sparse_update_linear,
    tensor_version,
)
from .layer import SDTLayer
from .sharding import full_tensor, sum_over_shards, zero_at_


class SDTUpdateLinear(SDTLayer):
    """Updates mode: a frozen pretrained `nn.Linear` / `Conv1D` plus trainable updates at a few active blocks.

    State (all in the state dict): `weight`, frozen, holds the effective weight base + `update_scale` x updates
    (materialized, so that forward and dX are one dense GEMM each; outside the active blocks it is bit-identical to
    the pretrained weight); `sdt_updates`, the one trainable parameter, fp32, (n_active, block_rows, block_cols),
    one slot per active block; `sdt_block_ids` (n_active,), each slot's row-major block id; `sdt_base`, the
    pretrained values of the active blocks in the weight's dtype, so that a dropped block returns exactly to them.
    The number of slots never changes, so parameter shapes, optimizer states and DDP buckets stay valid through
    topology changes.

    `weight` is rewritten at the active blocks by every forward in training mode (an optimizer step may have changed
    the updates since, and optimizers need not bump a parameter's version counter), and otherwise by the first
    forward or `state_dict()` after training or after the updates, block ids or base values were replaced; by every
    forward under torch.compile.

    Args:
        base_layer (`nn.Linear` or `Conv1D`): the pretrained layer; its parameters are reused (and frozen).
        block_size (`tuple[int, int]`): block (rows, cols) in the (out, in) layout.
        block_ids (`torch.Tensor`): (n_active,) distinct row-major ids of the trainable blocks.
        backend (`str`): `"auto"`, `"triton"`, `"torch"` or `"reference"`, see `SDTConfig.backend`.
        update_scale (`float`): the factor of the updates in the effective weight, see `SDTConfig.update_scale`.

    Example:
    >>> layer = SDTUpdateLinear(nn.Linear(8, 4), (2, 4), torch.tensor([0, 3]), "torch")
    >>> layer.sdt_updates.shape, layer.weight.requires_grad
    (torch.Size([2, 2, 4]), False)
    >>> layer(torch.randn(3, 8)).sum().backward()
    >>> layer.sdt_updates.grad.shape
    torch.Size([2, 2, 4])
    """

    def __init__(self, base_layer: nn.Module, block_size: tuple[int, int], block_ids: torch.Tensor, backend="auto",
                 update_scale: float = 1.0):  # fmt: skip
        super().__init__(base_layer, block_size, backend)
        self.update_scale = float(update_scale)
        check_block_ids(block_ids, self.grid)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = self.weight.device
        self.register_buffer("sdt_block_ids", block_ids.to(device=device, dtype=torch.int64).clone())
        self.register_buffer("sdt_base", gather_blocks(self.weight_out_in.detach(), self.sdt_block_ids, block_size))
        self.sdt_updates = nn.Parameter(torch.zeros(block_ids.numel(), *block_size, device=device))
        self._materialized: tuple = ()  # the state versions `weight` was last rewritten for
        self._stale = True  # a training-mode forward ran since: an optimizer may have changed the updates
        # A state dict (a checkpoint, save_pretrained) must hold the effective weight even right after an update.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.sync_weight_())

    @property
    def block_mask(self) -> torch.Tensor:
        return mask_of(self.sdt_block_ids, self.grid)

    @property
    def flops_fraction(self) -> float:
        return (2 + self.density) / 3  # forward and dX are dense, the weight gradient covers the active blocks

    def training_flops(self, tokens: int, need_x: bool = True, backward: bool = True) -> int:
        backend, shape = self._resolved_backend(), (self.out_features, self.in_features)
        if not backward or backend == "reference":  # the reference backend forms the dense weight gradient
            return self.dense_training_flops(tokens, need_x, backward)
        grad = compact_update_grad_flops(backend, self.sdt_block_ids, self.block_size, shape, tokens)
        return self.dense_training_flops(tokens, need_x, backward=False) * (1 + need_x) + grad

    def _versions(self) -> tuple:
        return tuple((t, tensor_version(t)) for t in (self.sdt_updates, self.sdt_block_ids, self.sdt_base))

    def _is_current(self, state: tuple) -> bool:
        return bool(state) and all(
            old[0] is new[0] and old[1] == new[1] for old, new in zip(state, self._versions(), strict=True)
        )

    def sync_weight_(self) -> None:
        """Rewrite the active blocks of `weight` unless they are known to be current (see the class docstring)."""
        if self.training or self._stale or not self._is_current(self._materialized):
            self.materialize_()
        self._stale = self.training

    def set_update_scale_(self, scale: float) -> None:
        """Set the factor of the updates in the effective weight (0 computes with the pretrained weight alone); the
        next forward rewrites the active blocks."""
        self.update_scale = float(scale)
        self._stale = True

    def materialize_(self) -> None:
        """Write base + updates into the active blocks of `weight` (of every shard, under FSDP2)."""
        self._write_effective_blocks_()
        self._materialized = self._versions()

    @torch.no_grad()
    def _write_effective_blocks_(self) -> None:
        updates = full_tensor(self.sdt_updates.detach())
        self._write_blocks_(self.sdt_base.float() + self.update_scale * updates, self.sdt_block_ids)

    def _write_blocks_(self, values: torch.Tensor, block_ids: torch.Tensor) -> None:
        local, offset = self.local_out_in(self.weight)
        shape = (self.out_features, self.in_features)
        scatter_blocks_(local, values, block_ids, self.block_size, shape, offset)

    @torch.no_grad()
    def move_blocks_(self, slots: torch.Tensor, new_block_ids: torch.Tensor) -> None:
        """Give `slots` to the blocks `new_block_ids` (inactive until now): the old blocks return exactly to their
        pretrained values, the new ones start with a zero update. The caller resets their optimizer state."""
        self._write_blocks_(self.sdt_base[slots], self.sdt_block_ids[slots])
        ids = self.sdt_block_ids.clone()
        ids[slots] = new_block_ids.to(ids)
        check_block_ids(ids, self.grid)
        self.sdt_block_ids.copy_(ids)
        local, offset = self.local_out_in(self.weight)
        shape = (self.out_features, self.in_features)
        base = gather_blocks(local, new_block_ids.to(ids), self.block_size, shape, offset)
        self.sdt_base[slots] = sum_over_shards(base, self.weight)
        zero_at_(self.sdt_updates, slots)
        self.materialize_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if torch.compiler.is_compiling():
            # A compiled graph cannot read version counters: it rewrites the active blocks on every call (density x
            # the weight's bytes), in place, and marks them stale so that the next eager call rewrites them too.
            self._write_effective_blocks_()
            self._stale = True
        else:
            self.sync_weight_()
        return sparse_update_linear(
            x, self.weight_out_in, self.bias, self.sdt_updates, self.sdt_block_ids, self.block_size, self.backend,
            self.update_scale,
        )  # fmt: skip

    @torch.no_grad()
    def unload(self, merge: bool = True) -> nn.Module:
        """The original layer class, with the updates merged into its weight (`merge=True`) or with the pretrained
        weight restored (`merge=False`)."""
        self.materialize_()
        if not merge:
            self._write_blocks_(self.sdt_base, self.sdt_block_ids)
        return self._base_layer_with(self.weight)
