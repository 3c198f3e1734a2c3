"""hf_sdt: Sparse-Dynamic Training for the Hugging Face stack.

`import hf_sdt` loads the config, layers, model conversion and controllers; the Trainer integration (`SDTTrainer`,
`SDTCallback`; TRL's `SDTSFTTrainer`, `SDTDPOTrainer`, which need `pip install "hf-sdt[trl]"`), Hub I/O
(`save_pretrained`, `from_pretrained`, `push_to_hub`) and the card (`write_model_card`)
are imported on first use, so that a user of `get_sdt_model` alone does not pay for `transformers.Trainer` and
`huggingface_hub`.
"""

import importlib

from .config import SDTConfig
from .controller import SDTController, UpdatesController, WeightsController
from .layer import SDTCompactLinear, SDTLayer, SDTLinear
from .model import (
    disable_updates,
    get_sdt_model,
    merge_and_unload,
    print_sparsity_summary,
    sdt_layers,
    sparsity_summary,
    unload,
)
from .targets import find_target_modules
from .update_layer import SDTUpdateLinear

__version__ = "0.1.0"

# name -> the submodule that defines it, imported on first access (module __getattr__, PEP 562)
_LAZY = {
    "SDTCallback": "trainer",
    "SDTTrainer": "trainer",
    "SDTSFTTrainer": "trl_trainers",
    "SDTDPOTrainer": "trl_trainers",
    "from_pretrained": "hub",
    "push_to_hub": "hub",
    "save_pretrained": "hub",
    "write_model_card": "card",
}

__all__ = [
    "SDTCallback",
    "SDTCompactLinear",
    "SDTConfig",
    "SDTController",
    "SDTDPOTrainer",
    "SDTLayer",
    "SDTLinear",
    "SDTSFTTrainer",
    "SDTTrainer",
    "SDTUpdateLinear",
    "UpdatesController",
    "WeightsController",
    "disable_updates",
    "find_target_modules",
    "from_pretrained",
    "get_sdt_model",
    "merge_and_unload",
    "print_sparsity_summary",
    "push_to_hub",
    "save_pretrained",
    "sdt_layers",
    "sparsity_summary",
    "unload",
    "write_model_card",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
