"""Sparse-Dynamic Training in any training loop: the schedule and topology updates of both modes.

`SDTController(model, config, total_steps)` gives the controller of `config.mode`: a `WeightsController` (density
schedule, pruning, drop/grow of block-sparse weights) or an `UpdatesController` (gradient selection and drop/grow of
the trainable update blocks). Both hold the training-time state (schedule position, score accumulators, RNG), never
import `Trainer`, and take the same three calls per optimizer step:

    controller.begin_step(step)                 before the step's forward passes
    controller.before_optimizer_step(optimizer) once the gradients are complete (and synchronised, under DDP)
    controller.after_optimizer_step()           after optimizer.step()
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import SDTConfig
from .layer import SDTCompactLinear, SDTLinear, SDTUpdateLinear
from .masks import block_element_counts, block_norms, topk_block_mask
from .model import sdt_layers, weighted_mean
from .schedule import density_at, drop_fraction_at, is_update_step, target_block_counts
from .sharding import full_tensor, is_sharded, local_window, sum_over_shards, zero_at_
from .topology import block_abs_sums, drop_and_grow, global_block_counts, keep_top, prune_scores, reassign_slots


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of a distributed run (a copy), the tensor itself otherwise."""
    if not _distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def _rank_zero_decision(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank: every rank takes rank 0's decision, so topologies never drift apart."""
    if _distributed():
        tensor = tensor.clone()
        dist.broadcast(tensor, src=0)
    return tensor


def _saved_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A per-process accumulator as a checkpoint holds it: its sum over the processes (a collective), on the host."""
    return _summed_over_ranks(tensor).cpu()


def _restored_share(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A `_saved_sum` as this process's share of it: all of it on rank 0, zeros elsewhere, so that the next sum over
    the processes is the saved one plus what they accumulate after resuming."""
    tensor = tensor.to(device)
    return torch.zeros_like(tensor) if _distributed() and dist.get_rank() != 0 else tensor


def reset_optimizer_state(optimizer: torch.optim.Optimizer | None, parameter: nn.Parameter, where) -> None:
    """Zero, at `where` (a bool mask or an index of `parameter`), the pending gradient (computed under the old
    topology) and every per-parameter optimizer state shaped like the parameter (AdamW moments, momentum buffers):
    grown blocks start fresh and dropped ones carry nothing into the optimizer step that follows.

    Example:
        >>> parameter = nn.Parameter(torch.ones(3, 2))
        >>> parameter.grad = torch.ones(3, 2)
        >>> reset_optimizer_state(None, parameter, torch.tensor([0, 2]))
        >>> parameter.grad[:, 0].tolist()
        [0.0, 1.0, 0.0]
    """
    state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
    for value in (parameter.grad, *state.values()):
        if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
            zero_at_(value, where)  # the local shard of each, under FSDP2


class SDTController:
    """Runs SDT's schedule and topology updates on a model converted by `get_sdt_model`, in any training loop.

    `SDTController(model, config, total_steps)` returns the controller of `config.mode` (a `WeightsController` or
    an `UpdatesController`). Call `begin_step(step)` before the step's forward passes,
    `before_optimizer_step(optimizer)` once the gradients are complete (and synchronised, under DDP), and
    `after_optimizer_step()` after `optimizer.step()`. `metrics()` gives what `SDTTrainer` logs; `state_dict()` and
    `load_state_dict()` resume exactly.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_sdt import get_sdt_model
        >>> config = SDTConfig(density=0.5, block_size=16, update_interval=2)
        >>> model = get_sdt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), config)
        >>> controller = SDTController(model, config, total_steps=4)
        >>> optimizer = torch.optim.AdamW(model.parameters())
        >>> for step in range(4):
        ...     controller.begin_step(step)
        ...     model(input_ids=torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
        ...     controller.before_optimizer_step(optimizer)
        ...     optimizer.step(); optimizer.zero_grad()
        ...     controller.after_optimizer_step()
        >>> type(controller).__name__, round(controller.metrics()["sdt/density"], 2)
        ('WeightsController', 0.5)
    """

    layer_class: type = nn.Module
    topology_name = ""  # the layer buffer that holds the topology

    def __new__(cls, model: nn.Module, config: SDTConfig, total_steps: int):
        if cls is SDTController:
            cls = UpdatesController if config.mode == "updates" else WeightsController
        return super().__new__(cls)

    def __init__(self, model: nn.Module, config: SDTConfig, total_steps: int):
        self.layers = sdt_layers(model)
        if not self.layers:
            raise ValueError("The model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, config).")
        wrong = [name for name, layer in self.layers.items() if not isinstance(layer, self.layer_class)]
        if wrong:
            raise ValueError(
                f"SDTConfig.mode={config.mode!r} needs {self.layer_class.__name__} layers, but {wrong[0]!r} is a "
                f"{type(self.layers[wrong[0]]).__name__}: the model was converted in the other mode."
            )
        self._check_same_topology_on_every_rank()
        self.config = config
        self.total_steps = max(1, total_steps)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.flops_ratio_sum = 0.0
        self.steps_done = 0
        self.churn = 0.0
        self.update_seconds = 0.0
        self.total_update_seconds = 0.0  # in topology changes
        self.total_seconds = 0.0  # in every call of this controller
        self.skipped_updates = 0
        self._warned_non_finite = False
        self._flops_ratio = 1.0  # linear FLOPs of a regular step vs dense, set by each mode
        self._step_flops_ratio = 1.0  # ... and of the step running now

    def begin_step(self, step: int) -> None:
        """Set the step about to run and prepare the statistics it must collect."""
        raise NotImplementedError

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Change the topology where the schedule says so, from the step's complete gradients."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Count this step's FLOPs."""
        self.flops_ratio_sum += self._step_flops_ratio
        self.steps_done += 1

    def close(self) -> None:
        """Release what the controller attached to the model (at the end of training; metrics stay readable)."""

    def metrics(self) -> dict[str, float]:
        """What `SDTTrainer` logs: density (fraction of the targeted weights active, or trainable), the linear
        FLOPs ratio of a regular step vs dense, the cumulative FLOPs saved, churn and the last update's time."""
        return {
            "sdt/density": self._density(),
            "sdt/linear_flops_ratio": self._flops_ratio,
            "sdt/linear_flops_saved": 1.0 - self.flops_ratio_sum / self.steps_done if self.steps_done else 0.0,
            "sdt/churn": self.churn,
            "sdt/update_seconds": self.update_seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; the topology itself lives in the model's state dict. In a
        distributed run, call it on every process (it sums their statistics) and save rank 0's."""
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            **{key: getattr(self, key) for key in self._COUNTERS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        self.step = state["step"]
        self.generator.set_state(state["generator"])
        for key in self._COUNTERS:
            setattr(self, key, state[key])

    _COUNTERS = (
        "flops_ratio_sum",
        "steps_done",
        "churn",
        "total_update_seconds",
        "total_seconds",
        "skipped_updates",
    )

    def _density(self) -> float:
        return weighted_mean(self.layers.values(), "density")

    def _linear_flops(self) -> float:
        return weighted_mean(self.layers.values(), "flops_fraction")

    def _check_layer_names(self, names) -> None:
        unknown = set(names) - set(self.layers)
        if unknown:
            raise ValueError(f"The SDT state names layers this model does not have: {sorted(unknown)[:5]}.")

    def _check_same_topology_on_every_rank(self) -> None:
        """Refuse to start a distributed run whose processes hold different topologies (DDP broadcasts buffers when
        it wraps the model, FSDP2 does not): every later decision is rank 0's, and would not fit the others."""
        if not _distributed():
            return
        differs = torch.zeros(1, device=getattr(next(iter(self.layers.values())), self.topology_name).device)
        for layer in self.layers.values():
            topology = getattr(layer, self.topology_name)
            differs += not torch.equal(_rank_zero_decision(topology.to(torch.int64)), topology.to(torch.int64))
        if int(_summed_over_ranks(differs)):
            raise RuntimeError(
                "SDT: the processes hold different block masks or block ids. Create and convert the model the same "
                "way on every process (same weights, same SDTConfig.seed), e.g. call transformers.set_seed before "
                "building a model from scratch."
            )

    def _count_update_time(self, start: float, updating: bool) -> None:
        seconds = time.perf_counter() - start
        self.total_update_seconds += seconds
        if updating:
            self.update_seconds = seconds

    def _all_finite(self, named_scores: dict[str, list[torch.Tensor | None]]) -> bool:
        """Whether every score is finite; if not, count a skipped update and warn (once) naming the layer."""
        for name, scores in named_scores.items():
            if any(score is not None and not torch.isfinite(score).all() for score in scores):
                self.skipped_updates += 1
                if not self._warned_non_finite:
                    warnings.warn(
                        f"SDT: non-finite scores in layer {name!r} at step {self.step} (NaN or inf gradients or "
                        "weights); the topology update is skipped and training goes on. Lower the learning rate or "
                        "clip gradients if this repeats (this warning is shown once).",
                        stacklevel=4,
                    )
                    self._warned_non_finite = True
                return False
        return True


class WeightsController(SDTController):
    """Weights mode: prunes to the density schedule and, every `update_interval` steps until `update_end`, drops the
    lowest-scoring active blocks and grows the most promising ones (RigL); inactive weights stay exactly zero."""

    layer_class = SDTLinear
    topology_name = "sdt_mask"

    def __init__(self, model: nn.Module, config: SDTConfig, total_steps: int):
        super().__init__(model, config, total_steps)
        self.taylor: dict[str, torch.Tensor] = {}
        self._target_density: float | None = None
        self._counts: list[int] = []
        self._scores: dict[str, torch.Tensor] | None = None  # this step's prune scores, see _step_prune_scores
        # Kept on the host so that a regular step never reads a mask back from the GPU.
        self._active_counts = [int(layer.sdt_mask.sum()) for layer in self.layers.values()]
        self._flops_ratio = self._step_flops_ratio = self._linear_flops()
        for layer in self.layers.values():
            layer.track_input_norms = config.prune_criterion == "wanda"

    def begin_step(self, step: int) -> None:
        """Set the step about to run and tell the layers whether its backward must keep the dense gradient."""
        self.step = step
        if step >= self.config.update_end * self.total_steps:
            self.churn = 0.0  # a frozen topology changes nothing
        capture = self.config.grow_criterion == "gradient" and self._updating()
        for layer in self.layers.values():
            layer.capture_dense_grad = capture
        # This step computes with the masks as they are now (dense where the dense gradient is captured).
        self._step_flops_ratio = 1.0 if capture else self._flops_ratio

    @torch.no_grad()
    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Accumulate scores, then prune to the schedule and, on update steps, drop and grow blocks."""
        start = time.perf_counter()
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
        for layer in self.layers.values():
            layer.capture_dense_grad = False
            layer.dense_grad = None
        self.total_seconds += time.perf_counter() - start

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "taylor": {name: value.cpu() for name, value in self.taylor.items()},
            "input_sq_norm": {
                name: _saved_sum(layer.input_sq_norm)
                for name, layer in self.layers.items()
                if layer.input_sq_norm is not None
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_layer_names(set(state["taylor"]) | set(state["input_sq_norm"]))
        super().load_state_dict(state)
        self.taylor = {name: value.to(self.layers[name].sdt_mask.device) for name, value in state["taylor"].items()}
        for name, value in state["input_sq_norm"].items():
            self.layers[name].input_sq_norm = _restored_share(value, self.layers[name].sdt_mask.device)

    # -- internals ----------------------------------------------------------------------------------------------

    def _updating(self) -> bool:
        return is_update_step(self.step, self.total_steps, self.config)

    def _current_density_counts(self, density: float) -> list[int]:
        """Per-layer target counts at `density`, recomputed only when the density changes."""
        if density != self._target_density:
            self._target_density = density
            if self.config.distribution == "global":
                self._counts = self._global_counts(density)
            else:
                shapes = [(layer.out_features, layer.in_features) for layer in self.layers.values()]
                self._counts = target_block_counts(shapes, self.config.block_shape, density, self.config.distribution)
        return self._counts

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
            self.taylor[name] = sums if name not in self.taylor else self.taylor[name] + sums

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
        input_sq_norm = None if layer.input_sq_norm is None else _summed_over_ranks(layer.input_sq_norm)
        return prune_scores(
            self.config.prune_criterion,
            full_tensor(layer.weight_out_in),
            layer.block_size,
            taylor=self.taylor.get(name),
            input_sq_norm=input_sq_norm,
        )

    def _grow_scores(self, layer) -> torch.Tensor:
        if self.config.grow_criterion == "random":
            return torch.rand(layer.sdt_mask.shape, generator=self.generator).to(layer.sdt_mask.device)
        if layer.dense_grad is None:
            raise RuntimeError(
                "Gradient growth found no dense gradient: the step's forward must run after begin_step(step) and "
                "with gradients enabled."
            )
        return prune_scores("magnitude", _summed_over_ranks(layer.dense_grad), layer.block_size)

    def _change_topology(self, optimizer, counts: list[int], prune: bool, drop_grow: bool) -> None:
        fraction = drop_fraction_at(self.step, self.total_steps, self.config)
        step_scores = self._step_prune_scores()
        plans = {}
        for (name, layer), count in zip(self.layers.items(), counts, strict=True):
            plans[name] = (step_scores[name], self._grow_scores(layer) if drop_grow else None, count)
        if not self._all_finite({name: plan[:2] for name, plan in plans.items()}):
            return
        grown_total = 0
        for index, (name, (scores, grow, count)) in enumerate(plans.items()):
            layer = self.layers[name]
            mask = layer.sdt_mask
            if prune and self._active_counts[index] > count:
                mask = keep_top(mask, scores, count, self.generator)
            active = min(count, self._active_counts[index])
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
            for layer in self.layers.values():
                layer.input_sq_norm = None


class UpdatesController(SDTController):
    """Updates mode (SpIEL-style sparse fine-tuning with blocks): the trainable blocks are chosen by gradient and
    re-chosen during training; every weight outside them stays bit-identical to the pretrained weight.

    - Steps `0 .. selection_steps - 1` accumulate each block's gradient energy (squared Frobenius norm of the
      dense weight gradient, per micro-batch) and train nothing; at the end of step `selection_steps - 1` every
      layer's slots take its highest-energy blocks.
    - Every `update_interval` steps after that, until `update_end`: the `drop_fraction_at(step)` share of each
      layer's slots with the smallest update norm is dropped (those blocks return exactly to their pretrained
      values) and as many inactive blocks with the largest energy, accumulated over the `selection_steps` steps
      before, are grown with a zero update and a fresh optimizer state.

    Dense weight gradients exist only on those accumulation steps: forward hooks of this controller compute them
    from each layer's input and output gradient and keep only block energies. Under DDP the energies are summed
    over ranks and rank 0's choice is broadcast.
    """

    layer_class = SDTUpdateLinear
    topology_name = "sdt_block_ids"

    def __init__(self, model: nn.Module, config: SDTConfig, total_steps: int):
        super().__init__(model, config, total_steps)
        self.grad_energy: dict[str, torch.Tensor] = {}  # layer -> (block-rows, block-cols) fp32
        self.capturing = False
        self._warned_unused = False
        self._flops_ratio = self._step_flops_ratio = self._linear_flops()
        if total_steps <= self.first_selection_step:
            warnings.warn(
                f"SDT updates mode: training has {total_steps} steps but the first selection of blocks ends step "
                f"{self.first_selection_step} (selection_steps={config.selection_steps}): nothing would be trained. "
                "Lower SDTConfig.selection_steps or train longer.",
                stacklevel=3,
            )
        self._hooks = [layer.register_forward_hook(self._capture_hook(name)) for name, layer in self.layers.items()]

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
        self.capturing = any(self.is_selection_step(s) for s in window)
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

    def close(self) -> None:
        """Detach the gradient-capturing hooks from the model (at the end of training)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

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

    def _capture_hook(self, name: str):
        def hook(layer: SDTUpdateLinear, inputs, output):
            if self.capturing and torch.is_grad_enabled() and output.requires_grad:
                self._capture_energy(name, layer, inputs[0].detach(), output)

        return hook

    # Eager even under torch.compile: its backward hook writes to this controller, which a compiled graph cannot; it
    # runs on the few steps before a selection only, so the other steps stay one graph, and no step recompiles.
    @torch.compiler.disable
    def _capture_energy(self, name: str, layer: SDTUpdateLinear, x: torch.Tensor, output: torch.Tensor) -> None:
        def accumulate(grad_out: torch.Tensor) -> None:
            grad_out = grad_out.reshape(-1, layer.out_features).float()  # (T, out)
            dense_grad = grad_out.t() @ x.reshape(-1, layer.in_features).float()  # (out, in)
            energy = block_norms(dense_grad, layer.block_size).square()  # (block-rows, block-cols)
            self.grad_energy[name] = energy + self.grad_energy[name] if name in self.grad_energy else energy

        output.register_hook(accumulate)

    def _select(self, optimizer, first: bool) -> None:
        unused = [name for name in self.layers if name not in self.grad_energy]
        if unused and not self._warned_unused:
            warnings.warn(
                f"SDT updates mode: no gradient reached {len(unused)} layer(s) ({unused[:3]}) in the steps before "
                f"the selection at step {self.step}; they keep their blocks. The step's forward must run after "
                "begin_step(step), with gradients enabled (this warning is shown once).",
                stacklevel=4,
            )
            self._warned_unused = True
        energies = {name: _summed_over_ranks(energy) for name, energy in self.grad_energy.items()}
        update_norms = {
            name: full_tensor(self.layers[name].sdt_updates.detach()).flatten(1).norm(dim=1) for name in energies
        }
        if not self._all_finite({name: [energies[name], update_norms[name]] for name in energies}):
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
