import json
import os

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from sdt_helpers import ByteChunks, make_config, tiny_gpt2, training_args
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_sdt import SDTConfig, SDTTrainer, get_sdt_model, hub, merge_and_unload, sdt_layers
from hf_sdt import adapter as sdt_adapter
from hf_sdt import card as sdt_card

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def odd_sdt_model(density=0.25) -> GPT2LMHeadModel:
    """A GPT-2 whose widths (80, 240, 320) are not multiples of the 32-block: partial edge blocks everywhere."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=80, n_layer=2, n_head=4, n_positions=32))
    return get_sdt_model(model, SDTConfig(density=density, block_size=32, schedule="constant")).eval()


def assert_same_model(got, want):
    assert sorted(sdt_layers(got)) == sorted(sdt_layers(want))
    for name, layer in sdt_layers(want).items():
        assert torch.equal(sdt_layers(got)[name].sdt_mask, layer.sdt_mask), name
    torch.testing.assert_close(got(IDS).logits, want(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("packed", [False, True])
def test_round_trip_is_exact(tmp_path, packed):
    """Compact storage (the constant schedule), with slots out of row-major order after a drop/grow: the dense or
    packed checkpoint gives back the same weights, masks and slot order."""
    model = odd_sdt_model()
    layer = sdt_layers(model)["transformer.h.0.mlp.c_fc"]
    moved = layer.sdt_mask.clone()
    moved[tuple(moved.nonzero()[0].tolist())], moved[tuple((~moved).nonzero()[-1].tolist())] = False, True
    with torch.no_grad():
        layer.update_mask_(moved, int(moved.sum()))
        layer.sdt_blocks.add_(1.0)  # the grown block is not zero either
    assert layer.sdt_block_ids.tolist() != sorted(layer.sdt_block_ids.tolist())
    hub.save_pretrained(model, tmp_path, packed=packed)
    loaded = hub.from_pretrained(str(tmp_path))
    assert_same_model(loaded, model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.config.sdt_config == model.config.sdt_config


def test_vanilla_transformers_loads_the_dense_format_silently(tmp_path, capfd):
    model = odd_sdt_model()
    hub.save_pretrained(model, tmp_path)
    assert not [key for key in load_file(tmp_path / "model.safetensors") if key.endswith(hub.MASK_SUFFIX)]
    capfd.readouterr()
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert "UNEXPECTED" not in capfd.readouterr().err
    assert not sdt_layers(vanilla)
    torch.testing.assert_close(vanilla(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_packed_size_scales_with_density(tmp_path, density):
    model = odd_sdt_model(density)
    hub.save_pretrained(model, tmp_path, packed=True)
    tensors = load_file(tmp_path / hub.PACKED_WEIGHTS_NAME)
    packed_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith(hub.ACTIVE_SUFFIX))
    layers = sdt_layers(model).values()
    elements = [layer.out_features * layer.in_features for layer in layers]
    dense_bytes = 4 * sum(elements)  # fp32
    weighted_density = sum(layer.density * n for layer, n in zip(layers, elements, strict=True)) / sum(elements)
    # `density` is the fraction of weight elements in active blocks (partial edge blocks count for less).
    assert packed_bytes <= weighted_density * dense_bytes + 0.02 * dense_bytes


def test_checkpoint_without_sdt_metadata_says_how_to_convert(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="get_sdt_model"):
        hub.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("packed", [False, True])
def test_mismatched_mask_names_the_layer(tmp_path, packed):
    hub.save_pretrained(odd_sdt_model(), tmp_path, packed=packed)
    path = tmp_path / (hub.PACKED_WEIGHTS_NAME if packed else hub.MASKS_NAME)
    tensors = load_file(path)
    tensors["transformer.h.1.mlp.c_fc.sdt_mask"] = torch.ones(5, 5, dtype=torch.bool)
    save_file(tensors, path, metadata={"format": hub.PACKED_FORMAT if packed else hub.MASKS_FORMAT})
    with pytest.raises(ValueError, match=r"'transformer.h.1.mlp.c_fc' has shape \(5, 5\)"):
        hub.from_pretrained(str(tmp_path))


def test_a_packed_tensor_of_the_wrong_size_names_the_file_and_the_tensor(tmp_path):
    hub.save_pretrained(odd_sdt_model(), tmp_path, packed=True)
    path = tmp_path / hub.PACKED_WEIGHTS_NAME
    tensors = load_file(path)
    key = "transformer.h.0.attn.c_proj.bias"
    tensors[key] = tensors[key][:-7]
    save_file(tensors, path, metadata={"format": hub.PACKED_FORMAT})
    with pytest.raises(ValueError, match=rf"{path} does not fit its model's config: '{key}' has shape \(73,\)"):
        hub.from_pretrained(str(tmp_path))


def test_corrupt_packed_values_name_the_layer(tmp_path):
    hub.save_pretrained(odd_sdt_model(), tmp_path, packed=True)
    path = tmp_path / hub.PACKED_WEIGHTS_NAME
    tensors = load_file(path)
    key = "transformer.h.0.attn.c_proj" + hub.ACTIVE_SUFFIX
    tensors[key] = tensors[key][:-3]
    save_file(tensors, path, metadata={"format": hub.PACKED_FORMAT})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_proj' should store"):
        hub.from_pretrained(str(tmp_path))


def test_unreachable_repo_suggests_a_local_path():
    with pytest.raises(OSError, match="local folder"):
        hub.from_pretrained("nobody/does-not-exist")


def test_card_has_metadata_table_and_pictures(tmp_path):
    model = odd_sdt_model()
    sdt_card.write_model_card(model, tmp_path, repo_id="me/odd", base_model="gpt2", metrics={"eval_loss": 2.5})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "hf_sdt" and {"sdt", "sparse"} <= set(card.data.tags)
    assert card.data.base_model == "gpt2"
    for image in sdt_card.CARD_IMAGES:
        assert f"]({image})" in card.text
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| eval_loss | 2.5 |" in card.text and "| training wall time | not measured |" in card.text
    assert 'hf_sdt.from_pretrained("me/odd")' in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/odd")' in card.text, "the task's Auto class, not the bare model"
    sdt_card.write_model_card(model, tmp_path / "local")
    local = (tmp_path / "local" / "README.md").read_text()
    assert f'from_pretrained("{tmp_path / "local"}")' in local, "a card without a repo id loads from its own folder"


def test_card_says_what_a_compute_budget_planned(tmp_path):
    """Before the first step the density is the planner's to choose; after it, the card shows the planned one."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=80, n_layer=2, n_head=4, n_positions=32))
    model = get_sdt_model(model, SDTConfig(block_size=32, compute_budget=0.4))
    sdt_card.write_model_card(model, tmp_path / "before")
    assert (
        "cubic 1 -> the density it plans, planned for a compute budget of 0.4;"
        in (tmp_path / "before" / "README.md").read_text()
    )
    model.config.sdt_config.update(density=0.1234567, schedule_end=0.01)  # as the controller's plan writes it
    sdt_card.write_model_card(model, tmp_path / "after")
    assert "cubic 1 -> 0.1235, planned for a compute budget of 0.4;" in (tmp_path / "after" / "README.md").read_text()
    model.config.sdt_config.update(dense_tail=0.05)
    sdt_card.write_model_card(model, tmp_path / "tail")
    tail = "budget of 0.4, dense again for the last 0.05 of the steps;"
    assert tail in (tmp_path / "tail" / "README.md").read_text()


