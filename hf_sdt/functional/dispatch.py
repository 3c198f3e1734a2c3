"""Which products a call runs: the backend for a device (`resolve_backend`) and, on the torch backend, the fitted
cost rules that choose the blocked, dense or few-token product per call (`choose_ops`)."""

from __future__ import annotations

import torch

from ..config import BACKENDS
from .cpu_ops import BlockedTorchOps, DenseTorchOps, FewTokensOps
from .layouts import BlockedLayout, CompactLayout
from .triton_ops import TritonOps, _kernels, triton_available

# When the blocked path pays, as a cost model fitted to measurements on a 2-core CPU (fp32, fwd+bwd):
#   blocked time ~ density / efficiency x dense time + GEMM calls x overhead.
# `BLOCKED_GEMM_EFFICIENCY`, by the smaller block side: the blocked GEMMs' throughput relative to one dense GEMM. The
# blocked path stopped paying at densities of about 0.28 / 0.52 / 0.72 / 0.85 for sides 16 / 32 / 64 / 128 at
# 2048 tokens x 4096 -> 4096 (benchmarks/results/blocked_cpu*.md), the overhead term included. Sides below 16 were
# not measured and always run dense.
BLOCKED_GEMM_EFFICIENCY = ((128, 0.85), (64, 0.75), (32, 0.6), (16, 0.35))
# The fixed cost of one GEMM call of the blocked path, in dense multiply-adds (about 6-16 us each, fitted to layers
# of 256-1024 features with 256-4096 tokens).
BLOCKED_GEMM_OVERHEAD_MACS = 1e6


def blocked_path_pays(layout: BlockedLayout, tokens: int, block: tuple[int, int]) -> bool:
    """Whether the blocked PyTorch path beats one dense GEMM on the masked weight for this call (measured rule).

    Example:
        >>> from hf_sdt.functional.layouts import build_blocked_layout
        >>> layout = build_blocked_layout(torch.eye(64, dtype=torch.bool), (64, 64), (4096, 4096))
        >>> blocked_path_pays(layout, 2048, (64, 64)), blocked_path_pays(layout, 1, (64, 64))
        (True, False)
    """
    side = min(block)
    efficiency = next((value for min_side, value in BLOCKED_GEMM_EFFICIENCY if side >= min_side), 0.0)
    if layout.density >= efficiency:
        return False
    dense_macs = 3 * tokens * layout.shape[0] * layout.shape[1]  # forward, dX and dW
    return dense_macs * (1 - layout.density / efficiency) >= layout.gemm_calls * BLOCKED_GEMM_OVERHEAD_MACS


# Few-token inference (decoding) runs `FewTokensOps` up to `FEW_TOKENS` tokens per call when it reads fewer bytes than
# one dense GEMM on the zero-filled weight: it costs about FEW_TOKENS_OVERHEAD_BYTES of fixed work per call (80-100 us
# on a 2-core CPU, the time to read about 1 MB there) plus twice the bytes of the active blocks (gathered, then read
# again by the product). Fitted to benchmarks/bench_decode.py (SDT 0.5 on the SmolLM2 shape ran slower than dense
# with the factor 1) and the per-layer timings behind it.
FEW_TOKENS = 16
FEW_TOKENS_OVERHEAD_BYTES = 1e6


def few_token_inference(tokens: int, for_training: bool) -> bool:
    """Whether a call may take the few-token product: inference (no backward follows) on at most `FEW_TOKENS`.

    Example:
        >>> few_token_inference(1, for_training=False), few_token_inference(1, for_training=True)
        (True, False)
    """
    return not for_training and tokens <= FEW_TOKENS


def few_tokens_pay(layout: BlockedLayout, element_size: int) -> bool:
    """Whether the few-token product beats one dense GEMM on the zero-filled weight (measured rule, see above):
    at fp32, below density 0.36 for a 1536 x 576 layer, 0.12 for 576 x 576, never for 1 MB or less.

    Example:
        >>> quarter = torch.arange(216).view(24, 9) % 4 == 0
        >>> from hf_sdt.functional.layouts import build_blocked_layout
        >>> layout = build_blocked_layout(quarter, (64, 64), (1536, 576))
        >>> few_tokens_pay(layout, 4), few_tokens_pay(layout, 2)  # fp32, bf16
        (True, False)
    """
    weight_bytes = layout.shape[0] * layout.shape[1] * element_size
    return FEW_TOKENS_OVERHEAD_BYTES + 2 * layout.density * weight_bytes < weight_bytes


def choose_ops(backend: str, layout, tokens: int, for_training: bool, element_size: int = 4):
    """The products of one call: Triton kernels; or on the torch backend the few-token product (inference, when
    `few_tokens_pay`, and always for a compact store, whose dense product would first scatter it into a whole
    weight), the blocked path when it pays (`blocked_path_pays`), else one dense GEMM on the zero-filled weight."""
    if backend == "triton":
        return TritonOps
    compact = isinstance(layout, CompactLayout)
    if few_token_inference(tokens, for_training) and (compact or few_tokens_pay(layout, element_size)):
        return FewTokensOps
    return BlockedTorchOps if blocked_path_pays(layout, tokens, layout.block) else DenseTorchOps


def seen_by_dispatch_mode() -> bool:
    """Whether a `TorchDispatchMode` (`FlopCounterMode`, a memory tracker, ...) is active: eager products then run
    as their custom ops, which the mode sees as one call each (with its FLOP formula, `functional.flops`), rather
    than as the kernels inside them.

    Example:
        >>> from torch.utils.flop_counter import FlopCounterMode
        >>> with FlopCounterMode(display=False):
        ...     seen_by_dispatch_mode()
        True
    """
    return torch._C._len_torch_dispatch_stack() > 0


def resolve_backend(backend: str, device: torch.device, block: tuple[int, int] = (64, 64)) -> str:
    """The concrete backend for `backend` on `device`: `"auto"` means Triton on CUDA (when triton imports and the
    block suits the kernels), the blocked torch path otherwise.

    Example:
        >>> resolve_backend("auto", torch.device("cpu"))
        'torch'
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown SDT backend {backend!r}; use one of {BACKENDS}.")
    if backend == "auto":
        if device.type == "cuda" and triton_available(device) and _kernels().supports_block(block):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available(device):
            raise RuntimeError(
                "backend='triton' needs the `triton` package and a CUDA device; "
                f"this tensor is on {device}. Use backend='auto' or backend='torch'."
            )
        if not _kernels().supports_block(block):
            raise ValueError(
                f"backend='triton' needs block sides that are powers of two >= 16, got {block}; "
                "change SDTConfig.block_size or use backend='torch'."
            )
    return backend
