"""Shared by the tests and the 2-process worker script: a tiny GPT-2 on a public-domain novel, its training and its
compiled run."""

import contextlib
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from hf_sdt import SDTConfig, SDTLinear, SDTUpdateLinear, get_sdt_model, sdt_layers
from hf_sdt.demo_data import ByteChunks
from hf_sdt.masks import topk_block_mask
from hf_sdt.trainer import SDTTrainer
from hf_sdt.training import ModelArguments, build_tokenizer


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # runs with different batch splits must agree
    return GPT2LMHeadModel(config)


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread, as the multi-process workers do (OMP_NUM_THREADS=1): a one-process reference
    then reduces in the same order as they do, instead of differing by float reordering that steps amplify."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    compact storage; "weights-budget": the density and schedule planned for a compute budget, on the blocked path so
    that the sparse steps are cheaper), then save this rank's state dict (`save_rank_state`) and its receipt."""
    from unittest import mock

    from hf_sdt.functional import dispatch

    if mode == "updates":
        config = make_updates_config(update_interval=3)
    elif mode == "weights-compact":
        config = make_config(grow_criterion="gradient", schedule="constant", update_interval=3)
    elif mode == "weights-budget":
        config = make_config(grow_criterion="gradient", update_interval=3, compute_budget=0.7, density=None)
    else:
        config = make_config(grow_criterion="gradient", schedule_end=0.3, update_interval=3)
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=training_args(f"{output_dir}/run", max_steps=12, per_device_train_batch_size=batch_size),
        train_dataset=ByteChunks(),
        sdt_config=config,
    )
    blocked_pays = (lambda layout, tokens, block: True) if mode == "weights-budget" else dispatch.blocked_path_pays
    with mock.patch.object(dispatch, "blocked_path_pays", blocked_pays):
        trainer.train()
    save_rank_state(trainer.model, output_dir, trainer.sdt_callback.controller.metrics()["sdt/train_flops_ratio"])


def save_rank_state(model: nn.Module, output_dir: str, receipt: float | None = None) -> None:
    """This rank's state dict (with the compute `receipt` under "receipt" when given) as `world{W}_rank{R}.pt` in
    `output_dir`."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    if receipt is not None:
        state["receipt"] = torch.tensor(receipt, dtype=torch.float64)
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


def trainable_weight(layer: nn.Module) -> nn.Parameter:
    """The parameter that trains a layer's weight: its own, its (dense or compact) store, or its updates."""
    if isinstance(layer, SDTUpdateLinear):
        return layer.sdt_updates
    return layer.weight_parameter if isinstance(layer, SDTLinear) else layer.weight


