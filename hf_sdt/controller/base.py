"""The controller both modes share: the three calls per optimizer step, metrics, resume state, the checks and
the collectives of distributed runs.

`SDTController(model, config, total_steps)` gives the controller of `config.mode`: a `WeightsController` (density
schedule, pruning, drop/grow of block-sparse weights) or an `UpdatesController` (gradient selection and drop/grow of
the trainable update blocks). Both hold the training-time state (schedule position, score accumulators, RNG), never
import `Trainer`, and take the same three calls per optimizer step:

    controller.begin_step(step)                 before the step's forward passes
    controller.before_optimizer_step(optimizer) once the gradients are complete (and synchronised, under DDP)
    controller.after_optimizer_step()           after optimizer.step()
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..compute import ComputeMeter, linear_flops
from ..config import SDTConfig
from ..model import mark_controlled, sdt_layers, weighted_mean
from ..sharding import zero_at_


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


def on_dense_weight_grad(x: torch.Tensor, output: torch.Tensor, accumulate) -> None:
    """Hand the dense (out, in) weight gradient dY^T X of one forward of a linear layer (every block, active or
    not; fp32) to `accumulate` during backward, computed from its input `x` (..., in) and the gradient of its
    `output` (..., out): the statistic that gradient growth (weights mode) and gradient selection (updates mode) read.

    Example:
        >>> layer, grads = nn.Linear(3, 2), []
        >>> x = torch.ones(4, 3)
        >>> output = layer(x)
        >>> on_dense_weight_grad(x, output, grads.append)
        >>> output.sum().backward()
        >>> grads[0]
        tensor([[4., 4., 4.],
                [4., 4., 4.]])
    """
    out_features, in_features = output.shape[-1], x.shape[-1]

    def hook(grad_out: torch.Tensor) -> None:
        grad_out = grad_out.reshape(-1, out_features).float()  # (T, out)
        accumulate(grad_out.t() @ x.reshape(-1, in_features).float())  # (out, in)

    output.register_hook(hook)


def add_to(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    """Accumulate a statistic: `store[name] += value`, starting from `value` (not in place: a tensor handed to a
    hook may be reused by autograd).

    Example:
        >>> store = {}
        >>> add_to(store, "layer", torch.ones(2)); add_to(store, "layer", torch.ones(2))
        >>> store["layer"]
        tensor([2., 2.])
    """
    store[name] = value + store[name] if name in store else value


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


def _checked_step_sizes(step_sizes: Sequence[float] | None, total_steps: int) -> tuple[float, ...] | None:
    if step_sizes is None:
        return None
    sizes = tuple(float(size) for size in step_sizes)
    wrong = [(step, size) for step, size in enumerate(sizes) if not (math.isfinite(size) and size > 0)]
    if len(sizes) != total_steps or wrong:
        found = f"{wrong[0][1]} at step {wrong[0][0]}" if wrong else f"{len(sizes)} values"
        raise ValueError(
            f"SDTController's step_sizes must hold one positive, finite size per training step ({total_steps} "
            f"steps), got {found}. Pass the sequences (or tokens) of each step, or leave step_sizes out for steps of "
            "equal size."
        )
    return sizes


class SDTController:
    """Runs SDT's schedule and topology updates on a model converted by `get_sdt_model`, in any training loop.

    `SDTController(model, config, total_steps)` returns the controller of `config.mode` (a `WeightsController` or
    an `UpdatesController`). Call `begin_step(step)` before the step's forward passes,
    `before_optimizer_step(optimizer)` once the gradients are complete (and synchronised, under DDP), and
    `after_optimizer_step()` after `optimizer.step()`. `metrics()` gives what `SDTTrainer` logs; `state_dict()` and
    `load_state_dict()` resume exactly. `step_sizes` (optional, one per step: its sequences or tokens) lets a
    compute budget's planner weigh the steps as the receipt will, when they differ in size (`SDTTrainer` passes the
    epochs' batch sizes, see `hf_sdt.budget.epoch_step_sizes`); without it the steps are taken to be equal.

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
    mode = ""  # the SDTConfig.mode a subclass runs
    _by_mode: dict[str, type[SDTController]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        SDTController._by_mode[cls.mode] = cls

    def __new__(cls, model: nn.Module, config: SDTConfig, total_steps: int, step_sizes: Sequence[float] | None = None):
        if cls is SDTController:
            cls = SDTController._by_mode[config.mode]
        return super().__new__(cls)

    def __init__(
        self, model: nn.Module, config: SDTConfig, total_steps: int, step_sizes: Sequence[float] | None = None
    ):
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
        mark_controlled(self.layers.values())
        self.config = config
        self.total_steps = max(1, total_steps)
        self.step_sizes = _checked_step_sizes(step_sizes, self.total_steps)
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.flops_ratio_sum = 0.0
        self.train_flops = 0  # the whole model's, this run's (see hf_sdt.compute) ...
        self.dense_train_flops = 0  # ... and the dense model's, over the steps done
        self.steps_done = 0
        self.churn = 0.0
        self.update_seconds = 0.0
        self.total_update_seconds = 0.0  # in topology changes
        self.total_seconds = 0.0  # in every call of this controller
        self.skipped_updates = 0
        self._warned_non_finite = False
        self._flops_ratio = 1.0  # linear FLOPs of a regular step vs dense, set by each mode
        self._step_flops_ratio = 1.0  # ... and of the step running now
        self.capturing = False  # whether this step's backward hands dense weight gradients to the controller
        self._hooks = [layer.register_forward_hook(self._statistics_hook(name)) for name, layer in self.layers.items()]
        self.compute = ComputeMeter(model)

    def begin_step(self, step: int) -> None:
        """Set the step about to run and prepare the statistics it must collect."""
        raise NotImplementedError

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Change the topology where the schedule says so, from the step's complete gradients."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Count this step's FLOPs (everything since the previous step: the micro-batches of gradient accumulation)."""
        self.flops_ratio_sum += self._step_flops_ratio
        actual, dense = self.compute.end_step()
        self.train_flops += actual
        self.dense_train_flops += dense
        self.compute.begin_step()
        self.steps_done += 1

    def close(self) -> None:
        """Detach the statistics and compute hooks from the model (at the end of training; metrics stay readable)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.compute.remove()

    def _statistics_hook(self, name: str):
        """The forward hook through which this controller collects `name`'s training statistics: a test of plain
        flags that torch.compile traces, then `_collect` (eager) on the steps that need statistics."""

        def hook(layer, inputs, output):
            if self._collecting(layer, output):
                self._collect(name, layer, inputs[0].detach(), output)

        return hook

    def _take_dense_weight_grad(self, x: torch.Tensor, output: torch.Tensor, accumulate) -> None:
        """`on_dense_weight_grad`, with its GEMM on the compute receipt (work the dense model would not do)."""
        on_dense_weight_grad(x, output, accumulate)
        self.compute.add(linear_flops(x.numel() // x.shape[-1], x.shape[-1], output.shape[-1]))

    def _collecting(self, layer: nn.Module, output: torch.Tensor) -> bool:
        """Whether this forward of `layer` feeds a statistic."""
        raise NotImplementedError

    def _collect(self, name: str, layer: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        """Record this forward's statistics of layer `name` (input x, and `output`, on which gradient hooks go)."""
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        """What `SDTTrainer` logs: density (fraction of the targeted weights active, or trainable); the compute
        receipt, the whole model's training FLOPs over the steps done against the dense model's
        (`train_flops_ratio`, see `hf_sdt.compute`); the targeted layers' FLOPs ratio of a regular step vs dense and
        their cumulative saving; churn and the last update's time."""
        ratio = self.train_flops / self.dense_train_flops if self.dense_train_flops else 1.0
        return {
            "sdt/density": self._density(),
            "sdt/train_flops_ratio": ratio,
            "sdt/train_flops_saved": 1.0 - ratio,
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
        "train_flops",
        "dense_train_flops",
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
