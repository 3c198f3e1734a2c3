import copy
import warnings

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

from hf_sdt import (
    SDTCompactLinear,
    SDTConfig,
    SDTController,
    SDTLinear,
    disable_updates,
    get_sdt_model,
    print_sparsity_summary,
    sdt_layers,
    sparsity_summary,
    unload,
)
from hf_sdt.masks import expand_block_mask
from hf_sdt.model import unused_trainable_parameters

VOCAB = 96
TINY = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
    "opt": lambda: OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
        )
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
        )
    ),
    "bert": lambda: BertForMaskedLM(
        BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    ),
    "t5": lambda: T5ForConditionalGeneration(
        T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=100, num_layers=2, num_heads=4)
    ),
}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = TINY[arch]()
    model.eval()
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if model.config.is_encoder_decoder:
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits


def masked_dense_copy(original: nn.Module, converted: nn.Module) -> nn.Module:
    """The original model with each converted layer's weight multiplied by its element mask."""
    dense = copy.deepcopy(original)
    for name, layer in sdt_layers(converted).items():
        target = dense.get_submodule(name)
        element_mask = expand_block_mask(layer.sdt_mask, layer.block_size, (layer.out_features, layer.in_features))
        with torch.no_grad():
            weight_out_in = target.weight.t() if isinstance(target, Conv1D) else target.weight
            weight_out_in.mul_(element_mask)
    return dense


@pytest.mark.parametrize("arch", sorted(TINY))
def test_converted_model_equals_masked_dense_copy(arch):
    original = build(arch)
    model = get_sdt_model(
        copy.deepcopy(original), SDTConfig(density=0.5, initial_density=0.5, block_size=16, backend="torch")
    )
    layers = sdt_layers(model)
    assert layers, "all-linear must find linear layers"
    assert type(model) is type(original)
    assert model.config.sdt_config["density"] == 0.5
    output_embeddings = model.get_output_embeddings()
    assert not isinstance(output_embeddings, SDTLinear)
    torch.testing.assert_close(output_embeddings.weight, original.get_output_embeddings().weight, rtol=0, atol=0)
    for layer in layers.values():
        assert int(layer.sdt_mask.sum()) == max(1, round(0.5 * layer.sdt_mask.numel()))
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        logits(model, ids), logits(masked_dense_copy(original, model), ids), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_optimizer_steps_keep_inactive_weights_zero(arch):
    model = get_sdt_model(build(arch), SDTConfig(density=0.25, schedule="constant", block_size=16))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, layer in sdt_layers(model).items():
        element_mask = expand_block_mask(layer.sdt_mask, layer.block_size, (layer.out_features, layer.in_features))
        assert (layer.weight_out_in[~element_mask] == 0).all(), name
        assert (layer.weight_out_in[element_mask] != 0).any(), name


