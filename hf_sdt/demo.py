"""The main job, `hf-sdt demo`: a small GPT trained from scratch on a public-domain novel, SDT and dense side by side.

Both runs use the same data (Pride and Prejudice, shipped in hf_sdt/data; evaluated on held-out Persuasion), the
same byte-level BPE tokenizer trained on the training text, the same steps, seed and optimizer. The table at the
end is built from the two runs' own metrics; the SDT model folder gets its model card and pictures.

    hf-sdt demo                       # the built-in default: a few minutes on a 2-core CPU
    hf-sdt demo --max_steps 20        # quicker; any flag of `hf-sdt train` overrides the defaults
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os

from .arguments import parse_train_args, values_to_flags
from .training import run_training

DATA = importlib.resources.files("hf_sdt.data")
DEFAULTS = {
    "model_config": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4},
    "tokenizer_vocab_size": 2048,
    "max_seq_length": 128,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 16,
    "max_steps": 300,
    "learning_rate": 1e-3,
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "logging_steps": 25,
    "save_strategy": "no",
    "report_to": "none",
    "use_cpu": True,
    "seed": 0,
    "update_interval": 25,  # SDT's drop/grow, until 75% of the steps
}
# SDT's share of the dense run's whole-model training FLOPs: the planner chooses the density (the highest this budget
# affords, in 64 x 64 blocks) and how late to end the prune from dense. Not in DEFAULTS, which the benchmarks share.
COMPUTE_BUDGET = 0.3


def demo_argv(output_dir: str, overrides: list[str], dense: bool) -> list[str]:
    """`hf-sdt train` flags of one demo run: the defaults, then `overrides`, then `--dense` for the baseline."""
    values = {
        **DEFAULTS,
        "train_files": [str(DATA / "pride_and_prejudice.txt")],
        "validation_files": [str(DATA / "persuasion_excerpt.txt")],
        "output_dir": output_dir,
    }
    return values_to_flags(values) + overrides + (["--dense"] if dense else [])


def format_table(dense: dict, sdt: dict) -> str:
    """The comparison table, from the two runs' metrics (nothing in it is computed elsewhere)."""
    rows = [
        ("eval loss (held-out Persuasion)", f"{dense['eval_loss']:.4f}", f"{sdt['eval_loss']:.4f}"),
        ("perplexity", f"{dense['perplexity']:.2f}", f"{sdt['perplexity']:.2f}"),
        ("whole-model training FLOPs, vs dense", "100%", f"{sdt['sdt/train_flops_ratio']:.1%}"),
        ("targeted layers' FLOPs over training, vs dense", "100%", f"{1 - sdt['sdt/linear_flops_saved']:.1%}"),
        ("training wall time (s)", f"{dense['train_runtime']:.1f}", f"{sdt['train_runtime']:.1f}"),
        ("final density of the linear layers", "1.000", f"{sdt['sdt/density']:.3f}"),
    ]
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':<{width}}  {'dense':>10}  {'SDT':>10}", "-" * (width + 24)]
    lines += [f"{name:<{width}}  {dense_value:>10}  {sdt_value:>10}" for name, dense_value, sdt_value in rows]
    return "\n".join(lines)


def demo_parser() -> argparse.ArgumentParser:
    """The demo's own options; every other flag goes to both runs as an `hf-sdt train` flag."""
    parser = argparse.ArgumentParser(
        prog="hf-sdt demo",
        allow_abbrev=False,
        description="The main job: a small GPT trained from scratch on Pride and Prejudice, dense and with SDT on "
        "the same data, steps and seed (a few minutes on a 2-core CPU), then a table of what each run measured.",
        epilog="Any flag of `hf-sdt train` (see `hf-sdt train --help`) overrides the demo's defaults in both runs, "
        "e.g. `hf-sdt demo --max_steps 20 --block_size 32`.",
    )
    parser.add_argument(
        "--output_dir", default="sdt-demo", help="gets dense/, sdt/ and results.md (default: %(default)s)"
    )
    parser.add_argument(
        "--max_steps", type=int, default=DEFAULTS["max_steps"], help="steps of each run (default: %(default)s)"
    )
    parser.add_argument(
        "--compute_budget",
        type=float,
        default=COMPUTE_BUDGET,
        help="SDT's share of the dense run's whole-model training FLOPs (default: %(default)s)",
    )
    parser.add_argument(
        "--density", type=float, help="SDT's final density (default: the highest the compute budget affords)"
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    """Run both trainings and print the table; `--output_dir` (default `sdt-demo`) gets `dense/`, `sdt/` and
    `results.md`. Returns the table. `--help` prints the demo's options and starts nothing."""
    options, argv = demo_parser().parse_known_args(list(argv or []))
    output_dir = options.output_dir
    density = [] if options.density is None else ["--density", str(options.density)]
    argv = ["--max_steps", str(options.max_steps), "--compute_budget", str(options.compute_budget), *density, *argv]
    results = {}
    for name in ("dense", "sdt"):
        print(f"\n=== {name} run ===", flush=True)
        parsed = parse_train_args(demo_argv(os.path.join(output_dir, name), argv, dense=name == "dense"))
        results[name] = run_training(*parsed)
    table = format_table(results["dense"], results["sdt"])
    print("\n" + table)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as handle:
        handle.write("```\n" + table + "\n```\n\nMetrics of each run:\n\n```json\n")
        handle.write(json.dumps(results, indent=2, sort_keys=True) + "\n```\n")
    print(f"\nThe SDT model, its card and pictures are in {os.path.join(output_dir, 'sdt')}.")
    return table
