"""Weights mode's controller: the density schedule, pruning and drop/grow of block-sparse weights."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..budget import plan_density, plan_schedule_end
from ..config import SDTConfig
from ..layer import SDTCompactLinear, SDTLinear
from ..masks import block_element_counts
from ..schedule import density_at, drop_fraction_at, is_update_step, target_block_counts
from ..sharding import full_tensor, local_window, sum_over_shards
from ..topology import block_abs_sums, drop_and_grow, global_block_counts, keep_top, prune_scores
from .base import (
    SDTController,
    _rank_zero_decision,
    _restored_share,
    _saved_sum,
    _summed_over_ranks,
    add_to,
    reset_optimizer_state,
)


class WeightsController(SDTController):
    """Weights mode: prunes to the density schedule and, every `update_interval` steps until `update_end`, drops the
    lowest-scoring active blocks and grows the most promising ones (RigL); inactive weights stay exactly zero. A
    `dense_tail` grows every block back (at zero) for the last steps."""

    mode = "weights"
    layer_class = SDTLinear
    topology_name = "sdt_mask"

    def __init__(
        self, model: nn.Module, config: SDTConfig, total_steps: int, step_sizes: Sequence[float] | None = None
    ):
        super().__init__(model, config, total_steps, step_sizes)
        self.taylor: dict[str, torch.Tensor] = {}  # layer -> (block-rows, block-cols) sums of |w * g|
        self.dense_grads: dict[str, torch.Tensor] = {}  # layer -> (out, in) fp32, summed over micro-batches
        self.input_sq_norms: dict[str, torch.Tensor] = {}  # layer -> (in,) fp32 squared input-feature norms
        self.track_input_norms = config.prune_criterion == "wanda"
        self._target_density: float | None = None
        self._counts: list[int] = []
        self._scores: dict[str, torch.Tensor] | None = None  # this step's prune scores, see _step_prune_scores
        # Kept on the host so that a regular step never reads a mask back from the GPU.
        self._active_counts = [int(layer.sdt_mask.sum()) for layer in self.layers.values()]
        self._flops_ratio = self._step_flops_ratio = self._linear_flops()
        # Set on the first step with a compute budget, and written into the model's stored config, which is saved.
        self.planned_schedule_end: float | None = None
        self.planned_density: float | None = None
        self._model_config = getattr(model, "config", None)

    def begin_step(self, step: int) -> None:
        """Set the step about to run and whether its backward must hand over the dense weight gradients."""
        self.step = step
        if step >= self.config.update_end * self.total_steps:
            self.churn = 0.0  # a frozen topology changes nothing
        self.capturing = self.config.grow_criterion == "gradient" and self._updating()
        # A step that captures the dense weight gradients is counted as dense.
        self._step_flops_ratio = 1.0 if self.capturing else self._flops_ratio

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Accumulate scores, then prune to the schedule and, on update steps, drop and grow blocks."""
        start = time.perf_counter()
        if self.config.compute_budget is not None and self.planned_schedule_end is None:
            self._plan_for_budget()
        self._scores = None
        if self.config.prune_criterion == "taylor":
            self._accumulate_taylor()
        counts = self._current_density_counts(density_at(self.step, self.total_steps, self.config))
        prune = counts != self._active_counts
        updating = self._updating()
        if prune or updating:
            self._change_topology(optimizer, counts, prune=prune, drop_grow=updating)
            self._count_update_time(start, updating)
        self._scores = None
        self.total_seconds += time.perf_counter() - start

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Zero the weights outside the masks (whatever the optimizer did) and count this step's FLOPs."""
        start = time.perf_counter()
        for layer in self.layers.values():
            layer.apply_mask_()
        super().after_optimizer_step()
        self.capturing = False
        self.dense_grads.clear()
        self.total_seconds += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        """The shared metrics, and with a compute budget what its planner chose: the end of the prune and the final
        density (`sdt/planned_schedule_end`, `sdt/planned_density`; planned or given)."""
        if self.planned_schedule_end is None:
            return super().metrics()
        plan = {"sdt/planned_schedule_end": self.planned_schedule_end, "sdt/planned_density": self.config.density}
        return {**super().metrics(), **plan}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "planned_schedule_end": self.planned_schedule_end,
            "planned_density": self.planned_density,
            "taylor": {name: value.cpu() for name, value in self.taylor.items()},
            "input_sq_norm": {name: _saved_sum(value) for name, value in self.input_sq_norms.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_layer_names(set(state["taylor"]) | set(state["input_sq_norm"]))
        super().load_state_dict(state)
        if state.get("planned_schedule_end") is not None:
            self._check_same_plan_kind(state.get("planned_density"))
            self._use_plan(state["planned_schedule_end"], state.get("planned_density"))
        self.taylor = {name: value.to(self.layers[name].sdt_mask.device) for name, value in state["taylor"].items()}
        self.input_sq_norms = {
            name: _restored_share(value, self.layers[name].sdt_mask.device)
            for name, value in state["input_sq_norm"].items()
        }

    # -- internals ----------------------------------------------------------------------------------------------

    def _collecting(self, layer: SDTLinear, output: torch.Tensor) -> bool:
        return (self.track_input_norms and layer.training) or (self.capturing and torch.is_grad_enabled())

    # Eager even under torch.compile: it runs on the few steps around a topology update only (every training step
    # with Wanda scores) and writes to this controller, which a compiled graph cannot; the regular steps stay one
    # graph, and no step recompiles.
    @torch.compiler.disable
    def _collect(self, name: str, layer: SDTLinear, x: torch.Tensor, output: torch.Tensor) -> None:
        if self.track_input_norms and layer.training:
            add_to(self.input_sq_norms, name, x.float().square().reshape(-1, layer.in_features).sum(0))  # (in,)
        if self.capturing and torch.is_grad_enabled() and output.requires_grad:
            self._take_dense_weight_grad(x, output, lambda dense_grad: add_to(self.dense_grads, name, dense_grad))

    def _plan_for_budget(self) -> None:
        """Plan the schedule for `compute_budget` from the first step's FLOPs (rank 0's, in a distributed run)."""
        share = self.compute.targeted_share()
        if share is None:
            raise RuntimeError(
                "SDTConfig.compute_budget plans the schedule from the FLOPs of the first training step, but no "
                "training forward was seen (a compiled first step, or no forward after begin_step(0)). Run the "
                "first step eagerly."
            )
        share = float(_rank_zero_decision(torch.tensor([share], dtype=torch.float64, device=self._device())))
        step_costs = self._step_costs()
        config = self.config
        if config.plans_density:
            density = plan_density(config, self.total_steps, share, step_costs, self.step_sizes)
            config = dataclasses.replace(config, density=density)
        end = plan_schedule_end(config, self.total_steps, share, step_costs, self.step_sizes)
        plan = torch.tensor([end, config.density], dtype=torch.float64, device=self._device())
        end, density = _rank_zero_decision(plan).tolist()
        self._use_plan(end, density if self.config.plans_density else None)

    def _step_costs(self):
        """density -> what this step's forwards and backwards of the targeted layers (as the first step ran them)
        cost with the schedule's block counts at that density, as a share of their dense cost; cached, since the
        planner asks for each step's density."""
        layers = list(self.layers.values())
        index = {id(layer): i for i, layer in enumerate(layers)}
        calls = [(index[id(layer)], *sizes) for layer, *sizes in self.compute.sdt_layer_calls()]
        dense = self.compute.targeted_dense_flops()

        @functools.cache
        def layer_cost(i: int, count: int, tokens: int, need_x: bool, backward: bool) -> int:
            return layers[i].training_flops_at(count, tokens, need_x, backward)

        @functools.cache
        def step_cost(density: float) -> float:
            counts = self._fixed_counts(density)
            return sum(layer_cost(i, counts[i], *sizes) for i, *sizes in calls) / dense

        return step_cost

    def _check_same_plan_kind(self, planned_density: float | None) -> None:
        """Refuse to resume a plan made for a density given in the config under a config that leaves it to the
        planner, or the other way round: the run would go on at a density it was not trained for."""
        planned = planned_density is not None
        if planned == self.config.plans_density:
            return
        saved = f"chose density {planned_density:.4g}" if planned else "was made for the density of its config"
        now = f"density={self.config.density}" if planned else "no density"
        raise ValueError(
            f"The checkpoint's compute-budget plan {saved}, but this SDTConfig has {now}. Resume with the SDTConfig "
            "the run was trained with (the checkpoint's config.json holds it under sdt_config)."
        )

    def _use_plan(self, schedule_end: float, density: float | None) -> None:
        """Run on the planned schedule (and the planned density, when the config leaves it to the planner)."""
        self.planned_schedule_end, self.planned_density = schedule_end, density
        plan = {"schedule_end": schedule_end, **({} if density is None else {"density": density})}
        self.config = dataclasses.replace(self.config, **plan)
        stored = getattr(self._model_config, "sdt_config", None)
        if isinstance(stored, dict):
            stored.update(plan)

    def _device(self) -> torch.device:
        return next(iter(self.layers.values())).sdt_mask.device

    def _updating(self) -> bool:
        return is_update_step(self.step, self.total_steps, self.config)

    def _current_density_counts(self, density: float) -> list[int]:
        """Per-layer target counts at `density`, recomputed only when the density changes."""
        if density != self._target_density:
            self._target_density = density
            if self.config.distribution == "global" and density < 1:
                self._counts = self._global_counts(density)
            else:  # at density 1 (the dense tail) every distribution has every block
                self._counts = self._fixed_counts(density)
        return self._counts

    def _fixed_counts(self, density: float) -> list[int]:
        """Per-layer counts at `density` by the uniform or ERK rule; the global distribution gets uniform ones (its
        own per-layer counts follow the scores, about the same total: the planner prices it so)."""
        shapes = [(layer.out_features, layer.in_features) for layer in self.layers.values()]
        distribution = "uniform" if self.config.distribution == "global" else self.config.distribution
        return target_block_counts(shapes, self.config.block_shape, density, distribution)

    def _global_counts(self, density: float) -> list[int]:
        layers = list(self.layers.values())
        total = max(len(layers), round(density * sum(layer.sdt_mask.numel() for layer in layers)))
        total = min(total, sum(self._active_counts))  # the schedule only prunes
        scores = [score.cpu() for score in self._step_prune_scores().values()]
        element_counts = [
            block_element_counts(layer.block_size, (layer.out_features, layer.in_features)) for layer in layers
        ]
        masks = [layer.sdt_mask.cpu() for layer in layers]
        return global_block_counts(scores, masks, element_counts, total)

    def _accumulate_taylor(self) -> None:
        for name, layer in self.layers.items():
            parameter = layer.weight_parameter
            if parameter.grad is None:
                continue
            # Under FSDP2 each process sums its shard; the block sums, not the weights, go over the network.
            sums = sum_over_shards(self._local_taylor_sums(layer, parameter), parameter)
            add_to(self.taylor, name, sums)

    @staticmethod
    def _local_taylor_sums(layer: SDTLinear, parameter: nn.Parameter) -> torch.Tensor:
        """Sum of |w * g| per block over the part of `parameter` this process holds, on the whole block grid."""
        if isinstance(layer, SDTCompactLinear):  # a slot per block: sum each slot, place it at its block
            (blocks, (first, *_)), (grad, _) = local_window(parameter), local_window(parameter.grad)
            ids = layer.sdt_block_ids[first : first + blocks.shape[0]]
            sums = torch.zeros(layer.sdt_mask.numel(), device=ids.device)
            return sums.index_put_((ids,), (blocks * grad).float().abs().sum((1, 2))).view(layer.sdt_mask.shape)
        (weight, offset), (grad, _) = layer.local_out_in(parameter), layer.local_out_in(parameter.grad)
        return block_abs_sums(weight * grad, layer.block_size, (layer.out_features, layer.in_features), offset)

    def _step_prune_scores(self) -> dict[str, torch.Tensor]:
        """Every layer's prune scores for this step, computed once (global counts and the update both use them;
        they are taken before any mask of the step changes)."""
        if self._scores is None:
            self._scores = {name: self._prune_scores(name, layer) for name, layer in self.layers.items()}
        return self._scores

    def _prune_scores(self, name: str, layer) -> torch.Tensor:
        input_sq_norm = self.input_sq_norms.get(name)
        input_sq_norm = None if input_sq_norm is None else _summed_over_ranks(input_sq_norm)
        return prune_scores(
            self.config.prune_criterion,
            full_tensor(layer.weight_out_in),
            layer.block_size,
            taylor=self.taylor.get(name),
            input_sq_norm=input_sq_norm,
        )

    def _grow_scores(self, name: str, layer) -> torch.Tensor:
        if self.config.grow_criterion == "random":
            return torch.rand(layer.sdt_mask.shape, generator=self.generator).to(layer.sdt_mask.device)
        if name not in self.dense_grads:
            raise RuntimeError(
                "Gradient growth found no dense gradient: the step's forward must run after begin_step(step) and "
                "with gradients enabled."
            )
        return prune_scores("magnitude", _summed_over_ranks(self.dense_grads[name]), layer.block_size)

    def _change_topology(self, optimizer, counts: list[int], prune: bool, drop_grow: bool) -> None:
        fraction = drop_fraction_at(self.step, self.total_steps, self.config)
        step_scores = self._step_prune_scores()
        plans = {}
        for (name, layer), count in zip(self.layers.items(), counts, strict=True):
            plans[name] = (step_scores[name], self._grow_scores(name, layer) if drop_grow else None, count)
        if not self._all_finite({name: plan[:2] for name, plan in plans.items()}):
            return
        grown_total = 0
        for index, (name, (scores, grow, count)) in enumerate(plans.items()):
            layer = self.layers[name]
            mask = layer.sdt_mask
            if prune and self._active_counts[index] > count:
                mask = keep_top(mask, scores, count, self.generator)
            elif count > self._active_counts[index]:  # only the dense tail raises a count: every block comes back
                mask = torch.ones_like(mask)
            active = count
            if drop_grow:
                mask, _, _ = drop_and_grow(mask, scores, grow, round(fraction * active), self.generator)
            mask = _rank_zero_decision(mask.to(torch.uint8)).bool()
            grown_total += int((mask & ~layer.sdt_mask).sum())
            self._active_counts[index] = active
            reset_optimizer_state(optimizer, *layer.update_mask_(mask, active))
        self._flops_ratio = self._linear_flops()
        if drop_grow:
            self.churn = grown_total / max(sum(self._active_counts), 1)
            self.taylor.clear()
            self.input_sq_norms.clear()
