"""Sparse-Dynamic Training during training: the density schedule and drop/grow updates, and `SDTTrainer`.

`SDTController` holds the training-time state (schedule position, score accumulators, RNG) and works in any
loop; `SDTTrainer` drives it from `transformers.Trainer` through `SDTCallback`:

    on_step_begin          -> controller.begin_step(step)              (layers told whether this is an update step)
    on_pre_optimizer_step  -> controller.before_optimizer_step(opt)    (gradients are synchronised here)
    on_optimizer_step      -> controller.after_optimizer_step()        (inactive weights back to exactly zero)
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback

from .config import SDTConfig
from .masks import block_element_counts
from .model import get_sdt_model, sdt_layers
from .schedule import density_at, drop_fraction_at, is_update_step, target_block_counts
from .topology import block_abs_sums, drop_and_grow, global_block_counts, keep_top, prune_scores

logger = logging.getLogger(__name__)

SDT_STATE_NAME = "sdt_state.pt"


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP2 DTensor) one, the tensor itself otherwise."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SDTController:
    """Runs SDT's schedule and topology updates on a model converted by `get_sdt_model`, in any training loop.

    Call `begin_step(step)` before the step's forward passes, `before_optimizer_step(optimizer)` once the gradients
    are complete (and synchronised, under DDP), and `after_optimizer_step()` after `optimizer.step()`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
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
        >>> round(controller.metrics()["sdt/density"], 2)
        0.5
    """

    def __init__(self, model: nn.Module, config: SDTConfig, total_steps: int):
        self.layers = sdt_layers(model)
        if not self.layers:
            raise ValueError("The model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, config).")
        self.config = config
        self.total_steps = max(1, total_steps)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.taylor: dict[str, torch.Tensor] = {}
        self.flops_ratio_sum = 0.0
        self.steps_done = 0
        self.churn = 0.0
        self.update_seconds = 0.0
        self.total_update_seconds = 0.0  # in mask changes (pruning to the schedule, drop/grow)
        self.total_seconds = 0.0  # in every call of this controller, the per-step mask application included
        self.skipped_updates = 0
        self._warned_non_finite = False
        self._target_density: float | None = None
        self._counts: list[int] = []
        self._scores: dict[str, torch.Tensor] | None = None  # this step's prune scores, see _step_prune_scores
        # Kept on the host so that a regular step never reads a mask back from the GPU.
        self._active_counts = [int(layer.sdt_mask.sum()) for layer in self.layers.values()]
        self._flops_ratio = self._measure_flops_ratio()
        self._step_flops_ratio = self._flops_ratio
        for layer in self.layers.values():
            layer.track_input_norms = config.prune_criterion == "wanda"

    # -- the three calls of a training step -------------------------------------------------------------------

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
            seconds = time.perf_counter() - start
            self.total_update_seconds += seconds
            if updating:
                self.update_seconds = seconds
        self._scores = None
        self.total_seconds += time.perf_counter() - start

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Zero the weights outside the masks (whatever the optimizer did) and count this step's FLOPs."""
        start = time.perf_counter()
        for layer in self.layers.values():
            layer.apply_mask_()
        self.flops_ratio_sum += self._step_flops_ratio
        self.steps_done += 1
        for layer in self.layers.values():
            layer.capture_dense_grad = False
            layer.dense_grad = None
        self.total_seconds += time.perf_counter() - start

    # -- metrics and state --------------------------------------------------------------------------------------

    def _measure_flops_ratio(self) -> float:
        elements = [layer.out_features * layer.in_features for layer in self.layers.values()]
        active = sum(layer.density * size for layer, size in zip(self.layers.values(), elements, strict=True))
        return active / sum(elements)

    def metrics(self) -> dict[str, float]:
        """What `SDTTrainer` logs: density, current FLOPs ratio, cumulative FLOPs saved, churn, update time."""
        ratio = self._flops_ratio
        return {
            "sdt/density": ratio,
            "sdt/linear_flops_ratio": ratio,
            "sdt/linear_flops_saved": 1.0 - self.flops_ratio_sum / self.steps_done if self.steps_done else 0.0,
            "sdt/churn": self.churn,
            "sdt/update_seconds": self.update_seconds,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; the masks themselves live in the model's state dict."""
        return {
            "step": self.step,
            "generator": self.generator.get_state(),
            "taylor": {name: value.cpu() for name, value in self.taylor.items()},
            "input_sq_norm": {
                name: layer.input_sq_norm.cpu()
                for name, layer in self.layers.items()
                if layer.input_sq_norm is not None
            },
            "flops_ratio_sum": self.flops_ratio_sum,
            "steps_done": self.steps_done,
            "churn": self.churn,
            "total_update_seconds": self.total_update_seconds,
            "total_seconds": self.total_seconds,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; layer names must match this model's SDT layers."""
        unknown = (set(state["taylor"]) | set(state["input_sq_norm"])) - set(self.layers)
        if unknown:
            raise ValueError(f"The SDT state names layers this model does not have: {sorted(unknown)[:5]}.")
        self.step = state["step"]
        self.generator.set_state(state["generator"])
        self.taylor = {name: value.to(self.layers[name].weight.device) for name, value in state["taylor"].items()}
        for name, value in state["input_sq_norm"].items():
            self.layers[name].input_sq_norm = value.to(self.layers[name].weight.device)
        self.flops_ratio_sum = state["flops_ratio_sum"]
        self.steps_done = state["steps_done"]
        self.churn = state["churn"]
        self.total_update_seconds = state["total_update_seconds"]
        self.total_seconds = state["total_seconds"]
        self.skipped_updates = state["skipped_updates"]

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
            if layer.weight.grad is None:
                continue
            grad = _full(layer.weight.grad)
            weight = _full(layer.weight)
            if layer.is_conv1d:
                grad, weight = grad.t(), weight.t()
            sums = block_abs_sums(weight * grad, layer.block_size)
            self.taylor[name] = sums if name not in self.taylor else self.taylor[name] + sums

    def _step_prune_scores(self) -> dict[str, torch.Tensor]:
        """Every layer's prune scores for this step, computed once (global counts and the update both use them;
        they are taken before any mask of the step changes)."""
        if self._scores is None:
            self._scores = {name: self._prune_scores(name, layer) for name, layer in self.layers.items()}
        return self._scores

    def _prune_scores(self, name: str, layer) -> torch.Tensor:
        input_sq_norm = layer.input_sq_norm
        if input_sq_norm is not None and _distributed():
            input_sq_norm = input_sq_norm.clone()
            dist.all_reduce(input_sq_norm)
        return prune_scores(
            self.config.prune_criterion,
            _full(layer.weight_out_in),
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
        dense_grad = _full(layer.dense_grad)
        if _distributed():
            dense_grad = dense_grad.clone()
            dist.all_reduce(dense_grad)
        return prune_scores("magnitude", dense_grad, layer.block_size)

    def _change_topology(self, optimizer, counts: list[int], prune: bool, drop_grow: bool) -> None:
        fraction = drop_fraction_at(self.step, self.total_steps, self.config)
        plans = {}
        step_scores = self._step_prune_scores()
        for (name, layer), count in zip(self.layers.items(), counts, strict=True):
            scores = step_scores[name]
            grow = self._grow_scores(layer) if drop_grow else None
            if not torch.isfinite(scores).all() or (grow is not None and not torch.isfinite(grow).all()):
                self._skip_non_finite(name)
                return
            plans[name] = (scores, grow, count)
        grown_total = 0
        for index, (name, (scores, grow, count)) in enumerate(plans.items()):
            layer = self.layers[name]
            mask = layer.sdt_mask
            if prune and self._active_counts[index] > count:
                mask = keep_top(mask, scores, count, self.generator)
            active = min(count, self._active_counts[index])
            if drop_grow:
                mask, _, _ = drop_and_grow(mask, scores, grow, round(fraction * active), self.generator)
            if _distributed():  # every rank takes rank 0's decision, so masks can never drift apart
                shared = mask.to(torch.uint8)
                dist.broadcast(shared, src=0)
                mask = shared.bool()
            changed = mask ^ layer.sdt_mask
            grown_total += int((mask & ~layer.sdt_mask).sum())
            self._active_counts[index] = active
            layer.update_mask_(mask, active)
            _reset_block_state(optimizer, layer, changed)
        self._flops_ratio = self._measure_flops_ratio()
        if drop_grow:
            self.churn = grown_total / max(sum(self._active_counts), 1)
            self.taylor.clear()
            for layer in self.layers.values():
                layer.input_sq_norm = None

    def _skip_non_finite(self, name: str) -> None:
        self.skipped_updates += 1
        if not self._warned_non_finite:
            warnings.warn(
                f"SDT: non-finite scores in layer {name!r} at step {self.step} (NaN or inf gradients or weights); "
                "the topology update is skipped and training goes on. Lower the learning rate or clip gradients "
                "if this repeats (this warning is shown once).",
                stacklevel=3,
            )
            self._warned_non_finite = True


def _reset_block_state(optimizer: torch.optim.Optimizer | None, layer, changed_blocks: torch.Tensor) -> None:
    """Zero, in the blocks that were dropped or grown, the pending gradient (computed under the old mask) and every
    per-parameter optimizer state shaped like the weight (AdamW moments, momentum buffers): grown blocks start
    fresh and dropped ones carry nothing into the optimizer step that follows."""
    element_mask = layer.storage_element_mask(changed_blocks)
    state = optimizer.state.get(layer.weight, {}) if optimizer is not None else {}
    tensors = [layer.weight.grad, *state.values()]
    for value in tensors:
        if isinstance(value, torch.Tensor) and value.shape == layer.weight.shape:
            value.masked_fill_(element_mask.to(value.device), 0)


class SDTCallback(TrainerCallback):
    """Drives an `SDTController` from `Trainer`'s events (see the module docstring)."""

    def __init__(self, controller_factory):
        self.controller_factory = controller_factory
        self.controller: SDTController | None = None
        self.pending_state: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.controller = self.controller_factory(model, state.max_steps)
        if self.pending_state is not None:
            self.controller.load_state_dict(self.pending_state)
            self.pending_state = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.controller.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.controller.after_optimizer_step()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and self.controller is not None:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                torch.save(self.controller.state_dict(), os.path.join(folder, SDT_STATE_NAME))


class SDTTrainer(Trainer):
    """`transformers.Trainer` with Sparse-Dynamic Training: the same arguments plus `sdt_config`.

    A model without SDT layers is converted with `get_sdt_model(model, sdt_config)`; a model converted already
    keeps its layers (its `model.config.sdt_config` is used when `sdt_config` is omitted). The schedule and the
    drop/grow updates run after the gradients are synchronised and before each optimizer step; the SDT metrics
    (`sdt/density`, `sdt/linear_flops_ratio`, `sdt/linear_flops_saved`, `sdt/churn`, `sdt/update_seconds`) are
    logged with the loss, and the SDT state is saved in every checkpoint and restored by
    `train(resume_from_checkpoint=...)`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> args = TrainingArguments("/tmp/sdt-doc", max_steps=2, report_to=[], use_cpu=True)
        >>> trainer = SDTTrainer(model=model, args=args, sdt_config=SDTConfig(density=0.5, block_size=16))
        >>> len(sdt_layers(trainer.model))
        4
    """

    def __init__(self, model=None, args=None, *trainer_args, sdt_config: SDTConfig | None = None, **kwargs):
        if model is None:
            raise ValueError("SDTTrainer needs a model (a transformers model, converted or not).")
        if sdt_layers(model):
            stored = getattr(getattr(model, "config", None), "sdt_config", None)
            if sdt_config is None and stored is None:
                raise ValueError("The model has SDT layers but no config: pass sdt_config=SDTConfig(...).")
            sdt_config = sdt_config or SDTConfig.from_dict(stored)
        else:
            if sdt_config is None:
                raise ValueError("Pass sdt_config=SDTConfig(...) to convert the model, or a converted model.")
            model = get_sdt_model(model, sdt_config)
        self.sdt_config = sdt_config
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "SDTTrainer does not support DeepSpeed yet: DeepSpeed consumes the gradients inside backward, before "
                "SDT's topology update can read them. Use DDP (accelerate launch --multi_gpu) or a single GPU."
            )
        self.sdt_callback = SDTCallback(lambda model, steps: SDTController(model, self.sdt_config, steps))
        self.add_callback(self.sdt_callback)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the SDT metrics to every training log."""
        controller = self.sdt_callback.controller
        if controller is not None and "loss" in logs:
            logs.update(controller.metrics())
        super().log(logs, start_time)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Write hf_sdt's card (summary table, density chart, mask picture) instead of Trainer's generic one."""
        if not self.is_world_process_zero():
            return
        from .hub import card_metrics_from_log, write_model_card

        controller = self.sdt_callback.controller
        runtime = next((e["train_runtime"] for e in reversed(self.state.log_history) if "train_runtime" in e), None)
        source = getattr(self.model.config, "_name_or_path", "")
        base_model = kwargs.get("finetuned_from") or (source if source and not os.path.exists(source) else None)
        write_model_card(
            self.model,
            self.args.output_dir,
            repo_id=self.hub_model_id
            if self.args.push_to_hub
            else model_name or os.path.basename(self.args.output_dir),
            base_model=base_model,
            datasets=dataset_name,
            metrics=card_metrics_from_log(self.state.log_history),
            training_seconds=runtime,
            flops_saved=controller.metrics()["sdt/linear_flops_saved"] if controller else None,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Refresh the SDT card in the output folder, so that every intermediate push carries the current one."""
        self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Also read the SDT state saved beside the checkpoint's weights."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, SDT_STATE_NAME)
        if os.path.isfile(path):
            self.sdt_callback.pending_state = torch.load(path, weights_only=False)
        else:
            logger.warning("No %s in %s: the SDT schedule restarts its accumulators.", SDT_STATE_NAME, path)
