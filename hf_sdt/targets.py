"""Which layers of a model SDT converts (`target_modules`, `exclude_modules`, "all-linear") and which it trains
densely in updates mode (`modules_to_save`), by PEFT's matching rules."""

from __future__ import annotations

import logging
import re

from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, SDTConfig

logger = logging.getLogger(__name__)

LINEAR_LIKE = (nn.Linear, Conv1D)
# The heads that updates mode trains densely by default (PEFT's modules_to_save for sequence classification).
CLASSIFIER_HEADS = ("classifier", "score")


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (`lm_head`), also inside a PEFT model (whose wrapped model has it)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        return set()
    output_embeddings = inner.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is output_embeddings and name}


def _all_linear_skips(name: str, modules: dict[str, nn.Module]) -> bool:
    """Whether `all-linear` leaves out the linear layer `name`: a classification head (`classifier`, `score`, as
    PEFT's all-linear does) or a PEFT adapter's own layers (LoRA's `lora_A` / `lora_B`; the wrapped `base_layer`
    is a target)."""
    parts = name.split(".")
    if any(part in CLASSIFIER_HEADS for part in parts):
        return True
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    for depth in range(1, len(parts)):
        if isinstance(modules[".".join(parts[:depth])], BaseTunerLayer) and parts[depth] != "base_layer":
            return True
    return False


def find_target_modules(model: nn.Module, config: SDTConfig) -> list[str]:
    """Qualified names of the layers `config` targets, in module order; raises a ValueError when none match.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> find_target_modules(model, SDTConfig(target_modules=["c_fc"]))
        ['transformer.h.0.mlp.c_fc']
    """
    modules = dict(model.named_modules())
    linear_names = [name for name, module in modules.items() if isinstance(module, LINEAR_LIKE)]
    if config.target_modules == ALL_LINEAR:
        skipped = _output_embedding_names(model)
        targets = [name for name in linear_names if name not in skipped and not _all_linear_skips(name, modules)]
    else:
        targets = [name for name, _ in model.named_modules() if name and _matches(name, config.target_modules)]
        if isinstance(config.target_modules, list):
            for key in config.target_modules:
                if not any(_matches(name, [key]) for name in targets):
                    logger.warning("SDT target_modules entry %r matched no module of this model.", key)
    if config.exclude_modules is not None:
        targets = [name for name in targets if not _matches(name, config.exclude_modules)]
    if config.mode == "updates":  # modules trained densely are not also given sparse updates
        dense = find_modules_to_save(model, config)
        targets = [name for name in targets if not any(name == m or name.startswith(m + ".") for m in dense)]
    if not targets:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        advice = "pass some of these names" + ("" if config.target_modules == ALL_LINEAR else " or 'all-linear'")
        raise ValueError(
            f"SDTConfig.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matched no layer of {type(model).__name__}. Linear layers available: {available or 'none'}; {advice}."
        )
    for name in targets:
        if not isinstance(modules[name], LINEAR_LIKE):
            raise ValueError(
                f"SDT target {name!r} is a {type(modules[name]).__name__}, not an nn.Linear or Conv1D; "
                "name its linear sub-layers instead (see the model's print-out)."
            )
    return targets


def find_modules_to_save(model: nn.Module, config: SDTConfig) -> list[str]:
    """Qualified names of the modules updates mode trains densely: those `config.modules_to_save` names (matched
    like `target_modules`), or by default the classification head (`classifier` / `score`) if the model has one.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        >>> find_modules_to_save(BertForSequenceClassification(bert), SDTConfig(mode="updates"))
        ['classifier']
    """
    names = [name for name, _ in model.named_modules() if name]
    if config.modules_to_save is None:
        return [name for name in names if name.rsplit(".", 1)[-1] in CLASSIFIER_HEADS]
    found = [name for name in names if _matches(name, config.modules_to_save)]
    keys = config.modules_to_save if isinstance(config.modules_to_save, list) else [config.modules_to_save]
    for key in keys:
        if not any(_matches(name, [key] if isinstance(config.modules_to_save, list) else key) for name in found):
            raise ValueError(
                f"SDTConfig.modules_to_save entry {key!r} matched no module of {type(model).__name__}; name modules "
                "as print(model) shows them, e.g. 'score' or 'classifier'."
            )
    return [name for name in found if not any(name.startswith(other + ".") for other in found)]


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embeddings, or None for a model without them (a plain stack of linear layers)."""
    if not isinstance(model, PreTrainedModel):
        return None
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def check_not_tied(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Refuse to convert a layer whose weight is tied to the input embeddings (converting it would change them)."""
    input_embeddings = _input_embeddings(model)
    if input_embeddings is not None and getattr(input_embeddings, "weight", None) is layer.weight:
        raise ValueError(
            f"SDT target {name!r} shares its weight with the input embeddings; sparsifying it would zero "
            "embedding rows. Remove it from target_modules or untie the embeddings first."
        )