def change_topology(layer: nn.Module, seed: int) -> None:
    """What a drop/grow does to a layer between steps: other blocks, as many, changed in place."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, SDTUpdateLinear):
        inactive = (~layer.block_mask).flatten().nonzero().flatten().cpu()
        grown = inactive[torch.randperm(inactive.numel(), generator=generator)[:1]]
        device = layer.sdt_block_ids.device
        layer.move_blocks_(torch.tensor([0], device=device), grown.to(device))
        return
    scores = torch.rand(layer.sdt_mask.shape, generator=generator).to(layer.sdt_mask.device)
    new_mask = topk_block_mask(scores, int(layer.sdt_mask.sum()))
    layer.update_mask_(new_mask, int(new_mask.sum()))


def compiled_run(config: SDTConfig | None, device: str = "cpu") -> tuple[list, dict]:
    """Train steps (fwd+bwd, then a topology change and an SGD step) of a tiny GPT-2 compiled (fullgraph=True,
    aot_eager), SDT with `config` (dense if None), then a one-token inference call; returns (compiled, eager) pairs
    of outputs and gradients, and dynamo's graph counts."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_gpt2().to(device)
    if config is not None:
        model = get_sdt_model(model, config)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for step in range(3):
        pair = []
        for run in (compiled, model):  # compiled, then eager for comparison
            model.zero_grad()
            logits = run(ids).logits
            logits.square().mean().backward()
            pair.append((logits, trainable_weight(model.transformer.h[0].mlp.c_fc).grad))
        results += list(zip(*pair, strict=True))
        for layer in sdt_layers(model).values():
            change_topology(layer, step)
        with torch.no_grad():  # then the trainable tensors change in place, as an optimizer step changes them
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.sub_(parameter.grad, alpha=10.0)
    with torch.no_grad():
        results.append((compiled(ids[:, :1]).logits, model(ids[:, :1]).logits))
    return results, {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def assert_same_state(expected: dict, got: dict) -> None:
    """The same topology (masks, block ids) exactly, and the same values up to float reordering."""
    assert set(got) == set(expected)
    for key in expected:
        if key.endswith(("sdt_mask", "sdt_block_ids")):
            assert torch.equal(expected[key], got[key]), key
        else:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def save_tiny_llama(folder: Path) -> None:
    """A tiny Llama with a BPE tokenizer trained on the shipped excerpt, saved in `folder` (a stand-in for a Hub
    model)."""
    texts = (
        (Path(__file__).resolve().parents[1] / "hf_sdt" / "data" / "persuasion_excerpt.txt")
        .read_text(encoding="utf-8")
        .splitlines()
    )
    tokenizer = build_tokenizer(ModelArguments(tokenizer_vocab_size=512), texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# TRL's trainers on a tiny Llama (tests/test_trl_trainers.py and the 2-process SFT run)

WORDS = "the cat sat on mat dog ran to park a bird sang in tree user assistant : what did do ?".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"what did the {animal} do ?"},
                  {"role": "assistant", "content": f"the {animal} {action}"}]}
    for animal, action in [("cat", "sat on the mat"), ("dog", "ran to the park"), ("bird", "sang in a tree")]
] * 8  # fmt: skip
TEXTS = [{"text": "the cat sat on the mat"}, {"text": "the dog ran to the park"}, {"text": "a bird sang"}] * 8
PAIRS = [{"prompt": "what did the cat do ?", "chosen": "the cat sat on the mat", "rejected": "the dog ran"}] * 16


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `WORDS` with a chat template."""
    vocab = {word: index for index, word in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(WORDS) + 3, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return LlamaForCausalLM(config)


def sdt_config_for_trl(mode: str) -> SDTConfig:
    if mode == "updates":
        return SDTConfig(mode="updates", block_size=16, selection_steps=1, update_interval=2)
    return SDTConfig(density=0.5, block_size=16, schedule_end=0.3, update_interval=2, grow_criterion="random")


def sft_trainer(tmp_path, mode, data, max_steps=6, evaluate=False, trainer_class=None, **overrides):
    """An SDTSFTTrainer (TRL needed; or `trainer_class`) of a tiny Llama on conversations ("messages") or plain
    text ("text"), which it evaluates on too with `evaluate`."""
    import trl

    from hf_sdt import SDTSFTTrainer

    values = {"save_strategy": "no", "per_device_train_batch_size": 4, **overrides}
    args = trl.SFTConfig(
        str(tmp_path), max_steps=max_steps, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, max_length=32, disable_tqdm=True, seed=0, **values,
    )  # fmt: skip
    dataset = Dataset.from_list(CONVERSATIONS if data == "messages" else TEXTS)
    trainer_class = trainer_class or SDTSFTTrainer
    return trainer_class(tiny_llama(), args=args, train_dataset=dataset, eval_dataset=dataset if evaluate else None,
                         processing_class=word_tokenizer(), sdt_config=sdt_config_for_trl(mode))  # fmt: skip


def train_sft_and_save_state(output_dir: str, mode: str) -> None:
    """6 steps of SDTSFTTrainer on conversations, then save this rank's state dict (`save_rank_state`)."""
    trainer = sft_trainer(f"{output_dir}/run", mode, "messages", per_device_train_batch_size=2)
    trainer.train()
    save_rank_state(trainer.model, output_dir)


def two_cpu_processes() -> tuple[list[str], dict]:
    """The command prefix of `accelerate launch` with 2 CPU processes (DDP, gloo) on a free port, and its
    environment (one intra-op thread per process)."""
    import os
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip
    return launcher, {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def run_ddp_worker(output_dir, batch_size: int, mode: str) -> tuple[dict, dict]:
    """`tests/ddp_train.py` under `accelerate launch` with 2 CPU processes (DDP, gloo); their final state dicts."""
    import subprocess

    launcher, env = two_cpu_processes()
    command = [*launcher, str(Path(__file__).parent / "ddp_train.py"), str(output_dir), str(batch_size), mode]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # SDTTrainer sets DDP's find_unused_parameters from the model: no warning that it was needlessly on, and none
    # from the forward that finds it out
    for warning in ("find_unused_parameters=True was specified", "recommend passing in an `attention_mask`"):
        assert warning not in result.stderr, result.stderr[-4000:]
    return tuple(torch.load(Path(output_dir) / f"world2_rank{rank}.pt") for rank in (0, 1))
