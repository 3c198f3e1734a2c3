"""Attach SDT to a model: match target layers, swap them for `SDTLinear` in place, undo it, summarise it."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, SDTConfig
from .layer import SDTLinear
from .masks import block_element_counts, block_grid, block_norms, topk_block_mask
from .schedule import initial_density, target_block_counts
from .topology import global_block_counts

logger = logging.getLogger(__name__)

LINEAR_LIKE = (nn.Linear, Conv1D)


def _matches(name: str, pattern: list[str] | str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _output_embedding_names(model: nn.Module) -> set[str]:
    if not isinstance(model, PreTrainedModel):
        return set()
    output_embeddings = model.get_output_embeddings()
    return {name for name, module in model.named_modules() if module is output_embeddings and name}


def find_target_modules(model: nn.Module, config: SDTConfig) -> list[str]:
    """Qualified names of the layers `config` targets, in module order; raises a ValueError when none match.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> find_target_modules(model, SDTConfig(target_modules=["c_fc"]))
        ['transformer.h.0.mlp.c_fc']
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, LINEAR_LIKE)]
    if config.target_modules == ALL_LINEAR:
        skipped = _output_embedding_names(model)
        targets = [name for name in linear_names if name not in skipped]
    else:
        targets = [name for name, _ in model.named_modules() if name and _matches(name, config.target_modules)]
        if isinstance(config.target_modules, list):
            for key in config.target_modules:
                if not any(_matches(name, [key]) for name in targets):
                    logger.warning("SDT target_modules entry %r matched no module of this model.", key)
    if config.exclude_modules is not None:
        targets = [name for name in targets if not _matches(name, config.exclude_modules)]
    if not targets:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"SDTConfig.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matched no layer of {type(model).__name__}. Linear layers available: {available}; "
            "pass some of these names or target_modules='all-linear'."
        )
    modules = dict(model.named_modules())
    for name in targets:
        if not isinstance(modules[name], LINEAR_LIKE):
            raise ValueError(
                f"SDT target {name!r} is a {type(modules[name]).__name__}, not an nn.Linear or Conv1D; "
                "name its linear sub-layers instead (see the model's print-out)."
            )
    return targets


def _check_not_tied(model: nn.Module, name: str, layer: nn.Module) -> None:
    input_embeddings = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    if input_embeddings is not None and getattr(input_embeddings, "weight", None) is layer.weight:
        raise ValueError(
            f"SDT target {name!r} shares its weight with the input embeddings; sparsifying it would zero "
            "embedding rows. Remove it from target_modules or untie the embeddings first."
        )


def get_sdt_model(model: nn.Module, config: SDTConfig, masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Swap every targeted layer of `model` for an `SDTLinear` in place and return the same model object.

    The initial mask keeps the blocks of largest Frobenius norm (so a pretrained model loses as little as
    possible) at the schedule's starting density (`initial_density`, or `density` with `schedule="constant"`),
    spread over layers by `distribution`: with `"uniform"` each layer keeps exactly `max(1, round(d * n_blocks))`
    blocks. The other weights are set to exactly zero. The config is
    stored as a dict in `model.config.sdt_config`, so it survives `save_pretrained`.

    `masks` (layer name -> block mask) restores saved masks instead, as `hf_sdt.from_pretrained` does; their
    names must be exactly the targeted layers and their shapes must fit the weights.

    Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2))
    >>> model = get_sdt_model(model, SDTConfig(density=0.5, block_size=16, schedule="constant"))
    >>> round(sparsity_summary(model)["density"], 2)
    0.5
    """
    if sdt_layers(model):
        raise ValueError(
            "This model already has SDT layers (get_sdt_model was applied); call hf_sdt.unload(model) first "
            "to convert it again with another config."
        )
    targets = find_target_modules(model, config)
    block = config.block_shape
    layers = [model.get_submodule(name) for name in targets]
    for name, layer in zip(targets, layers, strict=True):
        _check_not_tied(model, name, layer)
    weights = [layer.weight if isinstance(layer, nn.Linear) else layer.weight.t() for layer in layers]  # (out, in)
    shapes = [tuple(weight.shape) for weight in weights]
    if masks is not None:
        _check_saved_masks(masks, targets, shapes, block)
        chosen = [masks[name].bool() for name in targets]
    else:
        chosen = _initial_masks(weights, config)
    for name, layer, mask in zip(targets, layers, chosen, strict=True):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, SDTLinear(layer, block, mask, config.backend))
    if hasattr(model, "config"):
        model.config.sdt_config = config.to_dict()
    return model


def _initial_masks(weights: list[torch.Tensor], config: SDTConfig) -> list[torch.Tensor]:
    """The largest-norm blocks of each (out, in) weight at the schedule's starting density and distribution."""
    block = config.block_shape
    scores = [block_norms(weight, block) for weight in weights]
    shapes = [tuple(weight.shape) for weight in weights]
    if config.distribution == "global":
        total = max(len(weights), round(initial_density(config) * sum(score.numel() for score in scores)))
        candidates = [torch.ones_like(score, dtype=torch.bool) for score in scores]
        counts = global_block_counts(scores, candidates, [block_element_counts(block, s) for s in shapes], total)
    else:
        counts = target_block_counts(shapes, block, initial_density(config), config.distribution)
    generator = torch.Generator().manual_seed(config.seed)
    return [topk_block_mask(score, count, generator) for score, count in zip(scores, counts, strict=True)]