def test_push_and_load_through_the_hub(hub_server):
    model = odd_sdt_model()
    hub.push_to_hub(model, "test-user/odd-dense", base_model="gpt2", datasets=["austen"])
    hub.push_to_hub(model, "test-user/odd-packed", packed=True)
    assert_same_model(hub.from_pretrained("test-user/odd-dense"), model)
    assert_same_model(hub.from_pretrained("test-user/odd-packed"), model)
    vanilla = AutoModelForCausalLM.from_pretrained("test-user/odd-dense").eval()
    torch.testing.assert_close(vanilla(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    packed_card = ModelCard.load("test-user/odd-packed")
    assert "cannot read" in packed_card.text
    _, files = hub_server.files("test-user/odd-packed")
    assert hub.PACKED_WEIGHTS_NAME in files and "model.safetensors" not in files


def test_trainer_pushes_during_and_after_training(tmp_path, hub_server):
    args = training_args(
        tmp_path / "run",
        max_steps=6,
        push_to_hub=True,
        hub_model_id="test-user/trained",
        hub_strategy="every_save",
        save_strategy="steps",
        save_steps=3,
    )
    trainer = SDTTrainer(
        model=tiny_gpt2(), args=args, train_dataset=ByteChunks(), sdt_config=make_config(update_interval=2)
    )
    trainer.train()
    trainer.push_to_hub()
    commits = hub_server.repos["test-user/trained"]
    assert len(commits) >= 3, "intermediate pushes and the final one"
    _, files = hub_server.files("test-user/trained")
    assert {"README.md", "config.json", "model.safetensors", *sdt_card.CARD_IMAGES} <= set(files)
    card = ModelCard.load("test-user/trained")
    assert "sdt" in card.data.tags
    assert "not measured" not in card.text.split("| linear FLOPs saved")[1].split("\n")[0]
    trained = trainer.model.eval()
    assert_same_model(hub.from_pretrained("test-user/trained"), trained)
    vanilla = AutoModelForCausalLM.from_pretrained("test-user/trained").eval()
    torch.testing.assert_close(vanilla(IDS).logits, trained(IDS).logits, rtol=1e-5, atol=1e-5)
    assert os.path.isfile(tmp_path / "run" / "README.md")


def trained_adapter_model(base) -> GPT2LMHeadModel:
    """`base` in updates mode with non-zero updates, as after training."""
    model = get_sdt_model(base, SDTConfig(mode="updates", density=0.25, block_size=32))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in sdt_layers(model).values():
            layer.sdt_updates.copy_(0.1 * torch.randn(layer.sdt_updates.shape, generator=generator))
    return model.eval()


def odd_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=80, n_layer=2, n_head=4, n_positions=32))


