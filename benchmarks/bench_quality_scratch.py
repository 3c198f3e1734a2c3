"""Quality vs compute from scratch: a small GPT on Pride and Prejudice (eval: held-out Persuasion), dense vs SDT at
several densities, plus iso-FLOP dense baselines (a dense model trained for as many steps as SDT's linear FLOPs buy).

Every run uses `hf-sdt demo`'s defaults (model, tokenizer, data, optimizer, seed) unless overridden; "linear FLOPs"
are those of the targeted linear layers (attention scores, embeddings and the output layer are not counted).

    python benchmarks/bench_quality_scratch.py --output benchmarks/results/quality_scratch.md
    python benchmarks/bench_quality_scratch.py --smoke          # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

from benchmark_report import finish_report

from hf_sdt.cli import parse_train_args
from hf_sdt.demo import demo_argv
from hf_sdt.training import run_training


def run(output_dir: str, overrides: list[str], dense: bool) -> dict:
    return run_training(*parse_train_args(demo_argv(output_dir, overrides, dense=dense)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--output", help="write the table as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the script")
    args = parser.parse_args()
    common = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "50"]
    if args.smoke:
        args.max_steps, args.densities = 4, [0.25]
        common += ["--model_config", '{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}',
                   "--tokenizer_vocab_size", "300", "--max_seq_length", "32", "--block_size", "16",
                   "--update_interval", "2", "--train_files", "hf_sdt/data/persuasion_excerpt.txt"]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        dense = run(os.path.join(folder, "dense"), [*common, "--max_steps", str(args.max_steps)], dense=True)
        rows.append(("dense", args.max_steps, dense, 1.0))
        for density in args.densities:
            overrides = [*common, "--max_steps", str(args.max_steps), "--density", str(density)]
            sdt = run(os.path.join(folder, f"sdt{density}"), overrides, dense=False)
            used = 1 - sdt["sdt/linear_flops_saved"]
            rows.append((f"SDT density {density}", args.max_steps, sdt, used))
            iso_steps = max(1, round(used * args.max_steps))
            overrides = [*common, "--max_steps", str(iso_steps)]
            iso = run(os.path.join(folder, f"iso{density}"), overrides, dense=True)
            rows.append((f"dense, iso-FLOP to density {density}", iso_steps, iso, iso_steps / args.max_steps))
    lines = [
        f"{datetime.date.today()} | {os.cpu_count()} CPUs | `hf-sdt demo` defaults, {args.max_steps} steps",
        "",
        "| run | steps | eval loss | perplexity | gap to dense | linear FLOPs vs dense | wall time vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, steps, metrics, flops in rows:
        gap = 100 * (metrics["eval_loss"] / dense["eval_loss"] - 1)
        lines.append(
            f"| {name} | {steps} | {metrics['eval_loss']:.4f} | {metrics['perplexity']:.2f} | {gap:+.2f}% | "
            f"{flops:.1%} | {metrics['train_runtime'] / dense['train_runtime']:.2f} |"
        )
    finish_report(lines, args.output)


if __name__ == "__main__":
    main()
