"""Supervised fine-tuning with TRL's SFTTrainer and Sparse-Dynamic Training (`pip install "hf-sdt[trl]"`).

`--train_file` is a .jsonl / .json of conversations (a `messages` column, formatted by the tokenizer's chat
template) or of plain text (a `text` column), or a .txt file (one example per line); every other flag is TRL's
SFTConfig (transformers' TrainingArguments and more) or an SDTConfig field, and a YAML file may hold any of them.
Updates mode (a small adapter over the frozen base) is the default here; `--mode weights` trains sparse weights.

    python recipes/sft_trl.py --model_name_or_path models/smollm2-135m --train_file chats.jsonl \
        --output_dir out/sft --max_steps 500 --learning_rate 2e-4
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sft_trl.py \
        --model_name_or_path models/smollm2-135m --train_file chats.jsonl --output_dir out/sft --bf16 true
"""

import os
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig

from hf_sdt import SDTSFTTrainer
from hf_sdt.arguments import add_sdt_arguments, expand_config_file, sdt_config_from
from hf_sdt.training import is_main_process, run_script


@dataclass
class DataArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the causal LM to fine-tune."})
    train_file: str = field(metadata={"help": "A .jsonl / .json (messages or text column) or .txt file."})


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser((DataArguments, SFTConfig), prog="sft_trl.py")
    add_sdt_arguments(parser)
    args, sft_args, sdt_flags = parser.parse_args_into_dataclasses(args=expand_config_file(argv, parser))
    sdt_config = sdt_config_from(sdt_flags, sft_args.seed, mode="updates")
    if sdt_config is None:
        raise SystemExit("sft_trl.py fine-tunes with SDT; drop --dense (use TRL's own sft script for a dense run).")
    if not os.path.isfile(args.train_file):
        raise SystemExit(f"Data file {args.train_file!r} does not exist.")
    extension = os.path.splitext(args.train_file)[1].lstrip(".").replace("jsonl", "json").replace("txt", "text")
    dataset = load_dataset(extension, data_files=args.train_file, split="train")
    trainer = SDTSFTTrainer(
        AutoModelForCausalLM.from_pretrained(args.model_name_or_path),
        args=sft_args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.model_name_or_path),
        sdt_config=sdt_config,
    )
    metrics = dict(trainer.train().metrics)
    trainer.save_model()
    if is_main_process():
        print(metrics)
        print(f"Saved to {sft_args.output_dir}")
    return metrics


if __name__ == "__main__":
    run_script(main)