def test_adapter_round_trip_through_the_hub_is_exact_and_merges(tmp_path, hub_server):
    odd_gpt2().push_to_hub("test-user/base")
    model = trained_adapter_model(AutoModelForCausalLM.from_pretrained("test-user/base"))
    want = model(IDS).logits
    hub.push_to_hub(model, "test-user/adapter", datasets=["austen"])
    _, files = hub_server.files("test-user/adapter")
    adapter_files = {sdt_adapter.ADAPTER_CONFIG_NAME, sdt_adapter.ADAPTER_WEIGHTS_NAME}
    assert {*adapter_files, "README.md", *sdt_card.CARD_IMAGES} == set(files)
    layers = sdt_layers(model).values()
    targeted_bytes = sum(layer.weight.numel() * 4 for layer in layers)
    id_bytes = sum(layer.sdt_block_ids.numel() * 8 for layer in layers)
    weighted_density = sum(layer.density * layer.weight.numel() for layer in layers) / (targeted_bytes / 4)
    padded = sum(layer.sdt_updates.numel() for layer in layers) / sum(layer.weight.numel() for layer in layers)
    assert len(files[sdt_adapter.ADAPTER_WEIGHTS_NAME]) < padded * targeted_bytes + id_bytes + 4096
    assert padded < weighted_density * 1.2, "edge padding stays small"
    card = ModelCard.load("test-user/adapter")
    assert card.data.base_model == "test-user/base" and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "hf_sdt" and {"sdt", "sparse"} <= set(card.data.tags)
    assert "Trained blocks" in card.text and "merge_and_unload" in card.text

    loaded = hub.from_pretrained("test-user/adapter").eval()
    torch.testing.assert_close(loaded(IDS).logits, want, rtol=0, atol=0)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ], "the loaded adapter can train further"
    merged = merge_and_unload(loaded)
    assert not sdt_layers(merged)
    torch.testing.assert_close(merged(IDS).logits, want, rtol=0, atol=0)
    merged.save_pretrained(tmp_path / "merged")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(vanilla(IDS).logits, want, rtol=0, atol=0)


