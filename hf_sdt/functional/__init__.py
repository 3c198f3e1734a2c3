"""Block-sparse linear products and backend dispatch, one job per file.

Weights mode (`sdt_linear`, and `compact_linear` for a weight stored as its active blocks only): three backends
compute the same thing, forward Y = X (W*M)^T + b, backward dX = dY (W*M), dW = (dY^T X) * M, for a weight W that
is zero outside its active blocks:

- ``reference``: the masked dense matmul, used by tests as the oracle (no saving at all);
- ``torch``: per call, the blocked PyTorch path (work proportional to the number of active blocks), the few-token
  product of inference (reads only the active blocks), or one dense GEMM where neither pays (`choose_ops`);
- ``triton``: the GPU kernels of ``hf_sdt.kernels``.

The ``torch`` and ``triton`` products run inside the custom op ``hf_sdt::block_sparse_mm`` (and its backward), so
that torch.compile traces them as single nodes with the mask as a tensor input; only inference on a few tokens with
a compact store is traced as plain tensor ops (`compact_few_tokens_traced`), which the compiled graph runs without
the per-call dispatch of the custom op. The same products take either storage of the weight: dense (out, in) with
its block mask, or a compact (n, block_rows, block_cols) store with its block ids (see `hf_sdt.blocks`), whose
gradient is compact too.

Updates mode (`sparse_update_linear`): the weight W = base + U is dense and frozen, the trainable updates U live in
a compact (n, block_rows, block_cols) store (see `hf_sdt.blocks`). Forward and dX are one dense GEMM each on W;
the gradient of U is dY^T X at its blocks only, written compact (blocked torch path or Triton kernel; the custom op
``hf_sdt::compact_update_grad`` under torch.compile); the ``reference`` backend forms the dense update and lets
autograd compute everything.

Which file answers which question:

- `linear.py`: weights mode's entry points (`sdt_linear`, `compact_linear`) and their dense oracles;
- `updates.py`: updates mode's entry point (`sparse_update_linear`) and its oracle;
- `dispatch.py`: which backend runs on a device, and which product a call takes (the fitted CPU cost rules);
- `cpu_ops.py`: how the torch backend computes each product (blocked, dense, few-token, compact gradient);
- `triton_ops.py`: how the Triton kernels are launched, and whether they can run;
- `layouts.py`: where the active blocks are, in each product's index form, and how those layouts are cached;
- `custom_ops.py`: the autograd Function and the `torch.library` custom ops (with fakes) for torch.compile;
- `flops.py`: what each product multiplies (the custom ops' `FlopCounterMode` formulas, the compute receipt's).
"""

from .cpu_ops import (
    BlockedTorchOps,
    DenseTorchOps,
    FewTokensOps,
    compact_few_tokens_traced,
    compact_grad_torch,
    dense_weight,
    few_tokens_product,
)
from .custom_ops import BlockSparseMatmul, block_sparse_mm, block_sparse_mm_backward, compact_update_grad
from .dispatch import (
    FEW_TOKENS,
    blocked_path_pays,
    choose_ops,
    few_token_inference,
    few_tokens_pay,
    resolve_backend,
    seen_by_dispatch_mode,
)
from .flops import block_sparse_flops, block_sparse_flops_of_count, compact_update_grad_flops
from .layouts import (
    BlockedLayout,
    CompactLayout,
    TensorKeyedCache,
    TritonLayout,
    build_blocked_layout,
    build_compact_layout,
    build_layout,
    cached_compact_layout,
    cached_layout,
    record_active_blocks,
    tensor_version,
)
from .linear import compact_linear, dense_of_blocks, reference_linear, sdt_linear
from .triton_ops import TritonOps, compact_grad_triton, triton_available
from .updates import SparseUpdateLinearFunction, reference_update_linear, sparse_update_linear

__all__ = [
    "FEW_TOKENS",
    "BlockSparseMatmul",
    "BlockedLayout",
    "BlockedTorchOps",
    "CompactLayout",
    "DenseTorchOps",
    "FewTokensOps",
    "SparseUpdateLinearFunction",
    "TensorKeyedCache",
    "TritonLayout",
    "TritonOps",
    "block_sparse_flops",
    "block_sparse_flops_of_count",
    "block_sparse_mm",
    "block_sparse_mm_backward",
    "blocked_path_pays",
    "build_blocked_layout",
    "build_compact_layout",
    "build_layout",
    "cached_compact_layout",
    "cached_layout",
    "choose_ops",
    "compact_few_tokens_traced",
    "compact_grad_torch",
    "compact_grad_triton",
    "compact_linear",
    "compact_update_grad",
    "compact_update_grad_flops",
    "dense_of_blocks",
    "dense_weight",
    "few_token_inference",
    "few_tokens_pay",
    "few_tokens_product",
    "record_active_blocks",
    "reference_linear",
    "reference_update_linear",
    "resolve_backend",
    "sdt_linear",
    "seen_by_dispatch_mode",
    "sparse_update_linear",
    "tensor_version",
    "triton_available",
]
