"""Reading what `hf_sdt.save_pretrained` wrote: safetensors files with errors that name them, and the model class
of a saved architecture."""

from __future__ import annotations

import torch
import transformers
from safetensors import safe_open


def read_safetensors(path: str, suffix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors whose names end with `suffix` (all by default) and the metadata of a safetensors file; an
    unreadable file is an error that names it."""
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.endswith(suffix)}
            return tensors, handle.metadata() or {}
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); it is corrupt or "
            "incomplete (an interrupted save or download?): save or download it again."
        ) from error


def model_class_for(architectures: list[str] | None, model_class):
    if model_class is not None:
        return model_class
    for architecture in architectures or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    raise ValueError(
        f"Cannot tell the model class from architectures={architectures}; pass model_class=, e.g. "
        "transformers.AutoModelForCausalLM."
    )
