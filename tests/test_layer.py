import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_sdt import SDTCompactLinear, SDTLinear, SDTUpdateLinear
from hf_sdt import functional as sdt_functional
from hf_sdt.blocks import element_positions, gather_blocks, mask_of
from hf_sdt.controller import reset_optimizer_state
from hf_sdt.masks import expand_block_mask


def make_base(kind: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    layer = Conv1D(out_features, in_features)
    nn.init.normal_(layer.bias)
    if not bias:
        layer.bias = None
    return layer


def forward_backward(layer: SDTLinear, x: torch.Tensor):
    x = x.detach().requires_grad_()
    out = layer(x)
    out.square().sum().backward()
    grads = [x.grad, layer.weight.grad] + ([layer.bias.grad] if layer.bias is not None else [])
    return [out, *grads]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(11,), (3, 5)])
@pytest.mark.parametrize("mask_kind", ["random", "full", "single", "empty_lines"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_torch_backend_matches_reference(
    kind, bias, lead, mask_kind, dtype, tol, block_mask_factory, force_blocked_path
):
    in_features, out_features, block = 72, 100, (32, 32)
    mask = block_mask_factory(mask_kind, (out_features, in_features), block)
    fast = SDTLinear(make_base(kind, in_features, out_features, bias), block, mask, "torch").to(dtype)
    oracle = copy.deepcopy(fast)
    oracle.backend = "reference"
    x = torch.randn(*lead, in_features).to(dtype)
    for got, want in zip(forward_backward(fast, x), forward_backward(oracle, x), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_keeps_names_shapes_and_zeros_inactive_weights(kind):
    base = make_base(kind, 48, 40, bias=True)
    weight_shape = tuple(base.weight.shape)
    mask = torch.tensor([[True, False, False], [False, True, False], [False, False, True]])
    layer = SDTLinear(base, (16, 16), mask, "torch")
    assert set(layer.state_dict()) == {"weight", "bias", "sdt_mask"}
    assert tuple(layer.weight.shape) == weight_shape
    assert layer.weight is base.weight
    element_mask = expand_block_mask(mask, (16, 16), (40, 48))
    assert (layer.weight_out_in[~element_mask] == 0).all()
    assert (layer.weight_out_in[element_mask] != 0).all()
    assert torch.equal(layer.storage_element_mask(), layer.weight != 0)  # (in, out) for Conv1D
    first_block = torch.zeros_like(mask).index_fill_(0, torch.tensor([0]), True) & mask
    assert int(layer.storage_element_mask(first_block).sum()) == 16 * 16
    assert layer.unload() is base


def test_layout_follows_in_place_and_replaced_masks():
    layer = SDTLinear(make_base("linear", 32, 32, bias=False), (16, 16), torch.eye(2, dtype=torch.bool), "torch")
    first = layer.layout("torch")
    assert layer.layout("torch") is first, "the layout is cached while the mask is unchanged"
    with torch.no_grad():
        layer.sdt_mask[0, 1] = True
    assert layer.layout("torch") is not first and layer.layout("torch").density == pytest.approx(0.75)
    layer.sdt_mask = torch.ones(2, 2, dtype=torch.bool)
    assert layer.layout("torch").density == 1.0 == layer.density


def test_rebuilt_layout_gives_the_same_result_as_a_fresh_layer():
    base = make_base("linear", 64, 64, bias=True)
    layer = SDTLinear(copy.deepcopy(base), (16, 16), torch.ones(4, 4, dtype=torch.bool), "torch")
    new_mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(3)) < 0.5
    x = torch.randn(9, 64)
    layer(x)  # builds and caches the first layout
    layer.update_mask_(new_mask, int(new_mask.sum()))
    assert (layer.weight[~expand_block_mask(new_mask, (16, 16), (64, 64))] == 0).all()
    fresh = SDTLinear(copy.deepcopy(base), (16, 16), new_mask, "torch")
    torch.testing.assert_close(layer(x), fresh(x), rtol=0, atol=0)


def test_wrong_mask_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        SDTLinear(make_base("linear", 32, 40, bias=True), (16, 16), torch.ones(2, 2, dtype=torch.bool))


def test_autocast_runs_the_blocked_path_in_the_autocast_dtype(force_blocked_path):
    fast = SDTLinear(make_base("linear", 64, 48, bias=True), (16, 16), torch.rand(3, 4) < 0.5, "torch")
    oracle = copy.deepcopy(fast)
    oracle.backend = "reference"
    x = torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = forward_backward(fast, x), forward_backward(oracle, x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    assert fast.weight.grad.dtype == torch.float32
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_loading_a_state_dict_restores_the_mask_and_zeros():
    layer = SDTLinear(make_base("linear", 32, 32, bias=True), (16, 16), torch.eye(2, dtype=torch.bool), "torch")
    state = {key: value.clone() for key, value in layer.state_dict().items()}
    state["weight"] = torch.ones(32, 32)
    state["sdt_mask"] = torch.tensor([[False, True], [True, True]])
    layer.load_state_dict(state)
    assert torch.equal(layer.sdt_mask, state["sdt_mask"])
    assert (layer.weight[:16, :16] == 0).all() and (layer.weight[:16, 16:] == 1).all()
    assert layer.layout("torch").density == pytest.approx(0.75), "the layout follows the loaded mask"
    restored = pickle.loads(pickle.dumps(layer))  # torch.save(model) pickles the hook too
    torch.testing.assert_close(restored(torch.ones(2, 32)), layer(torch.ones(2, 32)))
    with pytest.raises(RuntimeError, match="sdt_mask"):
        layer.load_state_dict({**state, "sdt_mask": torch.ones(3, 2, dtype=torch.bool)})


def dense_and_compact(kind: str, mask: torch.Tensor, backend: str, block=(16, 32), shape=(50, 70)):
    """The same layer (odd shape, partial edge blocks) with dense and with compact storage."""
    base = make_base(kind, shape[1], shape[0], bias=True)
    return SDTLinear(copy.deepcopy(base), block, mask, backend), SDTCompactLinear(base, block, mask, backend)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("mask_kind", ["random", "full", "single", "empty_lines"])
@pytest.mark.parametrize("path", ["blocked", "dense", "few-token", "reference"])
def test_compact_storage_computes_and_trains_like_dense_storage(
    kind, mask_kind, path, block_mask_factory, monkeypatch
):
    """Forward, both gradients, AdamW steps and a drop/grow with its optimizer-state reset give the same weights
    whether a layer stores its whole weight or only its active blocks, on every product path."""
    monkeypatch.setattr(sdt_functional.dispatch, "blocked_path_pays", lambda layout, tokens, block: path == "blocked")
    mask = block_mask_factory(mask_kind, (50, 70), (16, 32))
    dense, compact = dense_and_compact(kind, mask, "reference" if path == "reference" else "torch")
    x = torch.randn(3 if path == "few-token" else 13, 70, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compact(x), dense(x), rtol=1e-5, atol=1e-5)
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1) for layer in (dense, compact)]
    moved = mask.clone()
    if mask_kind != "full":  # drop one block, grow another
        moved[tuple(mask.nonzero()[0].tolist())] = False
        moved[tuple((~mask).nonzero()[-1].tolist())] = True
    for step in range(6):
        grads, ids = [], compact.sdt_block_ids.clone()
        for layer, optimizer in zip((dense, compact), optimizers, strict=True):
            inputs = x.clone().requires_grad_()
            layer(inputs).square().sum().backward()
            grad_w = layer.weight_parameter.grad
            grad_w = grad_w if grad_w.dim() == 3 else (grad_w.t() if layer.is_conv1d else grad_w)  # (out, in)
            grads.append((inputs.grad, grad_w, layer.bias.grad.clone()))
            optimizer.step()
            optimizer.zero_grad()
            layer.apply_mask_()
            if step == 2:
                reset_optimizer_state(optimizer, *layer.update_mask_(moved, int(moved.sum())))
        (dense_x, dense_w, dense_b), (compact_x, compact_w, compact_b) = grads
        torch.testing.assert_close(compact_x, dense_x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compact_w, gather_blocks(dense_w, ids, (16, 32)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compact_b, dense_b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(compact.weight, dense.weight, rtol=1e-5, atol=1e-6)
    state = optimizers[1].state[compact.sdt_blocks]
    assert all(value.shape == compact.sdt_blocks.shape for key, value in state.items() if key != "step")
    assert compact.sdt_blocks.numel() == int(moved.sum()) * 16 * 32


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_compact_state_dict_is_the_dense_one_and_loads_back_exactly(kind):
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(5)) < 0.5
    dense, compact = dense_and_compact(kind, mask, "torch")
    ids = torch.tensor(list(reversed(compact.sdt_block_ids.tolist())))  # a slot order that is not row-major
    compact = SDTCompactLinear(make_base(kind, 70, 50, bias=True), (16, 32), mask, "torch", block_ids=ids)
    state = compact.state_dict()
    assert set(state) == {"weight", "bias", "sdt_mask", "sdt_block_ids"}
    assert torch.equal(state["weight"], dense.state_dict()["weight"]), "the dense weight, in the storage layout"
    assert torch.equal(state["sdt_block_ids"], ids)
    fresh = SDTCompactLinear(make_base(kind, 70, 50, bias=True), (16, 32), mask, "torch")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.sdt_block_ids, ids) and torch.equal(fresh.sdt_blocks, compact.sdt_blocks)
    fresh.load_state_dict(dense.state_dict())  # a dense-storage checkpoint: row-major slots
    assert torch.equal(fresh.sdt_blocks, gather_blocks(dense.weight_out_in, fresh.sdt_block_ids, (16, 32)))
    assert fresh.unload().weight.shape == dense.weight.shape
    with pytest.raises(ValueError, match="active blocks"):
        fresh.load_state_dict({**state, "sdt_mask": torch.ones(4, 3, dtype=torch.bool), "sdt_block_ids": None})
    with pytest.raises(ValueError, match="not the blocks of the mask"):
        SDTCompactLinear(make_base(kind, 70, 50, bias=True), (16, 32), mask, "torch", block_ids=ids[:-1])


def test_compact_layer_refuses_a_mask_with_another_block_count():
    mask = torch.eye(4, 3, dtype=torch.bool)
    _, compact = dense_and_compact("linear", mask, "torch")
    with pytest.raises(ValueError, match="keeps 3 blocks"):
        compact.update_mask_(torch.ones(4, 3, dtype=torch.bool), 12)
    assert torch.equal(compact.sdt_block_ids, torch.tensor([0, 4, 8])) and torch.equal(compact.sdt_mask, mask)
    assert torch.equal(mask_of(compact.sdt_block_ids, (4, 3)), mask)


def make_update_layer(conv1d: bool, dtype=torch.float32, ids=(0, 5, 3), update_scale=1.0):
    """An updates-mode layer on an odd 50 x 70 weight with 16 x 32 blocks (partial edge blocks)."""
    torch.manual_seed(0)
    base = Conv1D(50, 70) if conv1d else nn.Linear(70, 50)
    with torch.no_grad():
        base.weight.normal_()
    base = base.to(dtype)
    pretrained = base.weight.detach().clone()
    return SDTUpdateLinear(base, (16, 32), torch.tensor(ids), "torch", update_scale), pretrained


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("update_scale", [1.0, 3.0])
def test_update_layer_trains_only_its_blocks_and_keeps_the_rest_bit_identical(conv1d, update_scale):
    layer, pretrained = make_update_layer(conv1d, update_scale=update_scale)
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["sdt_updates"]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(8, 70)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    layer(torch.randn(4, 70))  # rewrites the active blocks after the optimizer steps
    active = expand_block_mask(layer.block_mask, (16, 32), (50, 70))  # (out, in)
    base_out_in = pretrained.t() if conv1d else pretrained
    assert torch.equal(layer.weight_out_in[~active], base_out_in[~active]), "frozen weights are bit-identical"
    assert not torch.equal(layer.weight_out_in[active], base_out_in[active])
    effective = base_out_in + update_scale * dense_updates(layer)
    torch.testing.assert_close(layer.weight_out_in, effective, rtol=0, atol=1e-6)
    x = torch.randn(4, 70)
    torch.testing.assert_close(layer(x), x @ effective.t() + layer.bias, rtol=1e-5, atol=1e-5)


def dense_updates(layer) -> torch.Tensor:
    """The layer's compact updates as a dense (out, in) matrix."""
    shape = (layer.out_features, layer.in_features)
    rows, cols, inside = element_positions(layer.sdt_block_ids, layer.block_size, shape)
    dense = torch.zeros(layer.out_features, layer.in_features)
    dense[rows[inside], cols[inside]] = layer.sdt_updates.detach()[inside]
    return dense


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_moved_blocks_return_exactly_to_their_pretrained_values(conv1d):
    layer, pretrained = make_update_layer(conv1d, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.sdt_updates.normal_()
    layer.materialize_()
    assert not torch.equal(layer.weight, pretrained)
    layer.move_blocks_(torch.tensor([0, 2]), torch.tensor([8, 9]))
    assert layer.sdt_block_ids.tolist() == [8, 5, 9]
    assert (layer.sdt_updates[[0, 2]] == 0).all() and (layer.sdt_updates[1] != 0).any()
    untouched = expand_block_mask(torch.tensor([0, 0, 0, 0, 0, 1] + [0] * 6).bool().view(4, 3), (16, 32), (50, 70))
    untouched = untouched.t() if conv1d else untouched
    assert torch.equal(layer.weight[~untouched], pretrained[~untouched]), "dropped blocks back to pretrained"
    merged = layer.unload(merge=False)
    assert torch.equal(merged.weight, pretrained)


def test_update_layer_with_bf16_weights_matches_reference():
    layer, _ = make_update_layer(False, dtype=torch.bfloat16)
    x = torch.randn(6, 70, dtype=torch.bfloat16)
    outputs = []
    for backend in ("torch", "reference"):
        layer.backend = backend
        layer.sdt_updates.grad = None
        out = layer(x)
        out.float().square().sum().backward()
        outputs.append((out, layer.sdt_updates.grad.clone()))
    for got, want in zip(*outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [{"storage": "dense"}, {"storage": "compact"}, {"mode": "updates"}],
    ids=["dense", "compact", "updates"],
)
def test_torch_compile_traces_sdt_layers_like_dense_ones(overrides):
    """fullgraph=True compiles an SDT model as it does the dense one; optimizer steps and drop/grow need no
    recompilation; compiled outputs and gradients equal eager ones (the one-token call takes the few-token path)."""
    from sdt_helpers import compiled_run

    from hf_sdt import SDTConfig

    config = SDTConfig(density=0.5, block_size=16, schedule="constant", **overrides)
    sdt_results, sdt_counts = compiled_run(config)
    _, dense_counts = compiled_run(None)
    assert sdt_counts == dense_counts and sdt_counts["breaks"] == 0, (sdt_counts, dense_counts)
    for compiled, eager in sdt_results:
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize(
    "overrides",
    [{"storage": "dense"}, {"storage": "compact"}, {"mode": "updates"}],
    ids=["dense", "compact", "updates"],
)
def test_backward_inside_a_compiled_function_compiles_no_sdt_frames(overrides):
    """`loss.backward()` inside a torch.compile'd step whose graph is not compiled with its backward (backend
    "eager"): autograd runs SDT's backward from inside the compiled region, where dynamo must not compile it as
    frames of its own (a 2-layer Llama had 6 more graphs than dense); the gradients are the eager ones."""
    from sdt_helpers import tiny_llama
    from torch._dynamo.utils import counters

    from hf_sdt import SDTConfig, get_sdt_model

    def compiled_graphs_and_grads(config):
        torch._dynamo.reset()
        counters.clear()
        model = tiny_llama() if config is None else get_sdt_model(tiny_llama(), config)
        ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))

        def step(ids):
            model(input_ids=ids, labels=ids).loss.backward()

        torch.compile(step, backend="eager")(ids)
        compiled = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
        model.zero_grad()
        step(ids)
        for name, grad in compiled.items():
            torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad)
        return counters["stats"]["unique_graphs"]

    config = SDTConfig(density=0.5, block_size=16, schedule="constant", **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trained without a controller: nothing to drive here
        assert compiled_graphs_and_grads(config) == compiled_graphs_and_grads(None)


def test_a_compact_layer_keeps_no_dense_weight_alive():
    base = make_base("linear", 70, 50, bias=True)
    dense_weight = weakref.ref(base.weight)
    layer = SDTCompactLinear(base, (16, 32), torch.eye(4, 3, dtype=torch.bool), "torch")
    del base
    gc.collect()
    assert dense_weight() is None, "the converted layer's dense weight must be freed"
    assert sum(p.numel() for p in layer.parameters()) == 3 * 16 * 32 + 50
    assert layer.unload().weight.shape == (50, 70)
