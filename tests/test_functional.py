import pytest
import torch

from hf_sdt import functional
from hf_sdt.blocks import block_ids_of, element_positions, gather_blocks
from hf_sdt.functional import build_blocked_layout, reference_linear, resolve_backend, sdt_linear
from hf_sdt.masks import block_grid, expand_block_mask

SHAPES = [((100, 72), (32, 32)), ((64, 48), (16, 16)), ((50, 70), (16, 32)), ((24, 40), (24, 40))]
MASKS = ["random", "full", "single", "empty_lines"]


def run(backend, x, weight, bias, mask, block):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    bias = None if bias is None else bias.detach().requires_grad_()
    out = sdt_linear(x, weight, bias, mask, block, backend)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_blocked_matches_reference(shape, block, mask_kind, dtype, tol, block_mask_factory, force_blocked_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, shape[1], generator=generator).to(dtype)
    weight = torch.randn(shape, generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    mask = block_mask_factory(mask_kind, shape, block)
    expected = run("reference", x, weight, bias, mask, block)
    actual = run("torch", x, weight, bias, mask, block)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    inactive = ~expand_block_mask(mask, block, shape)
    assert (actual[2][inactive] == 0).all(), "inactive blocks must get exactly zero gradient"


def test_layout_rejects_a_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match="does not fit a 64 x 48 weight"):
        build_blocked_layout(torch.ones(3, 3, dtype=torch.bool), (16, 16), (64, 48))


def test_layout_lists_only_active_lines():
    mask = torch.tensor([[False, False], [True, False]])
    layout = build_blocked_layout(mask, (16, 16), (20, 20))
    assert layout.blocks == ((16, 20, 0, 16),)
    assert [(start, end) for start, end, _ in layout.col_slabs] == [(0, 16)]
    assert layout.col_slabs[0][2].tolist() == [16, 17, 18, 19]
    assert layout.density == pytest.approx(4 * 16 / 400)


def test_dispatch_rule_follows_density_block_side_and_work():
    big = (4096, 4096)
    quarter = build_blocked_layout(
        torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.25, (64, 64), big
    )
    assert functional.blocked_path_pays(quarter, 2048, (64, 64))
    assert not functional.blocked_path_pays(quarter, 4, (64, 64)), "too little work per GEMM"
    full = build_blocked_layout(torch.ones(64, 64, dtype=torch.bool), (64, 64), big)
    assert not functional.blocked_path_pays(full, 2048, (64, 64)), "density 1 runs dense"
    small_blocks = build_blocked_layout(torch.ones(512, 512, dtype=torch.bool).tril(), (8, 8), big)
    assert not functional.blocked_path_pays(small_blocks, 2048, (8, 8)), "blocks below 16 run dense"


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("few_tokens_path", [True, False], ids=["few-token", "dense"])
def test_few_token_and_dense_paths_match_reference(
    shape, block, mask_kind, tokens, conv1d, few_tokens_path, block_mask_factory, monkeypatch
):
    """Few tokens: inference runs the few-token product or the dense GEMM, training the dense GEMM with dW zeroed
    outside the blocks; the weight is zero outside its blocks, as SDTLinear keeps it, and strided like a Conv1D
    weight's (out, in) view in the conv1d case."""
    monkeypatch.setattr(functional, "few_tokens_pay", lambda layout, element_size: few_tokens_path)
    generator = torch.Generator().manual_seed(tokens)
    mask = block_mask_factory(mask_kind, shape, block)
    weight = torch.randn(shape[::-1] if conv1d else shape, generator=generator)
    weight = (weight.t() if conv1d else weight).mul_(expand_block_mask(mask, block, shape))  # strides kept
    x, bias = torch.randn(2, tokens, shape[1], generator=generator), torch.randn(shape[0], generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(
            sdt_linear(x, weight, bias, mask, block, "torch"), reference_linear(x, weight, bias, mask, block)
        )
    expected = run("reference", x, weight, bias, mask, block)
    actual = run("torch", x, weight, bias, mask, block)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert (actual[2][~expand_block_mask(mask, block, shape)] == 0).all()


def test_dispatch_picks_the_few_token_path_for_inference_only():
    layout = build_blocked_layout(torch.eye(24, 9, dtype=torch.bool), (64, 64), (1536, 576))
    assert functional.choose_ops("torch", layout, 1, for_training=False) is functional.FewTokensOps
    assert functional.choose_ops("torch", layout, 1, for_training=True) is functional.DenseTorchOps
    assert functional.choose_ops("torch", layout, 4096, for_training=False) is functional.BlockedTorchOps
    full = build_blocked_layout(torch.ones(24, 9, dtype=torch.bool), (64, 64), (1536, 576))
    assert functional.choose_ops("torch", full, 1, for_training=False) is functional.DenseTorchOps
    small = build_blocked_layout(torch.eye(3, 9, dtype=torch.bool), (64, 64), (192, 576))
    assert functional.choose_ops("torch", small, 1, for_training=False) is functional.DenseTorchOps, "under 1 MB"


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="Unknown SDT backend"):
        resolve_backend("fast", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu, (16, 32)) == "triton"
    assert resolve_backend("auto", cpu, (16, 32)) == "torch", "the interpreter is for tests, never chosen by auto"
    with pytest.raises(ValueError, match="powers of two"):
        resolve_backend("triton", cpu, (24, 32))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA device"):
        resolve_backend("triton", cpu)


