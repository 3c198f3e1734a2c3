"""The Triton kernels against the masked-dense reference; on a CPU they run in Triton's interpreter."""

import os
import subprocess
import sys

import pytest
import torch
from sdt_helpers import compiled_run

from hf_sdt import SDTConfig, SDTLinear
from hf_sdt.blocks import gather_blocks, mask_of
from hf_sdt.functional import compact_linear, reference_linear, sdt_linear, sparse_update_linear
from hf_sdt.kernels import block_sparse as kernels
from hf_sdt.masks import block_grid, expand_block_mask

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (out, in), block: odd dimensions with partial edge blocks, rectangular blocks, and the sizes 16 / 32 / 64.
SHAPES = [((100, 72), (32, 32)), ((50, 70), (16, 32)), ((130, 96), (64, 32)), ((64, 64), (16, 16))]
MASKS = ["random", "full", "single", "empty_lines"]
# The interpreter cannot load bf16 (garbage values); fp16 stands in for half precision there.
DTYPES = [(torch.float32, 1e-4), (torch.float16, 2e-2)] + ([(torch.bfloat16, 3e-2)] if DEVICE == "cuda" else [])


def reference_products(x, weight, grad_out, mask, block):
    x = x.float().requires_grad_()
    weight = weight.float().requires_grad_()
    out = reference_linear(x, weight, None, mask, block)
    out.backward(grad_out.float())
    return out, x.grad, weight.grad


def assert_close(got, want, tol):
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_kernels_match_reference(shape, block, mask_kind, dtype, tol, block_mask_factory):
    generator = torch.Generator().manual_seed(0)
    mask = block_mask_factory(mask_kind, shape, block).to(DEVICE)
    x = torch.randn(45, shape[1], generator=generator).to(DEVICE, dtype)
    weight = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    grad_out = torch.randn(45, shape[0], generator=generator).to(DEVICE, dtype)
    meta = kernels.build_block_metadata(mask, int(mask.sum()))
    out, grad_x, grad_w = reference_products(x, weight, grad_out, mask, block)
    assert_close(kernels.block_sparse_forward(x, weight, meta, block), out, tol)
    assert_close(kernels.block_sparse_grad_input(grad_out, weight, meta, block), grad_x, tol)
    for target_programs in (1, 10_000):  # one program per block, then the split token reduction
        got_w = kernels.block_sparse_grad_weight(grad_out, x, weight, meta, block, target_programs)
        assert_close(got_w, grad_w, tol)
        assert (got_w[~expand_block_mask(mask, block, shape)] == 0).all()


def test_strided_weight_as_in_conv1d():
    weight_in_out = torch.randn(72, 100, device=DEVICE)  # Conv1D storage; the kernels read its transpose
    mask = torch.rand(block_grid((100, 72), (32, 32)), generator=torch.Generator().manual_seed(1)) < 0.6
    mask = mask.to(DEVICE)
    x, grad_out = torch.randn(30, 72, device=DEVICE), torch.randn(30, 100, device=DEVICE)
    meta = kernels.build_block_metadata(mask, int(mask.sum()))
    out, grad_x, grad_w = reference_products(x, weight_in_out.t(), grad_out, mask, (32, 32))
    assert_close(kernels.block_sparse_forward(x, weight_in_out.t(), meta, (32, 32)), out, 1e-4)
    assert_close(kernels.block_sparse_grad_input(grad_out, weight_in_out.t(), meta, (32, 32)), grad_x, 1e-4)
    assert_close(kernels.block_sparse_grad_weight(grad_out, x, weight_in_out.t(), meta, (32, 32)), grad_w, 1e-4)


def test_metadata_matches_a_host_construction():
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(2)) < 0.4
    meta = kernels.build_block_metadata(mask.to(DEVICE), int(mask.sum()))
    rows, cols = mask.nonzero(as_tuple=True)
    assert meta.block_rows.tolist() == rows.tolist() and meta.block_cols.tolist() == cols.tolist()
    assert meta.row_offsets.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
    assert meta.col_offsets.tolist() == [0, *mask.sum(0).cumsum(0).tolist()]
    _, rows_t = mask.t().nonzero(as_tuple=True)
    assert meta.csc_rows.tolist() == rows_t.tolist()
    assert all(t.dtype == torch.int32 for t in meta if t is not None)


