"""Whole training steps of a SmolLM2-135M-shaped model (or the demo's GPT), dense against SDT (weights mode).

A Llama with SmolLM2-135M's shape (from its config, random init, tied embeddings: the 49152 x 576 output layer stays
dense) trains from scratch with AdamW in fp32 on batches of 8 x 256 random tokens: dense, and converted with SDT at
densities 0.5 / 0.25 / 0.1 (`schedule="constant"`, 64 x 64 blocks, all linear layers of the decoder blocks, so compact
storage). Each step is forward, backward, `SDTController` bookkeeping and the optimizer step, each phase timed; the
models take turns step by step in one process (after one warm-up step each) and each row is the median over
`--repeats` steps. A last model keeps one block per layer: what a step costs when the SDT layers cost (almost)
nothing, the bound on any speed-up of these layers (the output layer, attention, norms, activations, the loss and
the optimizer of the embeddings remain). The trainable state of the SDT layers (parameters, gradients and AdamW
moments, in elements) is counted against the same layers dense. With `--rss-steps N`, each of dense, SDT 0.25 and
SDT 0.1 also trains N steps alone in a fresh process, whose peak resident memory is reported.

`--model demo` times the model of `hf-sdt demo` instead (its GPT-2 config from `hf_sdt.demo.DEFAULTS`, random init,
batches of 16 x 128 tokens as the demo trains, GPT-2's dropout included) with the same constant schedule: its
one-block floor bounds what any SDT run of the demo can save per step.

    python benchmarks/bench_train_step.py --output benchmarks/results/train_step_cpu.md   # the issue's table
    python benchmarks/bench_train_step.py --model demo --repeats 15 \
        --output benchmarks/results/train_step_demo_cpu.md                                 # the demo's model
    python benchmarks/bench_train_step.py --smoke                                          # a seconds-long check
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from bench_decode import DENSITIES, FLOOR, SMOKE, SMOLLM2_135M, convert, density_of
from benchmark_report import finish_report
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from hf_sdt import SDTController, sdt_layers
from hf_sdt.demo import DEFAULTS as DEMO

PHASES = ("forward", "backward", "sdt", "optimizer")
# name -> (a fresh config, batch size, tokens per sequence, the report's description)
MODELS = {
    "smollm2": (lambda: LlamaConfig(**SMOLLM2_135M), 8, 256, "SmolLM2-135M shape"),
    "demo": (
        lambda: AutoConfig.for_model(**DEMO["model_config"], vocab_size=DEMO["tokenizer_vocab_size"]),
        DEMO["per_device_train_batch_size"],
        DEMO["max_seq_length"],
        "`hf-sdt demo` model (GPT-2, 4 x 256, vocabulary 2048, dropout 0.1)",
    ),
    "smoke": (lambda: LlamaConfig(**SMOKE), 8, 32, "smoke"),
}


def build(config: PretrainedConfig, density: float | None, steps: int):
    """A freshly initialised model (seed 0), dense or converted at `density`, with its AdamW and controller."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    controller = None
    if density is not None:
        model, sdt_config = convert(model, density, update_interval=10_000)
        controller = SDTController(model, sdt_config, total_steps=steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, controller, optimizer


def train_step(model, controller, optimizer, batch: torch.Tensor, step: int) -> dict[str, float]:
    """One step; the seconds of each phase."""
    seconds, start = {}, time.perf_counter()
    if controller is not None:
        controller.begin_step(step)
    loss = model(input_ids=batch, labels=batch).loss
    seconds["forward"], start = time.perf_counter() - start, time.perf_counter()
    loss.backward()
    seconds["backward"], start = time.perf_counter() - start, time.perf_counter()
    if controller is not None:
        controller.before_optimizer_step(optimizer)
    seconds["sdt"], start = time.perf_counter() - start, time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds["optimizer"], start = time.perf_counter() - start, time.perf_counter()
    if controller is not None:
        controller.after_optimizer_step()
    seconds["sdt"] += time.perf_counter() - start
    return seconds


def targeted_state_elements(model, optimizer) -> int:
    """Elements of the SDT layers' trainable tensors, their gradients (as after backward) and AdamW moments."""
    total = 0
    for layer in sdt_layers(model).values():
        for parameter in layer.parameters():
            if parameter.requires_grad:
                state = optimizer.state.get(parameter, {})
                moments = sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor) and v.dim())
                total += 2 * parameter.numel() + moments  # the parameter and its gradient
    return total


def dense_state_elements(model) -> int:
    """The same count for the targeted layers dense: weight and bias, their gradients and two AdamW moments."""
    return sum(
        4 * (layer.out_features * layer.in_features + (layer.bias.numel() if layer.bias is not None else 0))
        for layer in sdt_layers(model).values()
    )


