"""Updates-mode adapters in PEFT's SHiRA format, which stock `peft.PeftModel.from_pretrained(base, folder)` loads
without hf_sdt: each targeted layer's update as its nonzero values with their (row, column) indices.

SHiRA gives every layer the same rank r and so r x (in + out) values: r is the smallest that holds the largest
layer's block elements, and each layer pads with zero-valued entries at positions outside its blocks (which add
exactly nothing). The file holds 4 bytes of value and 8 of indices per entry, padding included, against about 4
per element (plus one id per block) in hf_sdt's own format. A PEFT-format adapter is for loading and merging:
dynamic topology is hf_sdt's, and continuing SDT training needs hf_sdt's format.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from torch import nn

from .blocks import element_positions
from .model import sdt_layers
from .update_layer import SDTUpdateLinear

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def save_peft_shira(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str, base_model_name_or_path: str | None
) -> dict[str, int]:
    """Write the updates of `model` (updates mode, `nn.Linear` targets), read from its full `state` dict (gathered,
    under FSDP2), as a PEFT SHiRA adapter in `directory`; return the entries written and how many are padding.

    Example:
        >>> hf_sdt.save_pretrained(model, "my-adapter", format="peft")  # doctest: +SKIP
        >>> PeftModel.from_pretrained(base, "my-adapter").merge_and_unload()  # doctest: +SKIP
    """
    from peft import ShiraConfig  # peft is a dependency of hf_sdt; imported here, where it is used

    layers = _linear_update_layers(model)
    entries = {name: _effective_entries(layer, state[name + ".sdt_updates"], state[name + ".sdt_block_ids"])
               for name, layer in layers.items()}  # fmt: skip
    rank = max(-(-values.numel() // (layer.in_features + layer.out_features))
               for (rows, cols, values), layer in zip(entries.values(), layers.values(), strict=True))  # fmt: skip
    tensors, padding = {}, 0
    for name, layer in layers.items():
        rows, cols, values = entries[name]
        count = rank * (layer.in_features + layer.out_features)
        if count > layer.in_features * layer.out_features:
            raise ValueError(
                f"PEFT's SHiRA format gives every layer r x (in + out) entries, r = {rank} here, which is more than "
                f"{name!r} holds ({layer.out_features} x {layer.in_features}): its blocks are too unequal across "
                "layers for this format. Save in hf_sdt's own format (format='sdt')."
            )
        rows, cols, values = _padded(rows, cols, values, count, (layer.out_features, layer.in_features))
        padding += count - entries[name][2].numel()
        prefix = f"base_model.model.{name}"
        tensors[prefix + ".shira_weight"] = values.float().contiguous()
        tensors[prefix + ".shira_indices"] = torch.stack([rows, cols]).to(torch.int32).contiguous()
    os.makedirs(directory, exist_ok=True)
    save_file({key: value.cpu() for key, value in tensors.items()}, os.path.join(directory, PEFT_WEIGHTS_NAME))
    config = ShiraConfig(r=rank, target_modules=sorted(layers), base_model_name_or_path=base_model_name_or_path)
    config.save_pretrained(directory)
    return {"entries": sum(value.numel() for key, value in tensors.items() if key.endswith("weight")),
            "padding": padding}  # fmt: skip


def _linear_update_layers(model: nn.Module) -> dict[str, SDTUpdateLinear]:
    layers = sdt_layers(model)
    if not layers or not all(isinstance(layer, SDTUpdateLinear) for layer in layers.values()):
        raise ValueError("format='peft' writes updates-mode adapters; this model is not in updates mode.")
    conv1d = [name for name, layer in layers.items() if layer.is_conv1d]
    if conv1d:
        raise ValueError(
            f"PEFT's SHiRA adapters apply to nn.Linear layers only, and {conv1d[0]!r} is a GPT-2 Conv1D. Save in "
            "hf_sdt's own format (format='sdt')."
        )
    modules_to_save = model.config.sdt_config.get("modules_to_save") or []
    if modules_to_save:
        raise ValueError(
            f"format='peft' does not write modules_to_save ({modules_to_save}) yet; save in hf_sdt's own format."
        )
    return layers


def _effective_entries(layer: SDTUpdateLinear, updates: torch.Tensor, block_ids: torch.Tensor):
    """(rows, cols, values) of the layer's delta, update_scale x updates, inside the weight (edge padding cut)."""
    shape = (layer.out_features, layer.in_features)
    rows, cols, inside = element_positions(block_ids, layer.block_size, shape)
    values = layer.update_scale * updates.detach()
    return rows[inside], cols[inside], values[inside]


def _padded(rows, cols, values, count: int, shape: tuple[int, int]):
    """The entries plus zero-valued ones, at the first row-major positions they do not cover, up to `count`."""
    taken = torch.zeros(shape, dtype=torch.bool, device=rows.device)
    taken[rows, cols] = True
    free = (~taken).flatten().nonzero().flatten()[: count - rows.numel()]
    return (torch.cat([rows, free // shape[1]]), torch.cat([cols, free % shape[1]]),
            torch.cat([values, values.new_zeros(free.numel())]))  # fmt: skip