@pytest.mark.parametrize("arch", sorted(TINY))
def test_compact_and_dense_storage_train_alike_under_the_controller(arch):
    """The architecture grid, 6 AdamW steps with the controller, drop/grow by gradient every 2 steps: compact
    storage (only the active blocks) chooses the same blocks and ends with the same weights as dense storage, and
    its optimizer states are compact."""
    results = []
    for storage in ("dense", "compact"):
        config = SDTConfig(density=0.25, schedule="constant", block_size=16, update_interval=2, update_end=1.0,
                           grow_criterion="gradient", storage=storage)  # fmt: skip
        model = get_sdt_model(build(arch), config)
        model.train()
        controller = SDTController(model, config, total_steps=6)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        churns = []
        for step in range(6):
            controller.begin_step(step)
            ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))
            kwargs = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
            model(input_ids=ids, labels=ids, **kwargs).loss.backward()
            controller.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            controller.after_optimizer_step()
            churns.append(controller.churn)
        assert max(churns) > 0, "blocks moved"
        results.append((model.state_dict(), optimizer, model))
    (dense_state, _, _), (compact_state, optimizer, model) = results
    assert sparsity_summary(model)["storage"] == "compact"
    for key, value in dense_state.items():
        if key.endswith("sdt_mask"):
            assert torch.equal(compact_state[key], value), key
        else:
            torch.testing.assert_close(compact_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
    for name, layer in sdt_layers(model).items():
        assert isinstance(layer, SDTCompactLinear), name
        moments = [v for v in optimizer.state[layer.sdt_blocks].values() if v.dim()]
        assert moments and all(v.shape == (int(layer.sdt_mask.sum()), 16, 16) for v in moments), name


def test_initial_mask_keeps_the_largest_blocks():
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
        model[0].weight[16:, :16] = 5.0
    get_sdt_model(model, SDTConfig(target_modules=["0"], density=0.25, schedule="constant", block_size=16))
    assert model[0].sdt_mask.tolist() == [[False, False], [True, False]]


def test_target_list_regex_and_exclude():
    model = get_sdt_model(build("llama"), SDTConfig(target_modules=["q_proj", "v_proj"], block_size=16))
    assert {name.rsplit(".", 1)[-1] for name in sdt_layers(model)} == {"q_proj", "v_proj"}
    model = get_sdt_model(
        build("llama"),
        SDTConfig(target_modules=r".*layers\.0\.mlp\.\w+_proj", exclude_modules=["down_proj"], block_size=16),
    )
    assert sorted(sdt_layers(model)) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_unmatched_targets_list_what_is_available():
    with pytest.raises(ValueError, match=r"matched no layer.*c_attn.*c_fc"):
        get_sdt_model(build("gpt2"), SDTConfig(target_modules=["q_proj"]))


def test_non_linear_target_is_named():
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn' is a GPT2Attention"):
        get_sdt_model(build("gpt2"), SDTConfig(target_modules=r"transformer\.h\.0\.attn"))


def test_tied_output_embedding_is_refused():
    with pytest.raises(ValueError, match="shares its weight with the input embeddings"):
        get_sdt_model(build("gpt2"), SDTConfig(target_modules=["lm_head"]))


def test_converting_twice_is_refused():
    model = get_sdt_model(build("gpt2"), SDTConfig(block_size=16))
    with pytest.raises(ValueError, match="already has SDT layers"):
        get_sdt_model(model, SDTConfig(block_size=16))


def test_unload_restores_original_classes_with_zeros():
    original = build("gpt2")
    model = get_sdt_model(copy.deepcopy(original), SDTConfig(density=0.5, schedule="constant", block_size=16))
    ids = torch.randint(0, VOCAB, (1, 8))
    expected = logits(model, ids)
    unload(model)
    assert not sdt_layers(model)
    assert not hasattr(model.config, "sdt_config")
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert set(model.state_dict()) == set(original.state_dict())
    torch.testing.assert_close(logits(model, ids), expected)


def test_sparsity_summary(capsys):
    model = get_sdt_model(build("gpt2"), SDTConfig(density=0.25, schedule="constant", block_size=16))
    summary = sparsity_summary(model)
    assert len(summary["layers"]) == 8
    active = sum(layer["density"] * layer["shape"][0] * layer["shape"][1] for layer in summary["layers"])
    total = sum(layer["shape"][0] * layer["shape"][1] for layer in summary["layers"])
    assert summary["density"] == pytest.approx(active / total)
    assert summary["linear_flops_ratio"] == pytest.approx(0.25)
    c_attn = summary["layers"][0]
    assert c_attn["name"] == "transformer.h.0.attn.c_attn"
    assert c_attn["shape"] == (192, 64) and c_attn["active_blocks"] == 12 and c_attn["total_blocks"] == 48
    print_sparsity_summary(model)
    printed = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in printed and "8 SDT layers (weights mode, compact storage)" in printed
    print_sparsity_summary(get_sdt_model(build("gpt2"), SDTConfig(density=0.25, block_size=16)))
    assert "Dense storage: whole weights" in capsys.readouterr().out, "a gradual schedule says why it is dense"
    with pytest.raises(ValueError, match="get_sdt_model"):
        sparsity_summary(build("gpt2"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_updates_mode_freezes_everything_but_the_updates(arch):
    model = get_sdt_model(build(arch), SDTConfig(mode="updates", density=0.25, block_size=16))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(name.endswith("sdt_updates") for name in trainable)
    assert set(sparsity_summary(model)) >= {"mode", "density"} and sparsity_summary(model)["mode"] == "updates"
    assert unload(model) is model and not sdt_layers(model)


def test_updates_mode_trains_the_classifier_head_densely():
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)  # fmt: skip
    model = get_sdt_model(LlamaForSequenceClassification(config), SDTConfig(mode="updates", block_size=16))
    assert model.config.sdt_config["modules_to_save"] == ["score"]
    assert "score" not in sdt_layers(model) and model.score.weight.requires_grad
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        get_sdt_model(build("llama"), SDTConfig(mode="updates", block_size=16, modules_to_save=["head"]))


def test_a_model_without_input_embeddings_is_a_valid_target():
    from transformers import PretrainedConfig, PreTrainedModel

    class TwoLinear(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.first, self.second = nn.Linear(64, 64), nn.Linear(64, 32)

        def forward(self, x):
            return self.second(self.first(x))

    model = get_sdt_model(TwoLinear(PretrainedConfig()), SDTConfig(block_size=16, schedule="constant"))
    assert sorted(sdt_layers(model)) == ["first", "second"]


def test_all_linear_on_a_peft_model_skips_the_adapters_and_the_output_layer():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = get_sdt_model(model, SDTConfig(density=0.25, block_size=16, schedule="constant"))
    names = list(sdt_layers(model))
    assert not any("lora_" in name or "lm_head" in name for name in names), names
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names
    assert "base_model.model.model.layers.0.self_attn.k_proj" in names
    ids = torch.randint(0, VOCAB, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad is not None


def test_a_density_that_blocks_cannot_reach_is_warned_about_once():
    config = SDTConfig(density=0.1, block_size=32, schedule="constant")
    with pytest.warns(UserWarning, match=r"density 0.1 becomes 0.1250 with blocks of \(32, 32\)"):
        model = get_sdt_model(build("gpt2"), config)
    masks = {name: layer.sdt_mask for name, layer in sdt_layers(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading the converted model (its masks given) does not warn again
        get_sdt_model(build("gpt2"), config, masks=masks)


@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_blocks_too_large_for_every_layer_are_an_error_naming_a_block_size_that_works(mode):
    """Blocks larger than the layers keep every layer whole: a density below 1 that no layer can honour is refused
    (the run would be dense), with the layers and a block size that leaves none of them dense."""
    with pytest.raises(ValueError, match=r"density=0\.25 cannot be honoured with blocks of \(512, 512\).*"
                                         r"transformer\.h\.0\.attn\.c_attn \(192 x 64\).*block_size=32"):  # fmt: skip
        get_sdt_model(build("gpt2"), SDTConfig(mode=mode, density=0.25, block_size=512))
    suggested = get_sdt_model(build("gpt2"), SDTConfig(mode=mode, density=0.25, block_size=32, schedule="constant"))
    assert all(layer.density < 1 for layer in sdt_layers(suggested).values())


def test_the_no_controller_warning_is_once_and_not_for_an_unloaded_model():
    ids = torch.randint(0, VOCAB, (1, 8))
    model = get_sdt_model(build("gpt2").train(), SDTConfig(density=0.5, block_size=16))
    with pytest.warns(UserWarning, match="without an SDT controller") as caught:
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
    assert len([w for w in caught if "without an SDT controller" in str(w.message)]) == 1
    unloaded = unload(get_sdt_model(build("gpt2").train(), SDTConfig(density=0.5, block_size=16)))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without an SDT controller")
        unloaded(input_ids=ids, labels=ids).loss.backward()


def test_disable_updates_gives_the_base_model_and_restores_the_updates():
    base = TINY["gpt2"]().eval()
    tokens = torch.arange(12)[None]
    with torch.no_grad():
        expected = base(tokens).logits
        model = get_sdt_model(copy.deepcopy(base), SDTConfig(mode="updates", block_size=16))
        for layer in sdt_layers(model).values():
            layer.sdt_updates.normal_(0, 0.1)
        trained = model(tokens).logits
        with disable_updates(model):
            torch.testing.assert_close(model(tokens).logits, expected)
        torch.testing.assert_close(model(tokens).logits, trained)
    assert not torch.allclose(trained, expected)
    with pytest.raises(ValueError, match="updates-mode"), disable_updates(TINY["gpt2"]()):
        pass


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_sdt_models_use_every_trainable_parameter(family, mode):
    model = get_sdt_model(TINY[family](), SDTConfig(mode=mode, block_size=16, density=0.25))
    assert unused_trainable_parameters(model) == []


def test_unused_trainable_parameters_are_named_and_the_modes_restored():
    model = get_sdt_model(TINY["llama"](), SDTConfig(block_size=16)).train()
    model.model.layers[0].mlp.extra = nn.Linear(4, 4)
    model.model.layers[1].eval()
    model.model.frozen = nn.Linear(4, 4).requires_grad_(False)  # unused, but it trains nothing
    assert unused_trainable_parameters(model) == ["model.layers.0.mlp.extra.weight", "model.layers.0.mlp.extra.bias"]
    assert model.training and model.model.layers[0].training and not model.model.layers[1].training
    assert all(param.grad is None for param in model.parameters())
    assert unused_trainable_parameters(nn.Linear(4, 4)) is None  # no dummy inputs: nothing is known


@pytest.mark.parametrize(
    ("field", "value"), [("layerdrop", 0.1), ("encoder_layerdrop", 0.05), ("num_local_experts", 8)]
)
def test_unused_trainable_parameters_are_unknown_when_their_use_varies(field, value):
    model = TINY["llama"]()
    assert unused_trainable_parameters(model) == []
    setattr(model.config, field, value)  # other layers dropped, or other experts routed to, at each step
    assert unused_trainable_parameters(model) is None


def test_unused_trainable_parameters_pass_an_attention_mask():
    """The dummy ids hold the pad id 0 (as a tokenizer's pad token often is): with no mask, transformers warns."""
    from unittest import mock

    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, pad_token_id=0))
    with mock.patch.object(type(model.transformer), "warn_if_padding_and_no_attention_mask") as check:
        assert unused_trainable_parameters(model) == []
    check.assert_called_once()
    assert check.call_args.args[1] is not None, "no attention mask was passed"