def run_updates(backend, x, weight, updates, ids, block, scale=1.0):
    x = x.detach().requires_grad_()
    updates = updates.detach().requires_grad_()
    out = functional.sparse_update_linear(x, weight, None, updates, ids, block, backend, scale)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, x.grad, updates.grad


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("count", ["one", "some", "all"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_compact_update_gradient_matches_reference(shape, block, count, dtype, tol, conv1d, scale):
    """Updates mode: dX and the compact gradient of the updates (scaled by the update scale) equal the dense
    oracle's, on odd shapes too."""
    generator = torch.Generator().manual_seed(0)
    n_blocks = block_grid(shape, block)[0] * block_grid(shape, block)[1]
    n_active = {"one": 1, "some": max(1, n_blocks // 3), "all": n_blocks}[count]
    ids = torch.randperm(n_blocks, generator=generator)[:n_active]
    x = torch.randn(37, shape[1], generator=generator).to(dtype)
    weight = torch.randn(shape[::-1] if conv1d else shape, generator=generator).to(dtype)
    weight = weight.t() if conv1d else weight  # (out, in), strided like a Conv1D weight
    updates = torch.randn(ids.numel(), *block, generator=generator)
    expected = run_updates("reference", x, weight, updates, ids, block, scale)
    actual = run_updates("torch", x, weight, updates, ids, block, scale)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    assert actual[2].dtype == torch.float32
    _, _, inside = element_positions(ids, block, shape)
    assert (actual[2][~inside] == 0).all(), "the padding of edge blocks gets no gradient"


def run_compact(backend, x, blocks, bias, ids, shape):
    x, blocks, bias = (t.detach().requires_grad_() for t in (x, blocks, bias))
    out = functional.compact_linear(x, blocks, bias, ids, shape, backend)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, x.grad, blocks.grad, bias.grad


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("path", ["blocked", "dense"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_compact_store_products_match_reference(shape, block, mask_kind, path, dtype, tol, block_mask_factory,
                                                monkeypatch):  # fmt: skip
    """Weights mode with compact storage: forward, dX and the compact gradient of the blocks (zero in the padding
    of edge slots), slots in a shuffled order, on odd shapes and masks with empty block-lines."""
    monkeypatch.setattr(functional.dispatch, "blocked_path_pays", lambda layout, tokens, block: path == "blocked")
    generator = torch.Generator().manual_seed(3)
    ids = block_ids_of(block_mask_factory(mask_kind, shape, block))
    ids = ids[torch.randperm(ids.numel(), generator=generator)]
    blocks = gather_blocks(torch.randn(shape, generator=generator), ids, block).to(dtype)
    x = torch.randn(2, 19, shape[1], generator=generator).to(dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    expected = run_compact("reference", x, blocks, bias, ids, shape)
    actual = run_compact("torch", x, blocks, bias, ids, shape)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    _, _, inside = element_positions(ids, block, shape)
    assert (actual[2][~inside] == 0).all(), "the padding of edge slots gets no gradient"
    with torch.no_grad():  # few tokens at inference: the slots are read directly, eager and as torch.compile traces
        few = functional.compact_linear(x[:, :3], blocks, bias, ids, shape, "torch")
        traced = functional.compact_few_tokens_traced(x[:, :3].reshape(6, -1), blocks, ids, shape[0]) + bias
    for got in (few, traced.view_as(few)):
        torch.testing.assert_close(got, expected[0][:, :3], rtol=tol, atol=tol * expected[0].abs().max().item())


def test_compiled_compact_decoding_traces_the_few_token_product():
    """torch.compile traces few-token inference on a compact store as plain tensor ops (no custom op, one graph),
    equal to eager on an odd shape, and new block ids in place need no recompilation."""
    from torch._dynamo.testing import CompileCounterWithBackend

    shape, block, generator = (50, 70), (16, 32), torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 5, 7, 10])
    blocks, bias = torch.randn(4, *block, generator=generator), torch.randn(50, generator=generator)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(functional.compact_linear, backend=counter, fullgraph=True)
    with torch.no_grad():
        for new_ids in (ids, torch.tensor([11, 2, 6, 9])):
            ids.copy_(new_ids)
            x = torch.randn(3, 70, generator=generator)
            got = compiled(x, blocks, bias, ids, shape, "torch")
            torch.testing.assert_close(got, functional.compact_linear(x, blocks, bias, ids, shape, "reference"))
    assert counter.frame_count == 1
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert not any("hf_sdt" in op for op in ops), ops


@pytest.mark.parametrize("for_training", [True, False], ids=["training", "inference"])
def test_custom_ops_pass_torch_library_opcheck(for_training):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom ops that
    torch.compile traces: the product on a dense weight with its mask and on a compact store with its block ids,
    and the compact gradient of updates mode."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, False, True], [False, False, True]])  # a 50 x 70 weight in 32 x 32 blocks
    ids = block_ids_of(mask)
    weight = torch.randn(50, 70, generator=generator) * expand_block_mask(mask, (32, 32), (50, 70))
    blocks = gather_blocks(weight, ids, (32, 32))
    tokens = 20 if for_training else 3  # inference on 3 tokens takes the few-token product
    x = torch.randn(tokens, 70, generator=generator, requires_grad=for_training)
    for stored, index in ((weight, mask), (blocks, ids)):
        stored = stored.clone().requires_grad_(for_training)
        args = (x, stored, index, 32, 32, 50, "torch", for_training)
        torch.library.opcheck(functional.block_sparse_mm, args)
    grad_out = torch.randn(tokens, 50, generator=generator)
    torch.library.opcheck(functional.compact_update_grad, (grad_out, x.detach(), ids, 32, 32, "torch"))


def aten_flops(function, *args) -> int:
    """FLOPs of the aten products `function(*args)` runs, the in-place `addmm_` of the blocked path included."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flops(input_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops}) as counter:
        function(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("shape,block", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("ops", [functional.BlockedTorchOps, functional.DenseTorchOps, functional.FewTokensOps])
def test_flops_of_each_path_are_the_work_it_runs(shape, block, mask_kind, storage, ops, block_mask_factory):
    """Each product's FLOP formula (what FlopCounterMode and the compute receipt count) equals the FLOPs of the
    GEMMs its implementation really runs, on odd shapes, empty block-lines and density 1, for both storages."""
    from hf_sdt.functional.layouts import build_compact_layout

    mask = block_mask_factory(mask_kind, shape, block)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator) * expand_block_mask(mask, block, shape)
    ids = block_ids_of(mask)
    if storage == "compact":
        weight, layout = gather_blocks(weight, ids, block), build_compact_layout("torch", ids, block, shape)
    else:
        layout = build_blocked_layout(mask, block, shape)
    tokens = 3 if ops is functional.FewTokensOps else 19
    x, grad_out = (
        torch.randn(tokens, shape[1], generator=generator),
        torch.randn(tokens, shape[0], generator=generator),
    )
    forward, grad_x, grad_w = ops.flops(layout, tokens, need_x=True, need_w=True)
    assert forward == aten_flops(ops.forward, x, weight, layout)
    if ops is not functional.FewTokensOps:  # inference only
        assert grad_x + grad_w == aten_flops(ops.backward, grad_out, x, weight, layout, True, True)
        assert grad_w == aten_flops(ops.backward, grad_out, x, weight, layout, False, True)


@pytest.mark.parametrize("shape,block", SHAPES)
def test_flops_of_the_compact_update_gradient_are_the_work_it_runs(shape, block):
    from hf_sdt.functional.layouts import build_compact_layout

    ids = torch.randperm(block_grid(shape, block)[0] * block_grid(shape, block)[1])[:3]
    grad_out, x = torch.randn(7, shape[0]), torch.randn(7, shape[1])
    layout = build_compact_layout("torch", ids, block, shape)
    expected = aten_flops(functional.compact_grad_torch, grad_out, x, layout)
    assert functional.compact_update_grad_flops("torch", ids, block, shape, 7) == expected


@pytest.mark.parametrize("storage", ["dense", "compact"])
@pytest.mark.parametrize("pays", [True, False])
def test_flop_counter_mode_sees_each_product_as_its_custom_op(storage, pays, monkeypatch):
    """Under FlopCounterMode the eager products run as hf_sdt's custom ops, counted by their formulas: forward,
    dX and dW of weights mode (blocked or dense fallback) and the compact gradient of updates mode."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(functional.dispatch, "blocked_path_pays", lambda layout, tokens, block: pays)
    shape, block = (48, 40), (16, 16)
    mask = torch.tensor([[True, False, False], [False, False, True], [False, False, False]])
    weight = torch.randn(shape) * expand_block_mask(mask, block, shape)
    ids = block_ids_of(mask)
    x = torch.randn(5, shape[1], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        if storage == "dense":
            out = functional.sdt_linear(x, weight.requires_grad_(), None, mask, block, "torch")
        else:
            out = functional.compact_linear(x, gather_blocks(weight, ids, block).requires_grad_(), None, ids, shape,
                                            "torch")  # fmt: skip
        out.sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    active = 16 * 16 + 16 * 8  # the second block is cut by the 40-wide edge
    per_product = 2 * 5 * (active if pays else shape[0] * shape[1])
    assert counts == {"hf_sdt.block_sparse_mm": per_product, "hf_sdt.block_sparse_mm_backward": 2 * per_product}

    updates = torch.zeros(2, *block, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        functional.sparse_update_linear(x, weight, None, updates, ids, block, "torch").sum().backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    assert counts["hf_sdt.compact_update_grad"] == 2 * 5 * active
    assert counts["aten.mm"] == 2 * (2 * 5 * shape[0] * shape[1])  # forward and dX are dense GEMMs
