"""Fine-tuning a pretrained model: full fine-tuning vs LoRA vs SDT updates mode, on quality, memory and speed.

Every method trains the same pretrained model on the same token sequences for the same steps with AdamW (linear
warm-up over the first 10% of the steps, then constant), in a plain PyTorch loop. LoRA (peft, all linear layers) gets
the rank whose trainable parameters match updates mode's at each density. Each method's learning rate is picked from
its grid by the loss on a validation split of the training text (never the test text); the picked rate is then run
with every seed and evaluated on the held-out test text.

Memory and speed are measured per method in a fresh process (one after the other, on a quiet machine): trainable
state (parameters + gradients + AdamW's two moments, fp32, plus updates mode's block indices and compact base
copy), peak RSS over the run, and the median whole-step time (forward, backward, SDT bookkeeping, optimizer).

    # SmolLM2-135M-Instruct (python recipes/prepare_smollm2.py models/smollm2-135m first)
    python benchmarks/bench_finetune.py --output benchmarks/results/finetune_smollm2.md
    python benchmarks/bench_finetune.py --smoke          # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from benchmark_report import finish_report
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_sdt
from hf_sdt import SDTConfig, SDTController, get_sdt_model, sdt_layers
from hf_sdt.schedule import target_block_counts

TRAIN_FILE = "hf_sdt/data/pride_and_prejudice.txt"
TEST_FILE = "hf_sdt/data/persuasion_excerpt.txt"
# Step times count from here: the first steps warm up, and updates mode trains nothing before its first selection
# (after selection_steps = 5 steps; with gradient growth they also capture dense gradients).
SETTLED = 6
LR_GRIDS = {"full": [3e-5, 1e-4], "lora": [3e-4, 1e-3], "updates": [3e-4, 1e-3]}


def token_blocks(tokenizer, path: str, seq_len: int, max_bytes: int | None = None) -> torch.Tensor:
    """The file's text tokenized and cut into (n, seq_len) sequences."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()[:max_bytes]
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def load_model(args) -> torch.nn.Module:
    if args.smoke:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        return LlamaForCausalLM(config)
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)


def lora_rank(model: torch.nn.Module, density: float, block_size: int) -> int:
    """The LoRA rank over all linear layers (but the output layer) whose trainable parameters are closest to those of
    updates mode at `density`: `max(1, round(density * n_blocks))` blocks of `block_size`^2 per layer."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()]
    shapes = [(m.out_features, m.in_features) for m in linears]
    budget = sum(target_block_counts(shapes, (block_size, block_size), density, "uniform")) * block_size**2
    return max(1, round(budget / sum(m.in_features + m.out_features for m in linears)))


def prepare(method: str, model: torch.nn.Module, args, density: float, seed: int):
    """The model to train for `method`, and the SDT controller (updates mode) or None."""
    if method == "full":
        return model, None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank(model, density, args.block_size)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")), None
    config = SDTConfig(mode="updates", density=density, block_size=args.block_size, seed=seed)
    model = get_sdt_model(model, config)
    return model, SDTController(model, config, total_steps=args.steps)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [model(input_ids=blocks[i : i + batch], labels=blocks[i : i + batch]).loss.item()
              for i in range(0, len(blocks), batch)]  # fmt: skip
    model.train()
    return statistics.mean(losses)


def train(method: str, lr: float, density: float, seed: int, data: dict, args, evaluate: bool = True) -> dict:
    """One run; returns the validation and test losses (with `evaluate`), trainable parameters and step times."""
    model, controller = prepare(method, load_model(args), args, density, seed)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(seed))
    step_seconds = []
    for step in range(args.steps):
        start = time.perf_counter()
        picks = order[(step * args.batch + torch.arange(args.batch)) % len(order)]
        batch = data["train"][picks]  # (B, T)
        if controller:
            controller.begin_step(step)
        model(input_ids=batch, labels=batch).loss.backward()
        if controller:
            controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if controller:
            controller.after_optimizer_step()
        step_seconds.append(time.perf_counter() - start)
    result = {
        "method": method, "lr": lr, "density": density, "seed": seed,
        "trainable": sum(p.numel() for p in parameters),
        "step_seconds": step_seconds,
        "state_bytes": trainable_state_bytes(model, parameters),
    }  # fmt: skip
    if evaluate:
        result["validation_loss"] = mean_loss(model, data["validation"], args.batch)
        result["test_loss"] = mean_loss(model, data["test"], args.batch)
    if controller:
        result["linear_flops_saved"] = controller.metrics()["sdt/linear_flops_saved"]
    if not evaluate:
        result["checkpoint_bytes"] = checkpoint_bytes(model)
    return result


def checkpoint_bytes(model) -> int:
    """Bytes on disk of what each method saves: the whole model (full), the peft adapter (LoRA), the SDT adapter."""
    with tempfile.TemporaryDirectory() as folder:
        if sdt_layers(model):
            hf_sdt.save_pretrained(model, folder)
        else:
            model.save_pretrained(folder)
        return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))


def trainable_state_bytes(model, parameters) -> int:
    """Parameters + gradients + AdamW's two moments (fp32), plus what updates mode keeps beside its updates."""
    state = sum(4 * p.numel() * 4 for p in parameters)
    for layer in sdt_layers(model).values():
        state += layer.sdt_block_ids.numel() * 8 + layer.sdt_base.numel() * layer.sdt_base.element_size()
    return state


