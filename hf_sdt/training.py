"""A causal-LM training job with SDT, as `hf-sdt train` and the recipes run it (in the style of transformers'
run_clm): model (local path, Hub id or a config to train from scratch), text data (local .txt/.json/.jsonl/.csv files
or a Hub dataset), tokenisation and packing into blocks, then `SDTTrainer` (or plain `Trainer` without SDT)."""

from __future__ import annotations

import gc
import json
import math
import os
import sys
from dataclasses import dataclass, field
from itertools import chain

import torch.distributed as dist
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .config import SDTConfig
from .trainer import SDTTrainer

EXTENSION_TO_BUILDER = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}


@dataclass
class ModelArguments:
    """Which model to train.

    Args:
        model_name_or_path: a local folder or a Hub id of a pretrained model to fine-tune.
        model_config: to train from scratch instead, a JSON object of a transformers config (with `model_type`).
        tokenizer_name: a tokenizer folder or Hub id; from scratch without one, a byte-level BPE tokenizer of
            `tokenizer_vocab_size` tokens is trained on the training text.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local folder or Hub id of a pretrained model to fine-tune."}
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": 'JSON of a config to train from scratch, e.g. {"model_type": "gpt2", "n_layer": 4}.'},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer folder or Hub id."})
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary of the BPE tokenizer trained when there is none."}
    )


@dataclass
class DataArguments:
    """What to train on.

    Args:
        train_files: local .txt/.json/.jsonl/.csv files.
        validation_files: held-out files of the same kind (else a split of the training data).
        dataset_name / dataset_config_name: a Hub dataset instead of files.
        text_column: the column that holds the text (.json/.csv and Hub datasets).
        max_seq_length: tokens per training sequence; the text is concatenated and cut into such sequences (TRL's
            name; run_clm calls it block_size, which here is SDT's block).
        validation_split_percentage: share of the training data held out when there is no validation set.
    """

    train_files: list[str] | None = field(default=None, metadata={"help": "Local text/JSON/CSV training files."})
    validation_files: list[str] | None = field(default=None, metadata={"help": "Local held-out files."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset id instead of files."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per training sequence."})
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when no validation set is given."}
    )


def load_text_datasets(data_args: DataArguments) -> DatasetDict:
    """Train and validation splits with a `text_column`, from local files or a Hub dataset."""
    if data_args.dataset_name is not None:
        try:
            raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        except Exception as error:
            raise OSError(
                f"Dataset {data_args.dataset_name!r} could not be loaded ({type(error).__name__}: {error}). "
                "Without network, pass local files with --train_files."
            ) from error
    else:
        if not data_args.train_files:
            raise ValueError("Give training data: --train_files FILE [FILE ...] or --dataset_name NAME.")
        files = {"train": data_args.train_files}
        if data_args.validation_files:
            files["validation"] = data_args.validation_files
        extensions = {os.path.splitext(path)[1] for paths in files.values() for path in paths}
        for path in (path for paths in files.values() for path in paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Data file {path!r} does not exist.")
            with open(path, encoding="utf-8", errors="replace") as handle:
                if not handle.read(65536).strip():
                    raise ValueError(f"Data file {path!r} is empty: give a file with text in it.")
        if len(extensions) != 1 or next(iter(extensions)) not in EXTENSION_TO_BUILDER:
            raise ValueError(
                f"Data files must share one extension of {sorted(EXTENSION_TO_BUILDER)}, got {extensions}."
            )
        builder = EXTENSION_TO_BUILDER[next(iter(extensions))]
        raw = load_dataset(builder, data_files=files, **({"sample_by": "paragraph"} if builder == "text" else {}))
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    return raw


def build_tokenizer(model_args: ModelArguments, texts):
    """The model's tokenizer, or a byte-level BPE tokenizer trained on `texts` when training from scratch."""
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is not None:
        return _from_hub_or_path(AutoTokenizer.from_pretrained, source)
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=model_args.tokenizer_vocab_size, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(model_args: ModelArguments, tokenizer, max_seq_length: int):
    """The pretrained model, or one from `model_config` sized to the tokenizer, whose special token ids it takes (a
    config's own defaults, e.g. GPT-2's 50256, would not exist in a small trained vocabulary)."""
    if model_args.model_name_or_path is not None:
        return _with_causal_lm_loss(
            _from_hub_or_path(AutoModelForCausalLM.from_pretrained, model_args.model_name_or_path)
        )
    if model_args.model_config is None:
        raise ValueError("Give --model_name_or_path (to fine-tune) or --model_config (a JSON config, from scratch).")
    special_tokens = {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    values = {"vocab_size": len(tokenizer), "n_positions": max_seq_length, **special_tokens}
    config = AutoConfig.for_model(**{**values, **json.loads(model_args.model_config)})
    return _with_causal_lm_loss(AutoModelForCausalLM.from_config(config))


def _with_causal_lm_loss(model):
    """Name the causal-LM loss that transformers falls back to for classes whose name does not give it (GPT-2's
    `GPT2LMHeadModel`), which it would otherwise announce as "`loss_type=None` ... unrecognized" on every run."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def _from_hub_or_path(loader, name: str):
    try:
        return loader(name)
    except OSError as error:
        raise OSError(
            f"{name!r} is not a local folder and could not be fetched from the Hub ({error}). Offline, pass the "
            "path of a folder saved with save_pretrained."
        ) from error


def tokenize_and_pack(raw: DatasetDict, tokenizer, data_args: DataArguments) -> DatasetDict:
    """Tokenise, concatenate and cut into `block_size` blocks with labels = input_ids (run_clm's grouping)."""
    column = data_args.text_column
    if column not in raw["train"].column_names:
        raise ValueError(
            f"No column {column!r} in the data (columns: {raw['train'].column_names}); set --text_column."
        )

    def tokenize(batch):
        return tokenizer([text + tokenizer.eos_token for text in batch[column]])

    def pack(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        usable = len(ids) // data_args.max_seq_length * data_args.max_seq_length
        blocks = [ids[i : i + data_args.max_seq_length] for i in range(0, usable, data_args.max_seq_length)]
        # An explicit all-ones attention mask: the pad token (eos) occurs inside packed text, so without one
        # transformers cannot tell it is not padding and warns.
        ones = [[1] * data_args.max_seq_length for _ in blocks]
        return {"input_ids": blocks, "attention_mask": ones, "labels": [list(block) for block in blocks]}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")
    return tokenized.map(pack, batched=True, remove_columns=tokenized["train"].column_names, desc="Packing")


def run_training(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    sdt_config: SDTConfig | None,
    callbacks: list | None = None,
) -> dict[str, float]:
    """Train (with SDT unless `sdt_config` is None), evaluate, save model, tokenizer and card; return the metrics:
    Trainer's own (`train_runtime`, `eval_loss`, ...) plus `perplexity` and, with SDT, the final `sdt/*` values.
    `callbacks` go to the Trainer.
    Updates mode needs a pretrained model (`model_name_or_path`): its adapter holds only changes to one."""
    if sdt_config is not None and sdt_config.mode == "updates" and model_args.model_name_or_path is None:
        raise ValueError(
            "SDTConfig.mode='updates' fine-tunes a pretrained model and saves only an adapter of changes to it, but "
            "this run builds its model from --model_config (random weights, which would be saved nowhere). Give "
            "--model_name_or_path (a folder or Hub id), or train from scratch in weights mode (--mode weights)."
        )
    raw = load_text_datasets(data_args)
    tokenizer = build_tokenizer(model_args, raw["train"][data_args.text_column])
    datasets = tokenize_and_pack(raw, tokenizer, data_args)
    if len(datasets["train"]) == 0 or len(datasets["validation"]) == 0:
        raise ValueError(
            f"Not enough text for one block of {data_args.max_seq_length} tokens in train and validation."
        )
    set_seed(training_args.seed)  # the initial weights of a model trained from scratch follow `--seed` too
    model = build_model(model_args, tokenizer, data_args.max_seq_length)
    common = {
        "model": model,
        "args": training_args,
        "train_dataset": datasets["train"],
        "eval_dataset": datasets["validation"],
        "processing_class": tokenizer,
        "data_collator": default_data_collator,
        "callbacks": callbacks,
    }
    trainer = SDTTrainer(sdt_config=sdt_config, **common) if sdt_config is not None else Trainer(**common)
    metrics = dict(trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
    metrics.update(trainer.evaluate())
    metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50))
    if sdt_config is not None:
        metrics.update(trainer.sdt_callback.controller.metrics())
    trainer.save_model()
    if trainer.is_world_process_zero():
        trainer.create_model_card()
    return metrics


def is_main_process() -> bool:
    """Whether this is rank 0 of a distributed run (or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def run_script(main, argv: list[str] | None = None):
    """Run a training script's `main(argv)` (default: the command line's arguments) and end a distributed run cleanly
    afterwards (`end_distributed`), whether it succeeded or not.

    Example:
        >>> run_script(lambda argv: len(argv), ["--max_steps", "10"])
        2
    """
    try:
        return main(sys.argv[1:] if argv is None else argv)
    finally:
        end_distributed()


def end_distributed() -> None:
    """End a distributed entry point cleanly: free the objects that hold the process group (a finished Trainer sits
    in reference cycles with its DDP model, whose reducer holds the group and the tensors of its last collectives),
    then destroy the group, while the interpreter is whole. Left to the interpreter's teardown, gloo's worker threads
    may release those tensors after Python is gone, and the process aborts (`terminate called without an active
    exception`) after all its work is done."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
