"""Updates mode's controller: the gradient selection and drop/grow of the trainable update blocks."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import SDTConfig
from ..masks import block_norms, topk_block_mask
from ..schedule import drop_fraction_at, is_update_step
from ..sharding import full_tensor, is_sharded
from ..topology import drop_and_grow, reassign_slots
from ..update_layer import SDTUpdateLinear
from .base import (
    SDTController,
    _rank_zero_decision,
    _restored_share,
    _saved_sum,
    _summed_over_ranks,
    add_to,
    reset_optimizer_state,
)


class UpdatesController(SDTController):
    """Updates mode (SpIEL-style sparse fine-tuning with blocks): the trainable blocks are chosen (at random or by
    gradient: `grow_criterion`) and re-chosen during training; every weight outside them stays bit-identical to
    the pretrained weight.

    - Steps `0 .. selection_steps - 1` accumulate each block's gradient energy (squared Frobenius norm of the
      dense weight gradient, per micro-batch) and train nothing; at the end of step `selection_steps - 1` every
      layer's slots take its highest-energy blocks (with `grow_criterion="random"`: random blocks, and no dense
      gradient is taken at all).
    - Every `update_interval` steps after that, until `update_end`: the `drop_fraction_at(step)` share of each
      layer's slots with the smallest update norm is dropped (those blocks return exactly to their pretrained
      values) and as many inactive blocks with the largest energy, accumulated over the `selection_steps` steps
      before (random ones with random growth), are grown with a zero update and a fresh optimizer state.

    Dense weight gradients exist only on those accumulation steps: forward hooks of this controller compute them
    from each layer's input and output gradient and keep only block energies. Under DDP the energies are summed
    over ranks and rank 0's choice is broadcast.
    """

    mode = "updates"
    layer_class = SDTUpdateLinear
    topology_name = "sdt_block_ids"

    def __init__(
        self, model: nn.Module, config: SDTConfig, total_steps: int, step_sizes: Sequence[float] | None = None
    ):
        super().__init__(model, config, total_steps, step_sizes)
        self.grad_energy: dict[str, torch.Tensor] = {}  # layer -> (block-rows, block-cols) fp32
        self._warned_unused = False
        self._flops_ratio = self._step_flops_ratio = self._linear_flops()
        if total_steps <= self.first_selection_step:
            warnings.warn(
                f"SDT updates mode: training has {total_steps} steps but the first selection of blocks ends step "
                f"{self.first_selection_step} (selection_steps={config.selection_steps}): nothing would be trained. "
                "Lower SDTConfig.selection_steps or train longer.",
                stacklevel=3,
            )

    @property
    def first_selection_step(self) -> int:
        return self.config.selection_steps - 1

    def is_selection_step(self, step: int) -> bool:
        """Whether `step` ends with a choice of blocks: the first selection, then the drop/grow updates."""
        first = self.first_selection_step
        return step == first or (step > first and is_update_step(step, self.total_steps, self.config))

    def begin_step(self, step: int) -> None:
        """Set the step about to run; dense gradients are captured when a selection comes within `selection_steps`."""
        self.step = step
        if step >= self.config.update_end * self.total_steps and step > self.first_selection_step:
            self.churn = 0.0  # a frozen topology changes nothing
        window = range(step, step + self.config.selection_steps)
        self.capturing = self._by_gradient and any(self.is_selection_step(s) for s in window)
        self._step_flops_ratio = 1.0 if self.capturing else self._flops_ratio

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Before the first selection, keep the updates at zero; on selection steps, choose blocks."""
        start = time.perf_counter()
        if self.step < self.first_selection_step:
            for layer in self.layers.values():
                layer.sdt_updates.grad = None  # the placeholder blocks are never trained
        elif self.is_selection_step(self.step):
            self._select(optimizer, first=self.step == self.first_selection_step)
            self._count_update_time(start, updating=True)
        self.total_seconds += time.perf_counter() - start

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Under FSDP2, write the stepped updates into the frozen weights' shards (the weights a sharded layer
        gathers for its forward and again for its backward); otherwise each forward does it. Count this step's
        FLOPs."""
        for layer in self.layers.values():
            if is_sharded(layer.weight):
                layer.materialize_()
        super().after_optimizer_step()
        self.capturing = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "grad_energy": {name: _saved_sum(v) for name, v in self.grad_energy.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_layer_names(state["grad_energy"])
        super().load_state_dict(state)
        self.grad_energy = {
            name: _restored_share(value, self.layers[name].weight.device)
            for name, value in state["grad_energy"].items()
        }

    # -- internals ----------------------------------------------------------------------------------------------

    def _collecting(self, layer: SDTUpdateLinear, output: torch.Tensor) -> bool:
        return self.capturing and torch.is_grad_enabled() and output.requires_grad

    # Eager even under torch.compile: its backward hook writes to this controller, which a compiled graph cannot; it
    # runs on the few steps before a selection only, so the other steps stay one graph, and no step recompiles.
    @torch.compiler.disable
    def _collect(self, name: str, layer: SDTUpdateLinear, x: torch.Tensor, output: torch.Tensor) -> None:
        def accumulate(dense_grad: torch.Tensor) -> None:
            add_to(self.grad_energy, name, block_norms(dense_grad, layer.block_size).square())  # (block grid)

        self._take_dense_weight_grad(x, output, accumulate)

    @property
    def _by_gradient(self) -> bool:
        return self.config.grow_criterion == "gradient"

    def _grow_scores(self) -> dict[str, torch.Tensor]:
        """Each layer's block scores to choose and grow by: the accumulated gradient energy, or random (SET)."""
        if self._by_gradient:
            return {name: _summed_over_ranks(energy) for name, energy in self.grad_energy.items()}
        return {
            name: torch.rand(layer.block_mask.shape, generator=self.generator).to(layer.block_mask.device)
            for name, layer in self.layers.items()
        }

    def _select(self, optimizer, first: bool) -> None:
        unused = [name for name in self.layers if name not in self.grad_energy] if self._by_gradient else []
        if unused and not self._warned_unused:
            warnings.warn(
                f"SDT updates mode: no gradient reached {len(unused)} layer(s) ({unused[:3]}) in the steps before "
                f"the selection at step {self.step}; they keep their blocks. The step's forward must run after "
                "begin_step(step), with gradients enabled (this warning is shown once).",
                stacklevel=4,
            )
            self._warned_unused = True
        energies = self._grow_scores()
        update_norms = {
            name: full_tensor(self.layers[name].sdt_updates.detach()).flatten(1).norm(dim=1) for name in energies
        }
        # The updates' own gradients too: random growth takes no dense gradient that would show a NaN step.
        grads = {name: self.layers[name].sdt_updates.grad for name in energies}
        scores = {
            name: [energies[name], update_norms[name], None if grad is None else full_tensor(grad).norm()]
            for name, grad in grads.items()
        }
        if not self._all_finite(scores):
            self.grad_energy.clear()
            return
        fraction = 1.0 if first else drop_fraction_at(self.step, self.total_steps, self.config)
        moved = total = 0
        for name, layer in self.layers.items():
            total += layer.sdt_block_ids.numel()
            if name not in energies:
                continue
            ids, mask = layer.sdt_block_ids, layer.block_mask
            if first:
                chosen = topk_block_mask(energies[name], ids.numel(), self.generator)
                dropped, grown = mask & ~chosen, chosen & ~mask
            else:
                drop_scores = torch.zeros(mask.numel(), device=ids.device).index_put((ids,), update_norms[name])
                count = round(fraction * ids.numel())
                _, dropped, grown = drop_and_grow(
                    mask, drop_scores.view(mask.shape), energies[name], count, self.generator
                )
            slots, new_ids = reassign_slots(ids, dropped, grown)
            decided = _rank_zero_decision(ids.clone().index_put((slots,), new_ids))  # every slot's block
            slots = (decided != ids).nonzero().flatten()
            new_ids = decided[slots]
            if slots.numel():
                layer.move_blocks_(slots, new_ids)
                reset_optimizer_state(optimizer, layer.sdt_updates, slots)
            moved += slots.numel()
        self.churn = moved / max(total, 1)
        self.grad_energy.clear()