def test_adapter_errors_are_clear_and_leave_the_base_untouched(tmp_path):
    odd_gpt2().save_pretrained(tmp_path / "base")
    model = trained_adapter_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    hub.save_pretrained(model, tmp_path / "adapter")
    other = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=96, n_layer=2, n_head=4, n_positions=32))
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError, match="another base model"):
        hub.from_pretrained(str(tmp_path / "adapter"), base_model=other)
    assert not sdt_layers(other) and all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(OSError, match="base_model="):
        hub.from_pretrained(str(tmp_path / "adapter"), base_model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="records no base model"):
        hub.save_pretrained(trained_adapter_model(odd_gpt2()), tmp_path / "orphan")
        hub.from_pretrained(str(tmp_path / "orphan"))
    weights = tmp_path / "adapter" / sdt_adapter.ADAPTER_WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights}.*corrupt or incomplete"):
        hub.from_pretrained(str(tmp_path / "adapter"))


def test_trainer_in_updates_mode_pushes_an_adapter(tmp_path, hub_server):
    args = training_args(tmp_path / "run", max_steps=4, push_to_hub=True, hub_model_id="test-user/sft")
    trainer = SDTTrainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=ByteChunks(),
        sdt_config=SDTConfig(mode="updates", block_size=16, selection_steps=2, update_interval=2),
    )
    trainer.train()
    trainer.push_to_hub()
    _, files = hub_server.files("test-user/sft")
    assert {sdt_adapter.ADAPTER_WEIGHTS_NAME, sdt_adapter.ADAPTER_CONFIG_NAME, "README.md"} <= set(files)
    assert "model.safetensors" not in files
    assert ModelCard.load("test-user/sft").data.base_model_relation == "adapter"


@pytest.mark.parametrize("packed", [False, True])
def test_truncated_checkpoint_names_the_file(tmp_path, packed):
    hub.save_pretrained(odd_sdt_model(), tmp_path, packed=packed)
    path = tmp_path / (hub.PACKED_WEIGHTS_NAME if packed else "model.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{path}.*corrupt or incomplete"):
        hub.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_a_model_loaded_under_inference_mode_generates(tmp_path, mode):
    """Serving code loads and runs under torch.inference_mode(), whose tensors have no version counter (which the
    layout caches are keyed on): prompt and one-token calls must run and equal a normal load's."""
    if mode == "updates":
        odd_gpt2().save_pretrained(tmp_path / "base")
        model = trained_adapter_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    else:
        model = odd_sdt_model()
    hub.save_pretrained(model, tmp_path / "sdt")
    with torch.inference_mode():
        loaded = hub.from_pretrained(str(tmp_path / "sdt")).eval()
        for ids in (IDS, IDS[:, :1]):
            torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_an_adapter_records_a_local_base_as_an_absolute_path(tmp_path, monkeypatch):
    """Saved after loading the base from a relative folder, the adapter loads from another working directory; a
    recorded folder that is gone is named, with what to do."""
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    odd_gpt2().save_pretrained("tiny-base")
    model = trained_adapter_model(AutoModelForCausalLM.from_pretrained("tiny-base"))
    hub.save_pretrained(model, tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / sdt_adapter.ADAPTER_CONFIG_NAME).read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "work" / "tiny-base")
    monkeypatch.chdir(tmp_path)
    loaded = hub.from_pretrained(str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    (tmp_path / "work" / "tiny-base").rename(tmp_path / "moved")
    with pytest.raises(OSError, match=r"local folder .*tiny-base.* does not exist.*base_model="):
        hub.from_pretrained(str(tmp_path / "adapter"))
    assert hub.from_pretrained(str(tmp_path / "adapter"), base_model=str(tmp_path / "moved")) is not None


def test_update_scale_is_saved_and_an_adapter_from_before_it_loads_unscaled(tmp_path):
    odd_gpt2().save_pretrained(tmp_path / "base")
    for scale in (1.0, 3.0):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        model = get_sdt_model(base, SDTConfig(mode="updates", density=0.25, block_size=32, update_scale=scale))
        with torch.no_grad():
            for layer in sdt_layers(model).values():
                layer.sdt_updates.normal_(std=0.1)
        model.eval()
        hub.save_pretrained(model, tmp_path / f"adapter-{scale}")
        loaded = hub.from_pretrained(str(tmp_path / f"adapter-{scale}")).eval()
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        assert all(layer.update_scale == scale for layer in sdt_layers(loaded).values())
    config_path = tmp_path / "adapter-1.0" / sdt_adapter.ADAPTER_CONFIG_NAME
    description = json.loads(config_path.read_text())
    del description["sdt_config"]["update_scale"]  # as hf_sdt wrote adapters before the field existed
    config_path.write_text(json.dumps(description))
    loaded = hub.from_pretrained(str(tmp_path / "adapter-1.0")).eval()
    assert all(layer.update_scale == 1.0 for layer in sdt_layers(loaded).values())
    scaled = get_sdt_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                           SDTConfig(mode="updates", density=0.25, block_size=32, update_scale=2.0))  # fmt: skip
    with pytest.raises(ValueError, match=r"trained with update_scale=3\.0, the model is configured with 2\.0"):
        hub.from_pretrained(str(tmp_path / "adapter-3.0"), base_model=scaled)


