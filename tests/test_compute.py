import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_sdt import SDTConfig, SDTController, get_sdt_model, sdt_layers
from hf_sdt.compute import ComputeMeter

TOKENS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
EAGER = {"attn_implementation": "eager"}  # PyTorch's FlopCounterMode has no formula for SDPA's CPU kernel


def gpt2(tied=True):
    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, tie_word_embeddings=tied, **EAGER)
    )


def llama(tied=False):
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=100, tie_word_embeddings=tied, **EAGER)  # fmt: skip
    return LlamaForCausalLM(config)


def bert(head="mlm"):
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=96,
                        vocab_size=100, num_labels=3, **EAGER)  # fmt: skip
    return BertForMaskedLM(config) if head == "mlm" else BertForSequenceClassification(config)


def t5():
    config = T5Config(num_layers=2, d_model=64, num_heads=4, d_kv=16, d_ff=96, vocab_size=100,
                      decoder_start_token_id=0, pad_token_id=0, **EAGER)  # fmt: skip
    return T5ForConditionalGeneration(config)


def training_loss(model):
    if isinstance(model, T5ForConditionalGeneration):  # cross-attention over 24 source tokens from 10 targets
        return model(input_ids=TOKENS, decoder_input_ids=TOKENS[:, :10]).logits.square().mean()
    labels = torch.tensor([0, 2]) if isinstance(model, BertForSequenceClassification) else TOKENS
    return model(input_ids=TOKENS, labels=labels).loss


@pytest.mark.parametrize(
    "build",
    [gpt2, lambda: gpt2(tied=False), llama, lambda: llama(tied=True), bert, lambda: bert("classify"), t5],
    ids=["gpt2", "gpt2-untied", "llama", "llama-tied", "bert-mlm", "bert-classify", "t5"],
)
def test_receipt_of_a_dense_model_is_what_flop_counter_mode_counts(build):
    """The documented formula (every linear layer's three products, the attention products, self and cross) gives
    exactly FlopCounterMode's count of a dense training step, on four architectures, tied or untied outputs."""
    torch.manual_seed(0)
    model = build()
    meter = ComputeMeter(model)
    meter.begin_step()
    with FlopCounterMode(display=False) as counter:
        training_loss(model).backward()
    actual, dense = meter.end_step()
    assert actual == dense == counter.get_total_flops() > 0


def test_evaluation_forwards_are_not_training_compute():
    model = gpt2()
    meter = ComputeMeter(model)
    meter.begin_step()
    model.eval()
    with torch.no_grad():
        model(input_ids=TOKENS)
    assert meter.end_step() == (0, 0)


def test_frozen_layers_count_no_weight_gradient():
    """A frozen layer's backward computes dX only, and the first layer after a frozen embedding no dX."""
    model = gpt2(tied=False)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    meter = ComputeMeter(model)
    meter.begin_step()
    with FlopCounterMode(display=False) as counter:
        training_loss(model).backward()
    assert meter.end_step()[0] == counter.get_total_flops()


CASES = {
    "weights-blocked": ({"mode": "weights", "storage": "dense"}, True),
    "weights-dense-fallback": ({"mode": "weights", "storage": "dense"}, False),
    "weights-compact": ({"mode": "weights", "storage": "compact"}, True),
    "weights-reference": ({"mode": "weights", "backend": "reference"}, True),
    "updates": ({"mode": "updates"}, True),
    "updates-reference": ({"mode": "updates", "backend": "reference"}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_receipt_of_sdt_training_is_what_flop_counter_mode_counts(case, monkeypatch):
    """Around whole SDT training steps (topology updates and the dense gradients of their statistics steps
    included) FlopCounterMode and the controller's receipt count the same FLOPs, and the dense model's count is
    that of the same steps without SDT."""
    from hf_sdt.functional import dispatch

    fields, pays = CASES[case]
    monkeypatch.setattr(dispatch, "blocked_path_pays", lambda layout, tokens, block: pays)
    torch.manual_seed(0)
    base, dense_model = gpt2(tied=False), gpt2(tied=False)
    dense_model.load_state_dict(base.state_dict())
    config = SDTConfig(density=0.5, block_size=16, schedule="constant", update_interval=2, selection_steps=1,
                       **fields)  # fmt: skip
    model = get_sdt_model(base, config)
    targeted = sdt_layers(model)
    for name, parameter in dense_model.named_parameters():  # what updates mode freezes, the dense step freezes
        if name.rsplit(".", 1)[0] not in targeted:
            parameter.requires_grad_(model.get_parameter(name).requires_grad)
    controller = SDTController(model, config, total_steps=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    regular_steps = []  # (FLOPs, dense FLOPs) of the steps that take no dense gradient
    with FlopCounterMode(display=False) as counter:
        for step in range(4):
            controller.begin_step(step)
            training_loss(model).backward()
            controller.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            capturing, before = controller.capturing, (controller.train_flops, controller.dense_train_flops)
            controller.after_optimizer_step()
            if not capturing:
                regular_steps.append((controller.train_flops - before[0], controller.dense_train_flops - before[1]))
    with FlopCounterMode(display=False) as dense_counter:
        for _ in range(4):
            training_loss(dense_model).backward()
    metrics = controller.metrics()
    assert controller.train_flops == counter.get_total_flops()
    assert controller.dense_train_flops == dense_counter.get_total_flops()
    assert metrics["sdt/train_flops_ratio"] == pytest.approx(controller.train_flops / controller.dense_train_flops)
    assert metrics["sdt/train_flops_saved"] == pytest.approx(1 - metrics["sdt/train_flops_ratio"])
    saves = pays and fields.get("backend") != "reference"  # a masked dense product saves nothing
    assert regular_steps and all((actual < dense) == saves for actual, dense in regular_steps)


def test_receipt_resumes_and_survives_a_compiled_step():
    """The cumulative receipt is part of the controller's state; a step no hook saw (as a compiled one) counts as
    the last step they saw."""
    torch.manual_seed(0)
    config = SDTConfig(density=0.5, block_size=16, schedule="constant", update_interval=100)
    model = get_sdt_model(gpt2(), config)
    controller = SDTController(model, config, total_steps=4)
    for step in range(2):
        controller.begin_step(step)
        training_loss(model).backward()
        controller.before_optimizer_step()
        controller.after_optimizer_step()
    one_step = controller.train_flops // 2
    controller.begin_step(2)
    controller.before_optimizer_step()  # no forward seen
    controller.after_optimizer_step()
    assert controller.train_flops == 3 * one_step
    resumed = SDTController(model, config, total_steps=4)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.metrics()["sdt/train_flops_ratio"] == controller.metrics()["sdt/train_flops_ratio"]