def batches(config: PretrainedConfig, size: int, tokens: int, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(config.vocab_size, (size, tokens), generator=generator) for _ in range(count)]


def peak_rss_of(name: str, steps: int, model: str) -> float:
    """Peak resident memory (MB) of a fresh process that builds `name` and trains it for `steps` steps."""
    command = [sys.executable, __file__, "--rss-of", name, "--rss-steps", str(steps), "--model", model]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def train_alone(name: str, steps: int, config: PretrainedConfig, size: int, tokens: int) -> float:
    model, controller, optimizer = build(config, density_of(name), steps)
    for step, batch in enumerate(batches(config, size, tokens, steps)):
        train_step(model, controller, optimizer, batch, step)
    # VmHWM, not getrusage's ru_maxrss: that one starts from the parent's peak at fork.
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024  # kB -> MB


def timing_table(config: PretrainedConfig, size: int, tokens: int, repeats: int) -> tuple[list[str], dict]:
    """The models' step times, alternating step by step in this process; the report's lines and rows."""
    names = ["dense", *(f"SDT {density}" for density in DENSITIES), FLOOR]
    runs = {name: build(config, density_of(name), repeats + 1) for name in names}
    times = {name: [] for name in names}
    # Step 0 warms up (and creates the AdamW states).
    for step, batch in enumerate(batches(config, size, tokens, repeats + 1)):
        for name, (model, controller, optimizer) in runs.items():
            seconds = train_step(model, controller, optimizer, batch, step)
            if step:
                times[name].append(seconds)
    medians = {
        name: {phase: statistics.median(t[phase] for t in rows) for phase in PHASES} | {
            "step": statistics.median(sum(t.values()) for t in rows)
        }
        for name, rows in times.items()
    }  # fmt: skip
    dense_step = medians["dense"]["step"]
    lines = [
        "",
        f"Median of {repeats} steps per model, models alternating step by step in one process.",
        "",
        "| model | step (s) | vs dense | forward | backward | SDT bookkeeping | optimizer | SDT-layer state |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for name, (model, _, optimizer) in runs.items():
        row = medians[name]
        state = 1.0 if name == "dense" else targeted_state_elements(model, optimizer) / dense_state_elements(model)
        lines.append(
            f"| {name} | {row['step']:.2f} | {dense_step / row['step']:.2f}x | {row['forward']:.2f} | "
            f"{row['backward']:.2f} | {row['sdt']:.3f} | {row['optimizer']:.2f} | {state:.4f} |"
        )
        rows[name] = {**row, "speedup": dense_step / row["step"], "state_ratio": state}
    lines += [
        "",
        "`vs dense`: the dense step time over the model's. `SDT-layer state`: elements of the SDT layers' parameters, "
        "gradients and AdamW moments over those of the same layers dense (block indices not counted).",
    ]
    return lines, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model (0: peak RSS only)")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2", help="the model to time")
    parser.add_argument("--tokens", type=int, default=None, help="sequence length (default: the model's)")
    parser.add_argument("--rss-steps", type=int, default=0, help="also measure peak RSS over this many steps")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps: checks the script runs")
    parser.add_argument("--output", help="write the report here (markdown)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.repeats = "smoke", 1
    make_config, size, default_tokens, description = MODELS[args.model]
    config, tokens = make_config(), args.tokens or default_tokens
    if args.rss_of:
        print(train_alone(args.rss_of, args.rss_steps, config, size, tokens))
        return

    lines = [
        f"# Whole training steps, dense vs SDT ({datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"{description}, random init, AdamW fp32, batch {size} x {tokens} tokens, 64 x 64 blocks, constant schedule "
        "(compact storage).",
    ]
    report = {"model": args.model, "config": config.to_diff_dict(), "tokens": tokens, "repeats": args.repeats}
    report["rows"] = {}
    if args.repeats:
        table, report["rows"] = timing_table(config, size, tokens, args.repeats)
        lines += table
    if args.rss_steps:
        lines += ["", f"Peak RSS (VmHWM) of {args.rss_steps} steps, each model alone in a fresh process:", ""]
        for name in ("dense", "SDT 0.25", "SDT 0.1"):
            rss = peak_rss_of(name, args.rss_steps, args.model)
            report["rows"].setdefault(name, {})["peak_rss_mb"] = rss
            lines.append(f"- {name}: {rss:.0f} MB")
    if args.output:
        with open(args.output.removesuffix(".md") + ".json", "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    finish_report(lines, args.output)


if __name__ == "__main__":
    main()
