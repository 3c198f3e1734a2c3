"""hf_sdt: Sparse-Dynamic Training for the Hugging Face stack."""

from .config import SDTConfig
from .controller import SDTController, UpdatesController, WeightsController
from .hub import from_pretrained, push_to_hub, save_pretrained, write_model_card
from .layer import SDTCompactLinear, SDTLayer, SDTLinear, SDTUpdateLinear
from .model import (
    find_target_modules,
    get_sdt_model,
    merge_and_unload,
    print_sparsity_summary,
    sdt_layers,
    sparsity_summary,
    unload,
)
from .trainer import SDTCallback, SDTTrainer

__version__ = "0.1.0"

__all__ = [
    "SDTCallback",
    "SDTCompactLinear",
    "SDTConfig",
    "SDTController",
    "SDTLayer",
    "SDTLinear",
    "SDTTrainer",
    "SDTUpdateLinear",
    "UpdatesController",
    "WeightsController",
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
