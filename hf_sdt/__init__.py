"""hf_sdt: Sparse-Dynamic Training for the Hugging Face stack."""

from .config import SDTConfig
from .hub import from_pretrained, push_to_hub, save_pretrained, write_model_card
from .layer import SDTLinear
from .model import find_target_modules, get_sdt_model, print_sparsity_summary, sdt_layers, sparsity_summary, unload
from .trainer import SDTCallback, SDTController, SDTTrainer

__version__ = "0.1.0"

__all__ = [
    "SDTCallback",
    "SDTConfig",
    "SDTController",
    "SDTLinear",
    "SDTTrainer",
    "find_target_modules",
    "from_pretrained",
    "get_sdt_model",
    "print_sparsity_summary",
    "push_to_hub",
    "save_pretrained",
    "sdt_layers",
    "sparsity_summary",
    "unload",
    "write_model_card",
]
