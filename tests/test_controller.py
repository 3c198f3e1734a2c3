"""The controller of updates mode in a plain PyTorch loop (weights mode's are in test_trainer.py)."""

import warnings

import pytest
import torch
from sdt_helpers import ByteChunks, tiny_gpt2

from hf_sdt import SDTConfig, SDTController, UpdatesController, get_sdt_model, sdt_layers
from hf_sdt.masks import block_norms, expand_block_mask, topk_block_mask


def updates_config(**overrides) -> SDTConfig:
    values = {"mode": "updates", "density": 0.25, "block_size": 16, "selection_steps": 3, "update_interval": 5}
    return SDTConfig(**{**values, **overrides})


def run_loop(config: SDTConfig, steps: int, poison_step: int | None = None, probe_steps=(), poison_grad=True):
    model = get_sdt_model(tiny_gpt2(), config)
    controller = SDTController(model, config, total_steps=steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data = ByteChunks()
    records = []
    for step in range(steps):
        controller.begin_step(step)
        batch = torch.stack([data[(step * 4 + i) % len(data)]["input_ids"] for i in range(4)])
        model(input_ids=batch, labels=batch).loss.backward()
        if step == poison_step:  # a NaN gradient (or only the statistics it feeds, with gradient growth)
            if poison_grad:
                next(iter(sdt_layers(model).values())).sdt_updates.grad.fill_(float("nan"))
            for energy in controller.grad_energy.values():
                energy.fill_(float("nan"))
        ids_before = {name: layer.sdt_block_ids.clone() for name, layer in sdt_layers(model).items()}
        controller.before_optimizer_step(optimizer)
        if step in probe_steps:
            records.append((step, ids_before, optimizer, model))
            probe_state(records[-1], sdt_layers(model))
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()
    return model, controller, optimizer, records


def probe_state(record, layers):
    """Check, right after a topology change: moved slots have zero updates, gradients and optimizer states."""
    _, ids_before, optimizer, _ = record
    for name, layer in layers.items():
        moved = (layer.sdt_block_ids != ids_before[name]).nonzero().flatten()
        assert (layer.sdt_updates[moved] == 0).all(), name
        if layer.sdt_updates.grad is not None:
            assert (layer.sdt_updates.grad[moved] == 0).all(), name
        for value in optimizer.state.get(layer.sdt_updates, {}).values():
            if value.shape == layer.sdt_updates.shape:
                assert (value[moved] == 0).all(), name


@pytest.mark.parametrize("grow_criterion", ["gradient", "random"])
def test_updates_controller_keeps_counts_frozen_weights_and_resets_moved_slots(grow_criterion):
    pretrained = tiny_gpt2().state_dict()
    config = updates_config(grow_criterion=grow_criterion)
    model, controller, _, _ = run_loop(config, 20, probe_steps=(2, 5, 10))
    assert isinstance(controller, UpdatesController)
    assert controller.metrics()["sdt/churn"] >= 0
    for name, layer in sdt_layers(model).items():
        assert layer.sdt_block_ids.numel() == round(0.25 * layer.block_mask.numel())
        layer.materialize_()
        active = expand_block_mask(layer.block_mask, layer.block_size, (layer.out_features, layer.in_features))
        base = pretrained[name + ".weight"].t()  # GPT-2's Conv1D stores (in, out)
        assert torch.equal(layer.weight_out_in[~active], base[~active]), f"{name}: a frozen weight moved"
    sdt_weights = {name + ".weight" for name in sdt_layers(model)}
    for name, parameter in model.named_parameters():
        if not name.endswith("sdt_updates") and name not in sdt_weights:
            assert torch.equal(parameter, pretrained[name]), f"{name} is frozen and must not change"


def test_nothing_trains_before_the_first_selection_which_by_gradient_picks_the_largest_gradients():
    config = updates_config(selection_steps=4, update_interval=8, grow_criterion="gradient")
    model = get_sdt_model(tiny_gpt2(), config)
    controller = SDTController(model, config, total_steps=10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = torch.stack([ByteChunks()[i]["input_ids"] for i in range(4)])
    energies = {}
    for step in range(4):
        controller.begin_step(step)
        assert controller.capturing
        model(input_ids=batch, labels=batch).loss.backward()
        for name, layer in sdt_layers(model).items():
            grad = layer_dense_grad(model, name, batch)
            energies[name] = energies.get(name, 0) + block_norms(grad, layer.block_size).square()
        if step < 3:
            controller.before_optimizer_step(optimizer)
            assert all(layer.sdt_updates.grad is None for layer in sdt_layers(model).values())
        else:
            controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()
    for name, layer in sdt_layers(model).items():
        chosen = topk_block_mask(energies[name], layer.sdt_block_ids.numel())
        assert torch.equal(layer.block_mask, chosen), name
    controller.begin_step(4)
    assert not controller.capturing


def test_random_growth_takes_no_dense_gradient_and_its_blocks_follow_the_seed():
    def chosen_blocks(seed: int) -> dict[str, torch.Tensor]:
        config = updates_config(grow_criterion="random", seed=seed)
        model = get_sdt_model(tiny_gpt2(), config)
        controller = SDTController(model, config, total_steps=10)
        batch = torch.stack([ByteChunks()[i]["input_ids"] for i in range(4)])
        for step in range(config.selection_steps):
            controller.begin_step(step)
            assert not controller.capturing
            model(input_ids=batch, labels=batch).loss.backward()
            controller.before_optimizer_step()
            controller.after_optimizer_step()
        assert controller.grad_energy == {}
        return {name: layer.sdt_block_ids.sort().values for name, layer in sdt_layers(model).items()}

    first, again, other = chosen_blocks(0), chosen_blocks(0), chosen_blocks(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def layer_dense_grad(model, name, batch) -> torch.Tensor:
    """The dense (out, in) weight gradient of one SDT layer at this batch, by the masked-dense oracle."""
    layer = sdt_layers(model)[name]
    captured = {}

    def hook(module, inputs, output):
        captured["x"] = inputs[0].detach()
        output.register_hook(lambda grad: captured.__setitem__("grad", grad))

    handle = layer.register_forward_hook(hook)
    with torch.enable_grad():
        model(input_ids=batch, labels=batch).loss.backward()
    handle.remove()
    for parameter in model.parameters():
        parameter.grad = None
    grad_out = captured["grad"].reshape(-1, layer.out_features).double()
    return (grad_out.t() @ captured["x"].reshape(-1, layer.in_features).double()).float()


@pytest.mark.parametrize("grow_criterion", ["gradient", "random"])
def test_a_nan_gradient_at_a_selection_skips_it_with_a_warning_and_keeps_the_blocks(grow_criterion):
    config = updates_config(grow_criterion=grow_criterion)
    clean_model, clean, _, clean_records = run_loop(config, 12, probe_steps=(5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, controller, _, records = run_loop(config, 12, poison_step=5, probe_steps=(5,))
    assert any("non-finite scores" in str(w.message) and "step 5" in str(w.message) for w in caught)
    assert controller.skipped_updates == 1 and clean.skipped_updates == 0
    (_, ids_before, _, _), (_, clean_ids_before, _, _) = records[0], clean_records[0]
    for name, layer in sdt_layers(model).items():
        assert torch.equal(layer.sdt_block_ids, ids_before[name]), f"{name}: the skipped selection moved blocks"
        assert torch.equal(ids_before[name], clean_ids_before[name])
    clean_ids = {name: layer.sdt_block_ids for name, layer in sdt_layers(clean_model).items()}
    assert any(not torch.equal(clean_ids[name], clean_ids_before[name]) for name in clean_ids), "nothing to skip"


def test_non_finite_statistics_skip_the_update_with_a_warning():
    config = updates_config(grow_criterion="gradient")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, controller, _, _ = run_loop(config, 12, poison_step=5, poison_grad=False)
    assert any("non-finite scores" in str(w.message) and "step 5" in str(w.message) for w in caught)
    assert controller.skipped_updates == 1
    assert all(torch.isfinite(layer.sdt_updates).all() for layer in sdt_layers(model).values())


def test_resumed_controller_state_continues_identically():
    config = updates_config()
    _, full, _, _ = run_loop(config, 8)
    state = full.state_dict()
    model = get_sdt_model(tiny_gpt2(), config)
    resumed = SDTController(model, config, total_steps=8)
    resumed.load_state_dict(state)
    assert resumed.state_dict().keys() == state.keys()
    for key in ("steps_done", "flops_ratio_sum", "churn", "step"):
        assert resumed.state_dict()[key] == state[key]
    with pytest.raises(ValueError, match="layers this model does not have"):
        resumed.load_state_dict({**state, "grad_energy": {"nope": torch.zeros(1)}})


def test_a_run_shorter_than_the_first_selection_is_warned_about():
    model = get_sdt_model(tiny_gpt2(), updates_config(selection_steps=5))
    with pytest.warns(UserWarning, match="nothing would be trained"):
        SDTController(model, updates_config(selection_steps=5), total_steps=3)


def test_a_controller_of_the_wrong_mode_is_refused():
    model = get_sdt_model(tiny_gpt2(), SDTConfig(block_size=16))
    with pytest.raises(ValueError, match="other mode"):
        SDTController(model, updates_config(), total_steps=4)


@pytest.mark.parametrize(
    ("step_sizes", "match"),
    [
        ([16, 16, 16], r"\(4 steps\), got 3 values"),
        ([16, 0, 16, 16], "got 0.0 at step 1"),
        ([16, 8, 1, float("nan")], "got nan at step 3"),
    ],
)
def test_step_sizes_of_the_wrong_length_or_not_positive_are_refused(step_sizes, match):
    model = get_sdt_model(tiny_gpt2(), SDTConfig(block_size=16))
    with pytest.raises(ValueError, match=f"one positive, finite size per training step .*{match}"):
        SDTController(model, SDTConfig(block_size=16), total_steps=4, step_sizes=step_sizes)


def test_with_gradient_growth_a_layer_no_gradient_reaches_keeps_its_blocks_with_a_warning():
    config = updates_config(grow_criterion="gradient")
    model = get_sdt_model(tiny_gpt2(), config)
    controller = SDTController(model, config, total_steps=10)
    unused = sdt_layers(model)["transformer.h.1.mlp.c_proj"]
    before = unused.sdt_block_ids.clone()
    for step in range(3):  # the first selection ends step 2; one layer's statistics are lost on the way
        controller.begin_step(step)
        batch = torch.stack([ByteChunks()[i]["input_ids"] for i in range(2)])
        model(input_ids=batch, labels=batch).loss.backward()
        controller.grad_energy.pop("transformer.h.1.mlp.c_proj", None)
        if step < 2:
            controller.before_optimizer_step()
        else:
            with pytest.warns(UserWarning, match="no gradient reached 1 layer"):
                controller.before_optimizer_step()
        controller.after_optimizer_step()
    assert torch.equal(unused.sdt_block_ids, before)
    assert controller.churn > 0, "the other layers chose their blocks"
