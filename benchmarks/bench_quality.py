"""Quality vs compute: dense vs SDT at several densities (and SDT variants), with the same data, steps, seeds and
optimizer; optionally iso-FLOP dense baselines (a dense model trained for as many steps as SDT's linear FLOPs buy).

The base job is `hf-sdt demo`'s from-scratch setting (a small GPT on Pride and Prejudice, eval on held-out
Persuasion) or, with `--config`, any `hf-sdt train` YAML config (e.g. SmolLM2-135M fine-tuning). Any other flag of
`hf-sdt train` applies to every run. "Linear FLOPs" are those of the targeted linear layers (attention scores,
embeddings and the output layer are not counted). Each report also gets a `.json` twin with every run's metrics,
which `benchmarks/plot_quality.py` draws.

    # from scratch, with iso-FLOP baselines
    python benchmarks/bench_quality.py --iso_flop --output benchmarks/results/quality_scratch.md
    # fine-tuning SmolLM2-135M (python recipes/prepare_smollm2.py models/smollm2-135m first)
    python benchmarks/bench_quality.py --config recipes/configs/smollm2_austen.yaml --max_steps 100 \
        --output benchmarks/results/quality_finetune_smollm2.md
    # a sweep of SDT variants at one density, two seeds (`--baseline REPORT.json` reuses an earlier dense row)
    python benchmarks/bench_quality.py --densities 0.1 --seeds 0 1 --variant ERK "--distribution erk" \
        --variant Wanda "--prune_criterion wanda" --output benchmarks/results/quality_sweep.md
    python benchmarks/bench_quality.py --smoke          # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import tempfile

from benchmark_report import finish_report

from hf_sdt.arguments import parse_train_args
from hf_sdt.demo import demo_argv
from hf_sdt.training import run_training

SMOKE_FLAGS = [
    "--model_config", '{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}', "--tokenizer_vocab_size",
    "300", "--max_seq_length", "32", "--block_size", "16", "--update_interval", "2", "--max_steps", "4",
    "--train_files", "hf_sdt/data/persuasion_excerpt.txt",
]  # fmt: skip


def train_argv(config: str | None, output_dir: str, overrides: list[str], dense: bool) -> list[str]:
    """`hf-sdt train` flags of one run: the demo's defaults or a YAML config, then `overrides`."""
    if config is None:
        return demo_argv(output_dir, overrides, dense=dense)
    return [config, "--output_dir", output_dir, *overrides] + (["--dense"] if dense else [])


def run_seeds(config, folder: str, name: str, overrides: list[str], dense: bool, seeds: list[int]) -> dict:
    """Train once per seed; the row of the table: per-seed metrics and the step count."""
    runs = []
    for seed in seeds:
        print(f"\n=== {name}, seed {seed} ===", flush=True)
        argv = train_argv(config, os.path.join(folder, f"{len(runs)}"), [*overrides, "--seed", str(seed)], dense)
        parsed = parse_train_args(argv)
        runs.append({"seed": seed, "max_steps": parsed[2].max_steps, **run_training(*parsed)})
    return {"name": name, "dense": dense, "runs": runs}


def mean(row: dict, key: str) -> float:
    return statistics.mean(run[key] for run in row["runs"])


def linear_flops(row: dict, dense_steps: int) -> float:
    """Linear FLOPs of the run over those of the dense run (a dense run's FLOPs are proportional to its steps)."""
    if row["dense"]:
        return row["runs"][0]["max_steps"] / dense_steps
    return 1 - mean(row, "sdt/linear_flops_saved")


def format_table(rows: list[dict], header: str) -> list[str]:
    dense, seeds = rows[0], len(rows[0]["runs"])
    lines = [
        header,
        "",
        f"Eval loss: mean over {seeds} seed(s){' (each in brackets)' if seeds > 1 else ''}; gap and ratios vs dense.",
        "",
        "| run | steps | eval loss | perplexity | gap to dense | linear FLOPs vs dense | wall time vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense_loss, dense_steps = mean(dense, "eval_loss"), dense["runs"][0]["max_steps"]
    for row in rows:
        loss = mean(row, "eval_loss")
        per_seed = " (" + ", ".join(f"{run['eval_loss']:.4f}" for run in row["runs"]) + ")" if seeds > 1 else ""
        lines.append(
            f"| {row['name']} | {row['runs'][0]['max_steps']} | {loss:.4f}{per_seed} | "
            f"{mean(row, 'perplexity'):.2f} | {100 * (loss / dense_loss - 1):+.2f}% | "
            f"{linear_flops(row, dense_steps):.1%} | {mean(row, 'train_runtime') / mean(dense, 'train_runtime'):.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="an `hf-sdt train` YAML config (default: `hf-sdt demo`'s setting)")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "FLAGS"),
        help="an SDT variant run at every density, e.g. ERK '--distribution erk' (repeatable; default: the config)",
    )  # fmt: skip
    parser.add_argument("--iso_flop", action="store_true", help="add a dense run with each SDT run's linear FLOPs")
    parser.add_argument("--baseline", help="take the dense row from this earlier report's .json (same setting)")
    parser.add_argument("--output", help="write the table as markdown to this file (and the metrics to .json)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the script")
    args, extra = parser.parse_known_args()
    common = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra]
    variants = [(name, shlex.split(flags)) for name, flags in args.variant or [("SDT", "")]]
    if args.smoke:
        args.densities, args.iso_flop = [0.25], True
        common += SMOKE_FLAGS
    with tempfile.TemporaryDirectory() as folder:
        if args.baseline:
            with open(args.baseline, encoding="utf-8") as handle:
                rows = [json.load(handle)["rows"][0]]
            rows[0]["name"] = f"dense (from {os.path.basename(args.baseline)})"
        else:
            rows = [run_seeds(args.config, os.path.join(folder, "dense"), "dense", common, True, args.seeds)]
        dense_steps = rows[0]["runs"][0]["max_steps"]
        for density in args.densities:
            for variant, flags in variants:
                name = f"{variant} density {density}"
                overrides = [*common, *flags, "--density", str(density)]
                rows.append(run_seeds(args.config, os.path.join(folder, name), name, overrides, False, args.seeds))
                if args.iso_flop:
                    steps = max(1, round(linear_flops(rows[-1], dense_steps) * dense_steps))
                    name = f"dense, iso-FLOP to {name}"
                    overrides = [*common, "--max_steps", str(steps)]
                    rows.append(run_seeds(args.config, os.path.join(folder, name), name, overrides, True, args.seeds))
    setting = args.config or "`hf-sdt demo` defaults"
    header = f"{datetime.date.today()} | {os.cpu_count()} CPUs | {setting} {shlex.join(extra)}".rstrip()
    finish_report(format_table(rows, header), args.output)
    if args.output:
        with open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as handle:
            json.dump({"setting": header, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
