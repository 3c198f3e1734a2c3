"""The Triton launchers: the GPU kernels of `hf_sdt.kernels` (imported only when they run) behind the same
interface as the CPU products, and whether they can run at all."""

from __future__ import annotations

import os

import torch


def _kernels():
    from ..kernels import block_sparse  # imports triton: only when the Triton backend runs

    return block_sparse


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: triton imports, and the device is CUDA (or, for tests, the
    CPU under `TRITON_INTERPRET=1`)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


class TritonOps:
    """The Triton kernels of `hf_sdt.kernels` on a `TritonLayout`, or on the `CompactLayout` of a compact store."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        return _kernels().block_sparse_forward(x, weight, layout.meta, layout.block, layout.shape[0])

    @staticmethod
    def flops(layout, tokens: int, need_x: bool, need_w: bool) -> tuple[int, int, int]:
        """FLOPs (forward, dX, dW) of one call: every kernel multiplies whole blocks (the padding of edge blocks
        included), one per active block."""
        product = triton_product_flops(tokens, triton_active_blocks(layout), layout.block)
        return product, need_x * product, need_w * product

    @staticmethod
    def backward(grad_out, x, weight, layout, need_x: bool, need_w: bool):
        kernels = _kernels()
        grad_x = None
        if need_x:
            grad_x = kernels.block_sparse_grad_input(grad_out, weight, layout.meta, layout.block, layout.shape[1])
        grad_w = None
        if need_w and weight.dim() == 3:
            grad_w = compact_grad_triton(grad_out, x, layout)
        elif need_w:
            grad_w = kernels.block_sparse_grad_weight(grad_out, x, weight, layout.meta, layout.block)
        return grad_x, grad_w


def triton_product_flops(tokens: int, n_blocks: int, block: tuple[int, int]) -> int:
    """FLOPs of one Triton product (forward, dX, dW or the compact gradient) over `n_blocks` whole blocks."""
    return 2 * tokens * n_blocks * block[0] * block[1]


def triton_active_blocks(layout) -> int:
    """The number of active blocks of a Triton or compact layout, read from its index shapes (no host sync)."""
    return layout.block_ids.numel() if hasattr(layout, "block_ids") else layout.meta.block_rows.numel()


def compact_grad_triton(grad_out: torch.Tensor, x: torch.Tensor, layout) -> torch.Tensor:
    """`compact_grad_torch`'s product by the Triton kernel of `hf_sdt.kernels` on a `CompactLayout`, with no host
    synchronisation."""
    return _kernels().block_sparse_grad_compact(
        grad_out, x, layout.block_rows, layout.block_cols, layout.grid, layout.block
    )