def _check_saved_masks(masks: dict[str, torch.Tensor], targets: list[str], shapes: list, block) -> None:
    missing, unexpected = sorted(set(targets) - set(masks)), sorted(set(masks) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"The saved masks do not match the layers the SDT config targets: missing masks for {missing[:5]}, "
            f"masks for layers it does not target {unexpected[:5]}. Was the checkpoint saved from this model class "
            "with this sdt_config?"
        )
    for name, shape in zip(targets, shapes, strict=True):
        if tuple(masks[name].shape) != block_grid(shape, block):
            raise ValueError(
                f"The saved mask of layer {name!r} has shape {tuple(masks[name].shape)}, but its {shape[0]} x "
                f"{shape[1]} weight with blocks of {block} needs {block_grid(shape, block)}."
            )


def sdt_layers(model: nn.Module) -> dict[str, SDTLinear]:
    """The `SDTLinear` layers of `model` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SDTLinear)}


def unload(model: nn.Module) -> nn.Module:
    """Swap every `SDTLinear` back to its original class (weights keep their zeros) and drop `sdt_config`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = get_sdt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), SDTConfig())
        >>> sdt_layers(unload(model))
        {}
    """
    for name, layer in sdt_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.unload())
    if hasattr(model, "config") and hasattr(model.config, "sdt_config"):
        del model.config.sdt_config
    return model


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """Density of the SDT layers of `model` and the multiply-adds their block-sparse products need.

    Returns a dict with `density` (active fraction of all targeted weight elements), `linear_flops_ratio`
    (sparse / dense multiply-adds of the targeted layers for the forward and both gradients; each product scales
    with the active elements, so this is the active fraction) and `layers`, one dict per layer with `name`,
    `shape` (out, in), `block_size`, `active_blocks`, `total_blocks` and `density`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2))
        >>> model = get_sdt_model(model, SDTConfig(density=0.5, block_size=32, schedule="constant"))
        >>> sparsity_summary(model)["layers"][0]["active_blocks"]
        6
    """
    layers = []
    active = total = 0
    for name, layer in sdt_layers(model).items():
        elements = layer.out_features * layer.in_features
        layer_density = layer.density
        active += layer_density * elements
        total += elements
        layers.append(
            {
                "name": name,
                "shape": (layer.out_features, layer.in_features),
                "block_size": layer.block_size,
                "active_blocks": int(layer.sdt_mask.sum()),
                "total_blocks": layer.sdt_mask.numel(),
                "density": layer_density,
            }
        )
    if not layers:
        raise ValueError("This model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)).")
    density = active / total
    return {"density": density, "linear_flops_ratio": density, "layers": layers}


def print_sparsity_summary(model: nn.Module, file: Any | None = None) -> None:
    """Print `sparsity_summary(model)` as a table, one row per SDT layer and a total."""
    summary = sparsity_summary(model)
    width = max(len(layer["name"]) for layer in summary["layers"])
    rows = [f"{'layer':<{width}}  {'shape':>13}  {'block':>9}  {'blocks':>13}  {'density':>7}"]
    for layer in summary["layers"]:
        shape = "{} x {}".format(*layer["shape"])
        block = "{}x{}".format(*layer["block_size"])
        blocks = f"{layer['active_blocks']}/{layer['total_blocks']}"
        rows.append(f"{layer['name']:<{width}}  {shape:>13}  {block:>9}  {blocks:>13}  {layer['density']:>7.3f}")
    rows.append(
        f"{len(summary['layers'])} SDT layers, density {summary['density']:.4f}, "
        f"linear FLOPs ratio {summary['linear_flops_ratio']:.4f} of dense"
    )
    print("\n".join(rows), file=file)
