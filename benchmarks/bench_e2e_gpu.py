"""End-to-end training speed: `SDTTrainer` vs `Trainer` on a Llama-style model of about 1.1B parameters (TinyLlama's
shape, random init), synthetic tokens, bf16; training tokens per second and peak memory at each density, the GPU
name and date. Two tables: weights mode vs dense training, and fine-tuning (full fine-tuning vs LoRA vs SDT updates
mode at the same trainable parameters).

Each run builds a fresh model, trains `--warmup_steps` untimed steps (kernel compilation and autotuning), then
`--timed_steps` steps between two synchronised clock reads. The density is constant from step 0; drop/grow
updates run every `--update_interval` steps (those steps run the dense product for gradient growth), so a timed
window shorter than the interval measures the sparse steps only. Updates mode captures dense gradients for its
first selection during the first 5 steps, which the default warm-up covers.

    python benchmarks/bench_e2e_gpu.py --output benchmarks/results/gpu_e2e.md
    python benchmarks/bench_e2e_gpu.py --smoke          # a tiny model on the CPU: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time

import torch
from bench_finetune import lora_rank
from benchmark_report import finish_report
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_sdt import SDTConfig, SDTTrainer

LLAMA_1B = {
    "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
}  # fmt: skip
LLAMA_SMOKE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 64,
}  # fmt: skip


class SyntheticTokens(torch.utils.data.Dataset):
    """Random token sequences (labels = inputs): speed does not depend on the text."""

    def __init__(self, count: int, seq_len: int, vocab_size: int):
        self.tokens = torch.randint(vocab_size, (count, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class WindowClock(TrainerCallback):
    """Synchronised clock reads at the end of step `start` and of the last step."""

    def __init__(self, start: int):
        self.start, self.times = start, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (self.start, state.max_steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times[state.global_step] = time.perf_counter()


def tokens_per_second(model_shape: dict, method: str, density: float, args: argparse.Namespace, device) -> dict:
    """Train one fresh model with `method` ("dense": `Trainer`; "weights" or "updates": `SDTTrainer` in that mode;
    "lora": `Trainer` on a peft LoRA model with updates mode's trainable parameters at `density`) and time the
    window."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**model_shape))
    parameters = sum(p.numel() for p in model.parameters())
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank(model, density, args.block_size)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    steps = args.warmup_steps + args.timed_steps
    with tempfile.TemporaryDirectory() as folder:
        training_args = TrainingArguments(
            folder, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
            bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
            logging_steps=steps, disable_tqdm=True, dataloader_pin_memory=False,
        )  # fmt: skip
        common = {
            "model": model,
            "args": training_args,
            "train_dataset": SyntheticTokens(steps * args.batch_size, args.seq_len, model_shape["vocab_size"]),
            "callbacks": [clock := WindowClock(args.warmup_steps)],
        }
        if method in ("dense", "lora"):
            trainer = Trainer(**common)
        else:
            config = SDTConfig(mode=method, density=density, block_size=args.block_size, schedule="constant",
                               update_interval=args.update_interval)  # fmt: skip
            trainer = SDTTrainer(sdt_config=config, **common)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    seconds = clock.times[steps] - clock.times[args.warmup_steps]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "tokens_per_second": args.timed_steps * args.batch_size * args.seq_len / seconds,
        "peak_gib": peak,
        "parameters": parameters,
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--finetune_densities", type=float, nargs="+", default=[0.05], help="updates mode and LoRA")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--timed_steps", type=int, default=20)
    parser.add_argument("--update_interval", type=int, default=100)
    parser.add_argument("--output", help="write the table as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU for a few steps")
    args = parser.parse_args()
    model_shape = LLAMA_1B
    if args.smoke:
        model_shape, args.densities, args.finetune_densities, args.block_size = LLAMA_SMOKE, [0.25], [0.25], 16
        args.batch_size, args.seq_len, args.warmup_steps, args.timed_steps = 2, 32, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU (CPU)"
    dense = tokens_per_second(model_shape, "dense", 1.0, args, device)
    rows = [("Trainer (dense)", "1.0", dense)]
    rows += [
        ("SDTTrainer", str(d), tokens_per_second(model_shape, "weights", d, args, device)) for d in args.densities
    ]
    finetune = [("full fine-tuning (Trainer)", "1.0", dense)]
    for density in args.finetune_densities:
        finetune.append(
            ("SDT updates mode", str(density), tokens_per_second(model_shape, "updates", density, args, device))
        )
        finetune.append(
            (
                "LoRA, same trainable params",
                str(density),
                tokens_per_second(model_shape, "lora", density, args, device),
            )
        )
    lines = [
        f"{datetime.date.today()} | {gpu} | torch {torch.__version__} | Llama-style model of "
        f"{dense['parameters'] / 1e6:.1f}M parameters, "
        f"random init | batch {args.batch_size} x {args.seq_len} tokens | block {args.block_size} | "
        f"{args.timed_steps} timed steps after {args.warmup_steps} | update interval {args.update_interval}",
        "",
        "| run | density | tokens/s | speed-up vs Trainer | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, density, result in rows:
        lines.append(
            f"| {name} | {density} | {result['tokens_per_second']:.0f} | "
            f"{result['tokens_per_second'] / dense['tokens_per_second']:.2f}x | {result['peak_gib']:.1f} |"
        )
    lines += [
        "",
        "Fine-tuning (AdamW; the same model as pretrained weights):",
        "",
        "| run | density | trainable params | tokens/s | speed-up vs full | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, density, result in finetune:
        lines.append(
            f"| {name} | {density} | {result['trainable']:,} | {result['tokens_per_second']:.0f} | "
            f"{result['tokens_per_second'] / dense['tokens_per_second']:.2f}x | {result['peak_gib']:.1f} |"
        )
    finish_report(lines, args.output)


if __name__ == "__main__":
    main()