def test_an_adapter_with_another_block_size_says_which_block_sizes_differ(tmp_path):
    odd_gpt2().save_pretrained(tmp_path / "base")
    hub.save_pretrained(trained_adapter_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base")), tmp_path / "a")
    other = get_sdt_model(odd_gpt2(), SDTConfig(mode="updates", density=0.25, block_size=16))
    with pytest.raises(ValueError, match=r"adapter has blocks of \(32, 32\), the model is configured with blocks of "
                                         r"\(16, 16\)"):  # fmt: skip
        hub.from_pretrained(str(tmp_path / "a"), base_model=other)


def test_peft_format_adapter_loads_in_stock_peft_with_the_same_logits_and_merge(tmp_path, hub_server):
    """`format="peft"`: a SHiRA adapter that `peft.PeftModel.from_pretrained` loads by itself (hf_sdt not used on
    the way in) with the trained model's logits and merged weights, on odd shapes (partial edge blocks), blocks
    that differ in number across layers, and zero-valued padding where SHiRA's equal count needs it; pushed, with a
    card that says how PEFT loads it."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    def base():
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=40, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=72, vocab_size=64)  # fmt: skip
        return LlamaForCausalLM(config).eval()

    base().save_pretrained(tmp_path / "base")
    model = get_sdt_model(base(), SDTConfig(mode="updates", block_size=16, density=0.3, distribution="erk"))
    for layer in sdt_layers(model).values():
        layer.sdt_updates.data.normal_(0, 0.05)
    tokens = torch.arange(10)[None]
    with torch.no_grad():
        expected = model(tokens).logits
    hub.save_pretrained(model, tmp_path / "peft", format="peft", base_model=str(tmp_path / "base"))
    assert sorted(os.listdir(tmp_path / "peft")) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected)
    hub.push_to_hub(model, "test-user/peft-adapter", format="peft", base_model="test-user/base")
    _, files = hub_server.files("test-user/peft-adapter")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    card = ModelCard.load("test-user/peft-adapter")
    assert card.data.library_name == "peft"
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("test-user/base")' in card.text
    merged = loaded.merge_and_unload().state_dict()
    for name, value in merge_and_unload(model).state_dict().items():
        torch.testing.assert_close(merged[name], value, msg=name)
    with pytest.raises(ValueError, match="Conv1D"):
        hub.save_pretrained(get_sdt_model(tiny_gpt2(), SDTConfig(mode="updates", block_size=16)), tmp_path / "x",
                            format="peft")  # fmt: skip
    with pytest.raises(ValueError, match="format"):
        hub.save_pretrained(model, tmp_path / "y", format="lora")
