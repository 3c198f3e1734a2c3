import math
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from sdt_helpers import (
    PAIRS,
    assert_same_state,
    run_ddp_worker,
    sdt_config_for_trl,
    sft_trainer,
    tiny_llama,
    word_tokenizer,
)
from transformers import LlamaForCausalLM

from hf_sdt import from_pretrained, sdt_layers
from hf_sdt.masks import expand_block_mask
from hf_sdt.trainer import SDT_STATE_NAME

trl = pytest.importorskip("trl")
from hf_sdt import SDTDPOTrainer  # noqa: E402  (needs trl)


def logits(model, tokens):
    """The logits of the model class's own forward (TRL patches the instance's)."""
    with torch.no_grad():
        return LlamaForCausalLM.forward(model, input_ids=tokens).logits


@pytest.mark.parametrize("data", ["messages", "text"])
@pytest.mark.parametrize("mode", ["updates", "weights"])
def test_sft_runs_sdt_and_saves_what_sdt_trainer_saves(tmp_path, mode, data):
    trainer = sft_trainer(tmp_path, mode, data, save_strategy="steps", save_steps=3)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "sdt/density" in entry]
    assert len(logs) == 6 and max(entry["sdt/churn"] for entry in logs) > 0, "topology changes are logged"
    assert logs[0]["loss"] > logs[-1]["loss"]
    saved = set(os.listdir(tmp_path / "checkpoint-3"))
    assert SDT_STATE_NAME in saved
    if mode == "updates":
        assert {"sdt_adapter.safetensors", "sdt_adapter_config.json"} <= saved and "model.safetensors" not in saved
    else:
        assert {"model.safetensors", "sdt_masks.safetensors"} <= saved
    trainer.save_model()
    tokens = torch.tensor([[3, 4, 5, 6, 3, 7]])
    base = tiny_llama() if mode == "updates" else None
    loaded = from_pretrained(str(tmp_path), base_model=base) if base is not None else from_pretrained(str(tmp_path))
    torch.testing.assert_close(logits(loaded.eval(), tokens), logits(trainer.model.eval(), tokens))


@pytest.mark.parametrize("mode", ["updates", "weights"])
def test_sft_resume_ends_like_an_uninterrupted_run(tmp_path, mode):
    full = sft_trainer(tmp_path / "full", mode, "messages", save_strategy="steps", save_steps=3)
    full.train()
    resumed = sft_trainer(tmp_path / "resumed", mode, "messages")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert_same_state(full.model.state_dict(), resumed.model.state_dict())


def dpo_trainer(tmp_path, mode, ref_model=None):
    args = trl.DPOConfig(
        str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, report_to=[],
        use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    return SDTDPOTrainer(tiny_llama(), ref_model, args=args, train_dataset=Dataset.from_list(PAIRS),
                         processing_class=word_tokenizer(), sdt_config=sdt_config_for_trl(mode))  # fmt: skip


def test_dpo_in_updates_mode_takes_its_reference_from_the_base_model(tmp_path):
    """No reference copy: `ref_model` stays None, the first loss is log 2, the reference log-probs are the base
    model's (the policy with its updates disabled) after training too, and the frozen weights never move."""
    trainer = dpo_trainer(tmp_path, "updates")
    assert trainer.ref_model is None
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]
    assert trainer.ref_model is None
    batch = next(iter(trainer.get_train_dataloader()))
    reference = trainer.compute_ref_log_probs(trainer.model, batch)
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama()  # the untouched pretrained model, as TRL's own reference
    add_fused_lm_head(base)
    trainer._base_model_reference, trainer.ref_model = None, base
    expected = trainer.compute_ref_log_probs(trainer.model, batch)
    for got, want in zip(reference, expected, strict=True):
        torch.testing.assert_close(got, want)
    pretrained = tiny_llama().state_dict()
    for name, layer in sdt_layers(trainer.model).items():
        layer.materialize_()
        active = expand_block_mask(layer.block_mask, layer.block_size, (layer.out_features, layer.in_features))
        assert torch.equal(layer.weight[~active], pretrained[name + ".weight"][~active])
        assert layer.sdt_updates.abs().sum() > 0


def test_dpo_in_weights_mode_keeps_trls_reference(tmp_path):
    reference = tiny_llama()
    trainer = dpo_trainer(tmp_path, "weights", ref_model=reference)
    assert trainer.ref_model is not None and not sdt_layers(trainer.ref_model)
    trainer.train()
    assert max(entry.get("sdt/churn", 0) for entry in trainer.state.log_history) > 0


def test_without_trl_the_error_says_what_to_install():
    code = "import sys; sys.modules['trl'] = None\nimport hf_sdt\nhf_sdt.SDTSFTTrainer"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and 'pip install "hf-sdt[trl]"' in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["updates", "weights"])
def test_sft_under_two_processes_keeps_the_ranks_alike(tmp_path, mode):
    """`accelerate launch` with 2 CPU processes (DDP, gloo): both ranks end with the same topology and weights."""
    rank0, rank1 = run_ddp_worker(tmp_path, 2, f"sft-{mode}")
    assert any(key.endswith(("sdt_mask", "sdt_block_ids")) for key in rank0)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"


def test_sft_pushes_the_sdt_card_and_loads_the_best_checkpoint(tmp_path, hub_server):
    """Through TRL too: `push_to_hub` uploads the adapter with the SDT card, and `load_best_model_at_end` loads the
    best checkpoint's adapter (here the highest loss, an early one, so that loading it changes the model)."""
    trainer = sft_trainer(
        tmp_path, "updates", "messages", max_steps=6, evaluate=True, save_strategy="steps", save_steps=2,
        eval_strategy="steps",
        eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
        push_to_hub=True, hub_model_id="test-user/sft",
    )  # fmt: skip
    trainer.train()
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-6")
    best = from_pretrained(trainer.state.best_model_checkpoint, base_model=tiny_llama())
    tokens = torch.tensor([[3, 4, 5, 6, 3, 7]])
    torch.testing.assert_close(logits(trainer.model.eval(), tokens), logits(best.eval(), tokens))
    trainer.push_to_hub()
    _, files = hub_server.files("test-user/sft")
    assert {"README.md", "sdt_adapter.safetensors", "sdt_adapter_config.json"} <= set(files)
    assert "model.safetensors" not in files
