"""Share of training time that SDT's own work takes, measured inside one SDTTrainer run on a small CPU model.

Reports the seconds spent in topology changes (pruning to the schedule, drop/grow updates every
`update_interval` steps, with gradient growth) and in all of the controller's calls (the per-step mask
application included), against the run's total training time. The forward/backward of update steps, which run
the dense reference product to get the dense gradient, are part of the training time, not of the update time.

    python benchmarks/bench_update_overhead.py                 # 300 steps, update_interval=100
    python benchmarks/bench_update_overhead.py --smoke         # seconds-long check of the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile

import torch
from benchmark_report import finish_report
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from hf_sdt import SDTConfig
from hf_sdt.demo_data import ByteChunks
from hf_sdt.trainer import SDTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--update-interval", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--output", help="write the report as markdown to this file")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.update_interval, args.hidden, args.layers = 6, 2, 64, 1

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=256, n_embd=args.hidden, n_layer=args.layers, n_head=4, n_positions=128)
    )
    config = SDTConfig(density=0.25, block_size=32, update_interval=args.update_interval)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=50,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = SDTTrainer(model=model, args=training_args, train_dataset=ByteChunks(length=128), sdt_config=config)
        result = trainer.train()
    controller = trainer.sdt_callback.controller
    runtime = result.metrics["train_runtime"]
    rows = [
        f"{datetime.date.today()} | {os.cpu_count()} CPUs | torch {torch.__version__} | GPT-2 {args.layers} layers x "
        f"{args.hidden}, 8 x 128 byte tokens per step, {args.steps} steps, density 0.25, block 32, "
        f"update_interval {args.update_interval}, gradient growth",
        "",
        "| what | seconds | share of training time |",
        "|---|---:|---:|",
        f"| training (Trainer's train_runtime) | {runtime:.2f} | 100% |",
        f"| topology changes (pruning + drop/grow) | {controller.total_update_seconds:.3f} | "
        f"{100 * controller.total_update_seconds / runtime:.2f}% |",
        f"| all SDT controller calls | {controller.total_seconds:.3f} | "
        f"{100 * controller.total_seconds / runtime:.2f}% |",
    ]
    finish_report(rows, args.output)


if __name__ == "__main__":
    main()
