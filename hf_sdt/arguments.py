"""The flags of `hf-sdt train` (and of the demo and recipes, which share them): transformers' own argument
dataclasses plus one flag per `SDTConfig` field, and YAML config files as flags."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields

import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config import ALL_LINEAR, SDTConfig
from .training import DataArguments, ModelArguments

REGEX_CHARACTERS = set(".*+?[](){}|^$\\")
LIST_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")
# TrainingArguments flags that `hf-sdt train --help` shows (all of them are accepted; `--help-all` shows them all).
COMMON_TRAINING_FLAGS = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "eval_strategy", "eval_steps", "logging_steps", "save_strategy", "save_steps", "seed", "bf16", "use_cpu",
    "report_to", "resume_from_checkpoint", "push_to_hub", "hub_model_id",
)  # fmt: skip


def _sdt_value(name: str, values: list) -> object:
    """Turn the command-line tokens of an SDTConfig field into its value."""
    if name == "block_size":
        return values[0] if len(values) == 1 else tuple(values)
    if name in LIST_FIELDS:
        single = values[0] if len(values) == 1 else None
        if single is not None and (single == ALL_LINEAR or REGEX_CHARACTERS & set(single)):
            return single  # one name with regex characters (or "all-linear") is a regex, as in SDTConfig
        return list(values)
    return values


def add_sdt_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SDTConfig field (its help and real default included), plus `--dense` for a baseline."""
    group = parser.add_argument_group("SDT (see hf_sdt.SDTConfig)")
    for spec in fields(SDTConfig):
        if spec.name == "seed":
            continue  # one seed per run: TrainingArguments' --seed also seeds SDT
        # A flag not given stays out of the namespace, so SDTConfig (and its mode) fills in the default.
        help_text = spec.metadata.get("help", "") + ("" if spec.default is None else f" (default: {spec.default})")
        if spec.name in (*LIST_FIELDS, "block_size"):
            kind = int if spec.name == "block_size" else str
            group.add_argument(f"--{spec.name}", nargs="+", type=kind, default=argparse.SUPPRESS, help=help_text)
        else:
            kind = _scalar_type(spec.type)
            group.add_argument(f"--{spec.name}", type=kind, default=argparse.SUPPRESS, help=help_text)
    group.add_argument("--dense", action="store_true", help="Train without SDT (a dense baseline).")


def _scalar_type(annotation: str) -> type:
    """The parser type of a scalar SDTConfig field from its annotation ("float | None" -> float).

    Example:
        >>> _scalar_type("int | None"), _scalar_type("str")
        (<class 'int'>, <class 'str'>)
    """
    return {"int": int, "float": float, "str": str}[annotation.split("|")[0].strip()]


def sdt_config_from(namespace: argparse.Namespace, seed: int, **defaults) -> SDTConfig | None:
    """The SDTConfig of the parsed SDT flags (None with `--dense`); `defaults` fill fields no flag set."""
    values = dict(vars(namespace))
    if values.pop("dense", False):
        return None
    values = {key: _sdt_value(key, value) for key, value in values.items()}
    return SDTConfig(seed=seed, **{**defaults, **values})


def build_train_parser(show_all: bool = False) -> HfArgumentParser:
    """Model, data and TrainingArguments flags (transformers' own names), plus the SDT flags. Every TrainingArguments
    flag is accepted; `--help` lists the common ones (`COMMON_TRAINING_FLAGS`) unless `show_all`."""
    training_flags = {spec.name for spec in fields(TrainingArguments)}
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        prog="hf-sdt train",
        usage="hf-sdt train [CONFIG.yaml] [--flag value ...]",
        description="Train a causal LM with SDT. Flags after CONFIG.yaml override its values.",
        epilog=None if show_all else (
            f"Every one of transformers' {len(training_flags)} TrainingArguments flags is accepted; the common "
            "ones are listed above and `hf-sdt train --help-all` lists them all."
        ),
    )  # fmt: skip
    if not show_all:
        for action in parser._actions:
            if action.dest in training_flags and action.dest not in COMMON_TRAINING_FLAGS:
                action.help = argparse.SUPPRESS
    add_sdt_arguments(parser)
    return parser


def expand_config_file(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`CONFIG.yaml [--key value ...]` as flags: the file's values first, so that later flags override them."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        return _yaml_to_args(argv[0], parser) + argv[1:]
    return argv


def _yaml_to_args(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line form of a YAML config, after checking every key is a known flag."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values.")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in {path}: each key must be a ModelArguments, DataArguments, "
            "TrainingArguments or SDTConfig field (see `hf-sdt train --help`)."
        )
    return values_to_flags(values)


def values_to_flags(values: dict) -> list[str]:
    """Option values as command-line flags: lists become several tokens, mappings JSON, None is left out.

    Example:
        >>> values_to_flags({"density": 0.25, "target_modules": ["q_proj", "v_proj"], "exclude_modules": None})
        ['--density', '0.25', '--target_modules', 'q_proj', 'v_proj']
    """
    flags = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, dict):
            value = json.dumps(value)
        flags += [f"--{key}", *(str(item) for item in (value if isinstance(value, list) else [value]))]
    return flags


def parse_train_args(argv: list[str]):
    """(ModelArguments, DataArguments, TrainingArguments, SDTConfig or None) from `CONFIG.yaml [--key value ...]`;
    flags after the file override its values."""
    parser = build_train_parser()
    argv = expand_config_file(argv, parser)
    model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, sdt_config_from(rest, training_args.seed)
