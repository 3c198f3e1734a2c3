"""hf_sdt: Sparse-Dynamic Training for the Hugging Face stack."""

from .config import SDTConfig
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
    "get_sdt_model",
    "print_sparsity_summary",
    "sdt_layers",
    "sparsity_summary",
    "unload",
]
