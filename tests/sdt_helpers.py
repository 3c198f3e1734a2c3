"""Shared by the trainer tests and the 2-process worker script: a tiny GPT-2 on a public-domain novel."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from hf_sdt import SDTConfig
from hf_sdt.demo_data import ByteChunks
from hf_sdt.trainer import SDTTrainer


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # runs with different batch splits must agree
    return GPT2LMHeadModel(config)


def make_config(**overrides) -> SDTConfig:
    values = {
        "density": 0.25,
        "block_size": 16,
        "schedule_end": 0.4,
        "update_interval": 5,
        "update_end": 0.6,
        **overrides,
    }
    return SDTConfig(**values)


def training_args(output_dir, max_steps=40, **overrides) -> TrainingArguments:
    values = {
        "max_steps": max_steps,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    return TrainingArguments(str(output_dir), **values)


def make_updates_config(**overrides) -> SDTConfig:
    values = {"mode": "updates", "density": 0.25, "block_size": 16, "selection_steps": 2, "update_interval": 4}
    return SDTConfig(**{**values, **overrides})


def train_and_save_state(output_dir: str, batch_size: int, mode: str = "weights") -> None:
    """Train with SDTTrainer (12 steps, gradient growth or selection; "weights-compact": a constant schedule, so
    compact storage), then save this rank's state dict as
    `world{W}_rank{R}.pt` in `output_dir`."""
    import torch.distributed as dist

    if mode == "updates":
        config = make_updates_config(update_interval=3)
    elif mode == "weights-compact":
        config = make_config(grow_criterion="gradient", schedule="constant", update_interval=3)
    else:
        config = make_config(grow_criterion="gradient", schedule_end=0.3, update_interval=3)
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(f"{output_dir}/run", max_steps=12, per_device_train_batch_size=batch_size),
        train_dataset=ByteChunks(),
        sdt_config=config,
    )
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {key: value.detach().clone() for key, value in trainer.model.state_dict().items()}
    torch.save(state, f"{output_dir}/world{world}_rank{rank}.pt")


def controller_config(mode: str) -> SDTConfig:
    """The 12-step runs of the distributed tests: gradient growth, Taylor pruning and a gradual schedule in weights
    mode (a constant one, so compact storage, in "weights-compact"); gradient selection every 3 steps in updates
    mode."""
    if mode == "updates":
        return make_updates_config(update_interval=3)
    if mode == "weights-compact":  # a constant schedule: compact storage
        return make_config(grow_criterion="gradient", prune_criterion="taylor", schedule="constant", update_interval=3)
    return make_config(grow_criterion="gradient", prune_criterion="taylor", schedule_end=0.3, update_interval=3)


def train_with_controller(mode: str, steps: int = 12):
    """Train the tiny GPT-2 with `SDTController` in a plain AdamW loop, 8 sequences per step as 2 micro-batches of 4:
    one per process when 2 processes run it (the model sharded by FSDP2's `fully_shard`, each block and the root),
    both in turn in one process (the same gradients, and the same per-micro-batch block energies of updates mode).
    Returns the model and the 2 sequences whose logits the tests compare."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from hf_sdt import SDTController, get_sdt_model

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = controller_config(mode)
    model = get_sdt_model(tiny_gpt2(), config)
    if world > 1:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    controller = SDTController(model, config, steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    chunks = ByteChunks(length=32).chunks  # (N, 32)
    micro_batches = range(rank, 2, world)
    for step in range(steps):
        controller.begin_step(step)
        for part in micro_batches:
            batch = chunks[step * 8 + part * 4 : step * 8 + part * 4 + 4]  # (4, 32)
            (model(input_ids=batch, labels=batch).loss / len(micro_batches)).backward()
        controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()
    return model.eval(), chunks[-2:]