def load_data(args) -> dict:
    if args.smoke:
        generator = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, args.vocab, (48, args.seq_len), generator=generator)
        return {"train": blocks[:32], "validation": blocks[32:40], "test": blocks[40:]}
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = token_blocks(tokenizer, TRAIN_FILE, args.seq_len)
    held_out = 32  # the novel's last sequences pick the learning rates
    test = token_blocks(tokenizer, TEST_FILE, args.seq_len, max_bytes=args.test_bytes)
    return {"train": train[:-held_out], "validation": train[-held_out:], "test": test}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent process)."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def measure_in_subprocess(method: str, lr: float, density: float, args) -> dict:
    """Peak RSS and step times of one short run in a fresh process (a process's peak never goes down)."""
    settings = ["--model", args.model, "--batch", str(args.batch), "--seq_len", str(args.seq_len),
                "--block_size", str(args.block_size), "--measure_steps", str(args.measure_steps)]  # fmt: skip
    command = [sys.executable, __file__, "--measure", method, str(lr), str(density), *settings]
    command += ["--smoke"] if args.smoke else []
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/smollm2-135m")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.02])
    parser.add_argument("--lora_densities", type=float, nargs="+", default=[0.05], help="LoRA at these budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--block_size", type=int, default=SDTConfig(mode="updates").block_shape[0])
    parser.add_argument("--test_bytes", type=int, default=20_000)
    parser.add_argument("--measure_steps", type=int, default=10, help="steps of each memory / speed run")
    parser.add_argument("--output")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--measure", nargs=3, metavar=("METHOD", "LR", "DENSITY"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--remeasure", metavar="JSON",
        help="redo only the memory / speed / checkpoint runs of a finished run's .json twin and rewrite its report",
    )  # fmt: skip
    args = parser.parse_args()
    if args.remeasure:
        with open(args.remeasure, encoding="utf-8") as handle:
            report = json.load(handle)
        for row in report["rows"]:
            row["measured"] = measure_in_subprocess(row["method"], row["runs"][0]["lr"], row["density"] or 1.0, args)
        write_report(report["rows"], args, setting=report["setting"], remeasured=args.remeasure)
        return
    args.vocab = 128
    if args.smoke:
        args.densities, args.lora_densities, args.seeds, args.steps = [0.25], [0.25], [0, 1], 6
        args.seq_len, args.block_size, args.batch, args.measure_steps = 32, 16, 4, 8
    data = load_data(args)
    if args.measure:
        method, lr, density = args.measure[0], float(args.measure[1]), float(args.measure[2])
        args.steps = args.measure_steps
        result = train(method, lr, density, 0, data, args, evaluate=False)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    configs = [("full", None)] + [("updates", d) for d in args.densities] + [("lora", d) for d in args.lora_densities]
    rows = []
    for method, density in configs:
        grid = [train(method, lr, density or 1.0, args.seeds[0], data, args) for lr in LR_GRIDS[method]]
        for run in grid:
            print(json.dumps({k: v for k, v in run.items() if k != "step_seconds"}), flush=True)
        best = min(grid, key=lambda run: run["validation_loss"])
        runs = [best] + [train(method, best["lr"], density or 1.0, s, data, args) for s in args.seeds[1:]]
        rows.append({"method": method, "density": density, "grid": grid, "runs": runs})
    for row in rows:
        row["measured"] = measure_in_subprocess(row["method"], row["runs"][0]["lr"], row["density"] or 1.0, args)
    write_report(rows, args)


def write_report(rows: list[dict], args, setting: str | None = None, remeasured: str | None = None) -> None:
    full = rows[0]
    full_loss = statistics.mean(run["test_loss"] for run in full["runs"])
    full_state = full["measured"]["state_bytes"]
    full_step = statistics.median(full["measured"]["step_seconds"][SETTLED:])
    model = "a tiny random Llama (smoke)" if args.smoke else args.model
    remeasured_note = [
        f"Quality columns from the earlier run recorded in {os.path.basename(remeasured)}; memory, step time and "
        f"checkpoint size measured again on {datetime.date.today()} by the command below."
    ] if remeasured else []  # fmt: skip
    lines = [
        setting
        or f"{datetime.date.today()} | {os.cpu_count()} CPUs | torch {torch.__version__} | {model} | {args.steps} "
        f"steps of {args.batch} x {args.seq_len} tokens | blocks {args.block_size} | seeds {args.seeds}",
        "",
        "Test loss on held-out text (mean over seeds, each in brackets); learning rate picked on a validation split.",
        *remeasured_note,
        f"Memory and step time: one {args.measure_steps}-step run per method in its own process, after the quality "
        f"runs; step time is the median from step {SETTLED} on (after updates mode's first selection).",
        "",
        "| method | trainable params | lr (grid: validation loss) | test loss | gap to full | trainable state "
        "| peak RSS | step time | saved checkpoint |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        loss = statistics.mean(run["test_loss"] for run in row["runs"])
        seeds = ", ".join(f"{run['test_loss']:.4f}" for run in row["runs"])
        grid = ", ".join(f"{run['lr']:g}: {run['validation_loss']:.4f}" for run in row["grid"])
        measured = row["measured"]
        step = statistics.median(measured["step_seconds"][SETTLED:])
        name = row["method"] if row["density"] is None else f"{row['method']} (density {row['density']})"
        lines.append(
            f"| {name} | {row['runs'][0]['trainable']:,} | {row['runs'][0]['lr']:g} ({grid}) | {loss:.4f} ({seeds}) "
            f"| {100 * (loss / full_loss - 1):+.2f}% | {measured['state_bytes'] / 2**20:.1f} MiB "
            f"({measured['state_bytes'] / full_state:.2%}) | {measured['peak_rss_mb']:.0f} MB "
            f"| {step:.2f} s ({step / full_step:.2f}x) | {measured['checkpoint_bytes'] / 2**20:.1f} MiB |"
        )
    finish_report(lines, args.output)
    if args.output:
        with open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as handle:
            json.dump({"setting": lines[0], "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