def test_metadata_rebuilt_after_a_mask_change_equals_a_fresh_build():
    base = torch.nn.Linear(64, 96).to(DEVICE)
    layer = SDTLinear(base, (32, 32), torch.ones(3, 2, dtype=torch.bool), backend="triton")
    x = torch.randn(10, 64, device=DEVICE)
    layer(x)  # builds metadata for the dense mask
    new_mask = torch.tensor([[True, False], [False, False], [True, True]], device=DEVICE)
    layer.update_mask_(new_mask, 3)
    rebuilt = layer.layout("triton").meta
    fresh = kernels.build_block_metadata(new_mask, 3)
    assert all(a is b is None or torch.equal(a, b) for a, b in zip(rebuilt, fresh, strict=True))
    expected = reference_linear(x, layer.weight, layer.bias, new_mask, (32, 32))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_sdt_linear_triton_backend_end_to_end(bias):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 48, generator=generator).to(DEVICE).requires_grad_()
    weight = torch.randn(40, 48, generator=generator).to(DEVICE).requires_grad_()
    bias_t = torch.randn(40, generator=generator).to(DEVICE).requires_grad_() if bias else None
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, True]], device=DEVICE)
    inputs = [t for t in (x, weight, bias_t) if t is not None]
    results = []
    for backend in ("triton", "reference"):
        out = sdt_linear(x, weight, bias_t, mask, (16, 16), backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unsupported_block_is_a_clear_error():
    meta = kernels.build_block_metadata(torch.ones(1, 1, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="powers of two"):
        kernels.block_sparse_forward(torch.randn(4, 24), torch.randn(24, 24), meta, (24, 24))


AOT_COMPILE = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.runtime import Autotuner
from triton.compiler import ASTSource, compile
from hf_sdt.kernels import block_sparse as kernels

dtype, block, split, compact = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "compact"
index_pointers = {"row_offsets_ptr", "block_cols_ptr", "col_offsets_ptr", "csc_rows_ptr", "block_rows_ptr"}
constants = {"BLOCK_N": block, "BLOCK_K": block, "BLOCK_T": 128, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
             "SPLIT": split, "COMPACT": compact}
for kernel in (kernels._dense_sparse_t_kernel, kernels._grad_weight_kernel, kernels._sum_partials_kernel):
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {}
    for index, name in enumerate(fn.arg_names):
        if index in fn.constexprs:
            signature[name] = "constexpr"
        elif name == "partial_ptr":
            signature[name] = "*fp32"
        elif name == "tile_offsets_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*i32" if name in index_pointers else "*" + dtype
        else:
            signature[name] = "i32"
    source = ASTSource(fn, signature, constexprs={k: v for k, v in constants.items() if k in fn.arg_names})
    compiled = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    if dtype != "fp32" and fn.__name__ != "_sum_partials_kernel":  # fp32 "ieee" dots run on FMA units
        assert "wgmma" in compiled.asm["ptx"], f"{fn.__name__} does not use Hopper's tensor-core instructions"
    print(fn.__name__, "shared bytes:", compiled.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype,block,split,store", [("bf16", 128, 1, "dense"), ("bf16", 64, 4, "compact"), ("fp32", 64, 1, "dense")]
)
def test_kernels_compile_for_hopper(dtype, block, split, store):
    """The interpreter does not compile; this builds every kernel for sm_90 (Hopper) with Triton's own ptxas."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE, dtype, str(block), str(split), store],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared bytes") == 3


def test_sparse_update_linear_triton_backend_end_to_end():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 48, generator=generator).to(DEVICE)
    weight = torch.randn(40, 48, generator=generator).to(DEVICE)
    ids = torch.tensor([7, 0, 4], device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        inputs = [x.clone().requires_grad_(), torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(6))]
        inputs[1] = inputs[1].to(DEVICE).requires_grad_()
        out = sparse_update_linear(inputs[0], weight, None, inputs[1], ids, (16, 16), backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("count", [1, 3, "all"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_compact_store_kernels_match_reference(shape, block, count, dtype, tol):
    """A compact block store (weights mode's compact storage, updates mode's updates), slots in any order: forward
    and dX read the blocks from their slots, dW is written into them (padding of edge slots zero)."""
    generator = torch.Generator().manual_seed(7)
    grid = block_grid(shape, block)
    ids = torch.randperm(grid[0] * grid[1], generator=generator)[: grid[0] * grid[1] if count == "all" else count]
    mask = mask_of(ids, grid)
    weight = torch.randn(shape, generator=generator) * expand_block_mask(mask, block, shape)
    blocks = gather_blocks(weight, ids, block).to(DEVICE, dtype)  # (n, rows, cols), padding zero
    x = torch.randn(45, shape[1], generator=generator).to(DEVICE, dtype)
    grad_out = torch.randn(45, shape[0], generator=generator).to(DEVICE, dtype)
    ids = ids.to(DEVICE)
    meta = kernels.build_compact_metadata(ids, grid)
    out, grad_x, grad_w = reference_products(x, weight.to(DEVICE, dtype), grad_out, mask.to(DEVICE), block)
    assert_close(kernels.block_sparse_forward(x, blocks, meta, block, shape[0]), out, tol)
    assert_close(kernels.block_sparse_grad_input(grad_out, blocks, meta, block, shape[1]), grad_x, tol)
    want = gather_blocks(grad_w, ids, block)
    for target_programs in (1, 10_000):  # one program per block, then the split token reduction
        got = kernels.block_sparse_grad_compact(
            grad_out, x, ids // grid[1], ids % grid[1], grid, block, target_programs
        )
        assert got.shape == (ids.numel(), *block)
        assert_close(got, want, tol)
        assert (got.float()[want == 0] == 0).all(), "the padding of edge slots stays zero"


def test_compact_linear_triton_backend_end_to_end():
    """Forward, dX and the compact gradient of the blocks through the autograd path, against the dense oracle."""
    generator = torch.Generator().manual_seed(8)
    ids = torch.tensor([7, 0, 4, 2], device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(9)).to(DEVICE).requires_grad_()
        blocks = torch.randn(4, 16, 16, generator=generator.manual_seed(6)).to(DEVICE).requires_grad_()
        out = compact_linear(x, blocks, None, ids, (40, 48), backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, blocks])))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_updates_mode_with_the_triton_backend_equals_eager():
    """torch.compile of updates mode on the Triton backend: one graph, equal to eager through optimizer steps and
    block moves (the compact gradient's custom op runs the kernel)."""
    config = SDTConfig(mode="updates", density=0.5, block_size=16, backend="triton")
    results, counts = compiled_run(config, device=DEVICE)
    assert counts["breaks"] == 0, counts
    for compiled, eager in results:
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
