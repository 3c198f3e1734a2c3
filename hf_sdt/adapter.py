"""The adapter of updates mode: `sdt_adapter_config.json` (the SDT config, the base model's id or folder and each
layer's shape) and `sdt_adapter.safetensors` (each layer's compact updates and block ids, and the tensors of
`modules_to_save`), written and read for `hf_sdt.save_pretrained` / `hf_sdt.from_pretrained`."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from .blocks import check_block_ids
from .config import SDTConfig
from .files import model_class_for, read_safetensors
from .masks import block_grid
from .model import get_sdt_model, sdt_layers
from .sharding import shard_like
from .targets import find_target_modules
from .update_layer import SDTUpdateLinear

# Never `adapter_config.json`: transformers would then try to load a PEFT adapter.
ADAPTER_CONFIG_NAME = "sdt_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "sdt_adapter.safetensors"
ADAPTER_FORMAT = "hf_sdt-adapter-1"
UPDATES_SUFFIX = ".sdt_updates"
BLOCK_IDS_SUFFIX = ".sdt_block_ids"


def save_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str, base_model: str | None, revision: str | None
) -> None:
    os.makedirs(directory, exist_ok=True)
    sdt_config = model.config.sdt_config
    tensors = {}
    for name in sdt_layers(model):
        tensors[name + UPDATES_SUFFIX] = state[name + UPDATES_SUFFIX]  # (n, block_rows, block_cols)
        tensors[name + BLOCK_IDS_SUFFIX] = state[name + BLOCK_IDS_SUFFIX]  # (n,)
    for module_name in sdt_config["modules_to_save"]:
        tensors.update({key: value for key, value in state.items() if key.startswith(module_name + ".")})
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(directory, ADAPTER_WEIGHTS_NAME),
              metadata={"format": ADAPTER_FORMAT})  # fmt: skip
    description = {
        "format": ADAPTER_FORMAT,
        "base_model_name_or_path": recorded_base(base_model or getattr(model.config, "_name_or_path", None)),
        "revision": revision,
        "architectures": [type(model).__name__],
        "layer_shapes": {name: [layer.out_features, layer.in_features] for name, layer in sdt_layers(model).items()},
        "sdt_config": sdt_config,
    }
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=2, sort_keys=True)
        handle.write("\n")


def load_adapter(folder: str, base_model, model_class, kwargs) -> nn.Module:
    config_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            description = json.load(handle)
        sdt_config = SDTConfig.from_dict(description["sdt_config"])
    except (ValueError, KeyError) as error:
        raise ValueError(f"{config_path} is not a valid hf_sdt adapter config ({error}).") from error
    tensors, metadata = read_safetensors(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{os.path.join(folder, ADAPTER_WEIGHTS_NAME)} is not an hf_sdt adapter ({ADAPTER_FORMAT}).")
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        source = base_model or description.get("base_model_name_or_path")
        if not source:
            raise ValueError(
                f"The adapter in {folder} records no base model; pass base_model= (a Hub id, a folder or a model)."
            )
        if not base_model and os.path.isabs(source) and not os.path.isdir(source):
            raise OSError(
                f"The adapter in {folder} records its base model as the local folder {source!r}, which does not "
                "exist (here). Pass base_model= (the folder of a copy of that model, its Hub id, or a loaded model)."
            )
        revision = None if base_model else description.get("revision")
        cls = model_class_for(description.get("architectures"), model_class)
        try:
            model = cls.from_pretrained(source, **({"revision": revision} if revision else {}), **kwargs)
        except OSError as error:
            raise OSError(
                f"The adapter's base model {source!r} could not be loaded ({error}). Offline, pass base_model= with "
                "the folder of a local copy."
            ) from error
    shapes = {name: tuple(shape) for name, shape in description.get("layer_shapes", {}).items()}
    apply_adapter_(model, sdt_config, tensors, source=folder, shapes=shapes)
    return model


def recorded_base(source: str | None) -> str | None:
    """The base model as an adapter records it: a local folder as its absolute path (so that the adapter loads from
    any working directory), a Hub id as it is, None when there is none."""
    if not source:
        return None
    return os.path.abspath(source) if os.path.isdir(source) else source


def apply_adapter_(
    model: nn.Module,
    sdt_config: SDTConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Apply adapter tensors (`<layer>.sdt_updates`, `<layer>.sdt_block_ids`, `modules_to_save` tensors) to `model`,
    converting it first if it has no SDT layers. Everything is checked before the model is touched, so an adapter
    for another base model (names or shapes differ; `shapes` holds the (out, in) of each layer it was saved
    from) raises and leaves the model as it was.

    Example:
        >>> apply_adapter_(model, SDTConfig(mode="updates"), tensors, "adapter/")  # doctest: +SKIP
    """
    converted = bool(sdt_layers(model))
    targets = list(sdt_layers(model)) if converted else find_target_modules(model, sdt_config)
    saved = {key[: -len(UPDATES_SUFFIX)] for key in tensors if key.endswith(UPDATES_SUFFIX)}
    if saved != set(targets):
        missing, unexpected = sorted(set(targets) - saved), sorted(saved - set(targets))
        raise ValueError(
            f"The adapter from {source} does not fit {type(model).__name__}: no updates for {missing[:5]}, updates "
            f"for layers it does not have {unexpected[:5]}. Is it an adapter for another base model?"
        )
    block = sdt_config.block_shape
    ids = {}
    for name in targets:
        layer = model.get_submodule(name)
        shape = _out_in_shape(layer)
        ids[name] = tensors.get(name + BLOCK_IDS_SUFFIX, torch.empty(0, 0))
        try:
            if shapes and tuple(shapes.get(name, shape)) != shape:
                raise ValueError(f"it was saved from a {shapes[name][0]} x {shapes[name][1]} layer")
            check_block_ids(ids[name], block_grid(shape, block))
            expected = (ids[name].numel(), *block)
            if tuple(tensors[name + UPDATES_SUFFIX].shape) != expected:
                raise ValueError(f"updates of shape {tuple(tensors[name + UPDATES_SUFFIX].shape)}, not {expected}")
            if converted and not isinstance(layer, SDTUpdateLinear):
                raise ValueError("the model was converted in weights mode; load the adapter onto its base model")
            if converted and layer.block_size != block:
                raise ValueError(
                    f"the adapter has blocks of {block}, the model is configured with blocks of {layer.block_size} "
                    "(SDTConfig.block_size): convert the model with the adapter's block size"
                )
            if converted and layer.sdt_updates.shape != expected:
                raise ValueError(f"the adapter has {expected[0]} blocks, the layer {layer.sdt_updates.shape[0]}")
            if converted and layer.update_scale != sdt_config.update_scale:
                raise ValueError(
                    f"the adapter was trained with update_scale={sdt_config.update_scale}, the model is configured "
                    f"with {layer.update_scale} (SDTConfig.update_scale): the same updates would give other weights"
                )
        except ValueError as error:
            raise ValueError(
                f"The adapter from {source} does not fit layer {name!r} ({shape[0]} x {shape[1]}): {error}."
                + ("" if converted else " Is it an adapter for another base model?")
            ) from error
    state = model.state_dict()
    dense = {key: value for key, value in tensors.items() if not key.endswith((UPDATES_SUFFIX, BLOCK_IDS_SUFFIX))}
    for key, value in dense.items():
        if key not in state or state[key].shape != value.shape:
            found = "no such tensor" if key not in state else f"shape {tuple(state[key].shape)}"
            raise ValueError(
                f"The adapter from {source} holds {key!r} of shape {tuple(value.shape)}; {type(model).__name__} has "
                f"{found}. Is it an adapter for another base model?"
            )
    if not converted:
        get_sdt_model(model, sdt_config, block_ids=ids)
    with torch.no_grad():
        for name, layer in sdt_layers(model).items():
            layer.move_blocks_(torch.arange(ids[name].numel(), device=layer.sdt_block_ids.device), ids[name])
            layer.sdt_updates.copy_(shard_like(tensors[name + UPDATES_SUFFIX], layer.sdt_updates))
            layer.materialize_()  # now: a layer sharded by FSDP2 gathers its weight from the shards again in backward
        model.load_state_dict({key: shard_like(value, state[key]) for key, value in dense.items()}, strict=False)


def _out_in_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or SDT layer, or of a GPT-2 Conv1D (whose weight is (in, out))."""
    if hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features
    return layer.weight.shape[1], layer.weight.shape[0]
