"""`SDTTrainer`: `transformers.Trainer` with Sparse-Dynamic Training, driven through `SDTCallback`; what it adds to
Trainer is `SDTTrainerMixin`, which TRL's trainers share (`hf_sdt.trl_trainers`).

`SDTCallback` calls the `SDTController` (see `hf_sdt.controller`) from Trainer's events:

    on_step_begin          -> controller.begin_step(step)
    on_pre_optimizer_step  -> controller.before_optimizer_step(opt)    (gradients are synchronised here)
    on_optimizer_step      -> controller.after_optimizer_step()
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torch.utils.data import BatchSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import has_length

from .budget import epoch_step_sizes
from .config import SDTConfig
from .controller import SDTController
from .model import get_sdt_model, sdt_layers, unused_trainable_parameters

logger = logging.getLogger(__name__)

SDT_STATE_NAME = "sdt_state.pt"


def _trainer_step_sizes(train_dataloader, args, max_steps: int) -> list[int] | None:
    """The sequences of each of Trainer's steps on one process, read off its data loader (`hf_sdt.budget.
    epoch_step_sizes`), so that a compute budget is planned for the epoch's smaller last batch too; None (equal steps)
    where they cannot be known: no length, several processes (accelerate then evens the batches out), or a batch
    sampler of another kind."""
    batch_sampler = getattr(train_dataloader, "batch_sampler", None)
    if args.world_size != 1 or type(batch_sampler) is not BatchSampler or not has_length(batch_sampler.sampler):
        return None
    if len(batch_sampler) == 0 or len(batch_sampler) != len(train_dataloader):
        return None
    return epoch_step_sizes(
        len(batch_sampler.sampler), batch_sampler.batch_size, batch_sampler.drop_last,
        args.gradient_accumulation_steps, max_steps,
    )  # fmt: skip


class SDTCallback(TrainerCallback):
    """Drives an `SDTController` from `Trainer`'s events (see the module docstring)."""

    def __init__(self, controller_factory):
        self.controller_factory = controller_factory
        self.controller: SDTController | None = None
        self.pending_state: dict | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        step_sizes = _trainer_step_sizes(train_dataloader, args, state.max_steps)
        self.controller = self.controller_factory(model, state.max_steps, step_sizes)
        if self.pending_state is not None:
            self.controller.load_state_dict(self.pending_state)
            self.pending_state = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.controller.before_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.controller.after_optimizer_step()

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.close()

    def on_save(self, args, state, control, **kwargs):
        if self.controller is None:
            return
        sdt_state = self.controller.state_dict()  # on every process: it sums their statistics
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            torch.save(sdt_state, os.path.join(folder, SDT_STATE_NAME))


def converted_model(model, sdt_config: SDTConfig | None, trainer_name: str):
    """(the model converted with `sdt_config`, the config): a converted model keeps its layers and, unless
    `sdt_config` is given, its `model.config.sdt_config`."""
    if model is None or isinstance(model, str):
        raise ValueError(
            f"{trainer_name} needs a model instance (a transformers model, converted or not), got {model!r}; load "
            "it first, e.g. AutoModelForCausalLM.from_pretrained(name)."
        )
    if sdt_layers(model):
        stored = getattr(getattr(model, "config", None), "sdt_config", None)
        if sdt_config is None and stored is None:
            raise ValueError("The model has SDT layers but no config: pass sdt_config=SDTConfig(...).")
        return model, sdt_config or SDTConfig.from_dict(stored)
    if sdt_config is None:
        raise ValueError("Pass sdt_config=SDTConfig(...) to convert the model, or a converted model.")
    return get_sdt_model(model, sdt_config), sdt_config


class SDTTrainerMixin:
    """What SDT adds to a `Trainer` class, shared by `SDTTrainer` and TRL's trainers (`hf_sdt.trl_trainers`): the
    conversion (`sdt_config=`), the callback that runs the controller, the SDT metrics in every log, SDT's saving,
    loading, resuming and card. Put it first among the bases: `class MyTrainer(SDTTrainerMixin, Trainer)`."""

    def __init__(self, model=None, *trainer_args, sdt_config: SDTConfig | None = None, **kwargs):
        model, self.sdt_config = converted_model(model, sdt_config, type(self).__name__)
        super().__init__(model, *trainer_args, **kwargs)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                f"{type(self).__name__} does not support DeepSpeed yet: DeepSpeed consumes the gradients inside "
                "backward, before SDT's topology update can read them. Use FSDP2 (accelerate launch --config_file "
                "recipes/accelerate/fsdp2.yaml), DDP (accelerate launch --multi_gpu) or a single GPU."
            )
        self.sdt_callback = SDTCallback(
            lambda model, steps, step_sizes: SDTController(model, self.sdt_config, steps, step_sizes)
        )
        self.add_callback(self.sdt_callback)

    def _build_accelerator_args(self, **kwargs) -> dict:
        """DDP's `find_unused_parameters` from what the model needs, when `ddp_find_unused_parameters` is left unset:
        transformers turns it on for every model (a graph traversal each step, and a warning when nothing was
        unused); it stays on only when a forward leaves some trainable parameter out (`unused_trainable_parameters`)
        or nothing is known."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        ddp_kwargs = accelerator_args["kwargs_handlers"][0]
        decided_by_transformers = self.args.ddp_find_unused_parameters is None and ddp_kwargs.find_unused_parameters
        # accelerate's own test of FSDP (then the DDP flag is unused, and the probe's forward not worth its cost)
        fsdp = kwargs.get("fsdp_plugin") is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if decided_by_transformers and self.args.world_size > 1 and not fsdp:
            unused = unused_trainable_parameters(self.model)
            ddp_kwargs.find_unused_parameters = unused != []
            logger.info("DDP find_unused_parameters=%s (unused trainable parameters: %s)", unused != [], unused)
        return accelerator_args

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
        from .card import card_metrics_from_log, write_model_card
        from .hub import hub_base_model

        controller = self.sdt_callback.controller
        runtime = next((e["train_runtime"] for e in reversed(self.state.log_history) if "train_runtime" in e), None)
        base_model = kwargs.get("finetuned_from") or hub_base_model(self.model)
        write_model_card(
            self.model,
            self.args.output_dir,
            repo_id=self.hub_model_id
            if self.args.push_to_hub
            else model_name or os.path.abspath(self.args.output_dir),
            base_model=base_model,
            datasets=dataset_name,
            metrics=card_metrics_from_log(self.state.log_history),
            training_seconds=runtime,
            flops_saved=controller.metrics()["sdt/linear_flops_saved"] if controller else None,
            train_flops_ratio=controller.metrics()["sdt/train_flops_ratio"] if controller else None,
        )

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save with `hf_sdt.save_pretrained` (weights without masks plus `sdt_masks.safetensors`, so that vanilla
        transformers loads the weights silently; in updates mode the adapter only), the processing class and
        arguments."""
        if not self.args.should_save:
            return
        from .hub import save_pretrained

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_pretrained(self.accelerator.unwrap_model(self.model), output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Refresh the SDT card in the output folder, so that every intermediate push carries the current one."""
        self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the checkpoint's weights and masks (in updates mode, its adapter) and the SDT state beside them."""
        from .hub import load_checkpoint_

        load_checkpoint_(model if model is not None else self.model, resume_from_checkpoint)
        path = os.path.join(resume_from_checkpoint, SDT_STATE_NAME)
        if os.path.isfile(path):
            self.sdt_callback.pending_state = torch.load(path, weights_only=True)
        else:
            logger.warning("No %s in %s: the SDT schedule restarts its accumulators.", SDT_STATE_NAME, path)

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: load the best checkpoint's weights and masks (or adapter)."""
        from .hub import load_checkpoint_

        best = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_checkpoint_(self.model, best)


class SDTTrainer(SDTTrainerMixin, Trainer):
    """`transformers.Trainer` with Sparse-Dynamic Training: the same arguments plus `sdt_config`.

    A model without SDT layers is converted with `get_sdt_model(model, sdt_config)`; a model converted already
    keeps its layers (its `model.config.sdt_config` is used when `sdt_config` is omitted). The schedule and the
    drop/grow updates run after the gradients are synchronised and before each optimizer step; the SDT metrics
    (`sdt/density`, the compute receipt `sdt/train_flops_ratio` and `sdt/train_flops_saved` (see `hf_sdt.compute`),
    `sdt/linear_flops_ratio`, `sdt/linear_flops_saved`, `sdt/churn`, `sdt/update_seconds`) are logged with the loss,
    and the SDT state is saved in every checkpoint and restored by `train(resume_from_checkpoint=...)`.

    It runs under `accelerate launch` with DDP or FSDP2 (see `recipes/accelerate/`); DeepSpeed is refused.
    Checkpoints, `save_model()` and `push_to_hub()` save with `hf_sdt.save_pretrained`: in weights mode the dense
    weights (which vanilla transformers loads) and `sdt_masks.safetensors`; in updates mode (`SDTConfig(mode=
    "updates")`) the adapter only, about `density` of the targeted weights' size, with an adapter card.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> args = TrainingArguments("/tmp/sdt-doc", max_steps=2, report_to=[], use_cpu=True)
        >>> trainer = SDTTrainer(model=model, args=args, sdt_config=SDTConfig(density=0.5, block_size=16))
        >>> len(sdt_layers(trainer.model))
        4
    """
