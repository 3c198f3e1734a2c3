import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_sdt
from hf_sdt import sparsity_summary
from hf_sdt.arguments import parse_train_args
from hf_sdt.training import build_model, build_tokenizer, run_training

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny.yaml")


def test_the_seed_fixes_a_from_scratch_run(tmp_path):
    def eval_loss(name: str, seed: int) -> float:
        argv = [TINY, "--max_steps", "2", "--seed", str(seed), "--output_dir", str(tmp_path / name)]
        return run_training(*parse_train_args(argv))["eval_loss"]

    assert eval_loss("first", 0) == eval_loss("again", 0) != eval_loss("other_seed", 1)


def test_a_from_scratch_model_takes_the_tokenizers_special_tokens_and_loads_silently(tmp_path, capfd):
    run_training(*parse_train_args([TINY, "--max_steps", "1", "--output_dir", str(tmp_path)]))
    capfd.readouterr()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.bos_token_id == model.config.eos_token_id == tokenizer.eos_token_id < len(tokenizer)
    assert capfd.readouterr().err.count("\n") <= 2  # the progress bar; no load report, no token id warning


def test_updates_mode_fine_tunes_a_saved_model_into_an_adapter(tmp_path):
    base = tmp_path / "base"
    run_training(*parse_train_args([TINY, "--max_steps", "2", "--output_dir", str(base), "--dense"]))
    argv = [TINY, "--model_name_or_path", str(base), "--mode", "updates", "--selection_steps", "2",
            "--output_dir", str(tmp_path / "adapter")]  # fmt: skip
    metrics = run_training(*parse_train_args(argv))
    assert metrics["sdt/density"] == 0.25 and math.isfinite(metrics["eval_loss"])
    assert {"sdt_adapter.safetensors", "sdt_adapter_config.json", "README.md"} <= set(os.listdir(tmp_path / "adapter"))
    model = hf_sdt.from_pretrained(str(tmp_path / "adapter"))  # finds the base by its recorded folder
    assert sparsity_summary(model)["mode"] == "updates"


def test_empty_training_file_is_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=f"'{empty}' is empty"):
        run_training(*parse_train_args([TINY, "--train_files", str(empty), "--output_dir", str(tmp_path / "o")]))


def test_the_command_line_resumes_from_a_checkpoint(tmp_path):
    def final_state(name: str, *flags: str) -> dict:
        argv = [TINY, "--max_steps", "6", "--output_dir", str(tmp_path / name), *flags]
        run_training(*parse_train_args(argv))
        return load_file(tmp_path / name / "model.safetensors")

    # The first run's steps 0-2 use another learning rate: a resumed run differs from a fresh one only if it resumed.
    final_state("other", "--learning_rate", "0.02", "--save_strategy", "steps", "--save_steps", "3")
    resumed = final_state("resumed", "--resume_from_checkpoint", str(tmp_path / "other" / "checkpoint-3"))
    fresh = final_state("fresh")
    assert any(not torch.equal(resumed[key], fresh[key]) for key in fresh if not key.endswith("sdt_mask"))


def test_a_gpt2_from_the_command_line_names_its_loss():
    """transformers cannot tell GPT2LMHeadModel's loss from its class name and says so on every run ("loss_type=None
    ... unrecognized"); the models hf-sdt train builds name the causal-LM loss it falls back to."""
    model_args, data_args, _, _ = parse_train_args([TINY])
    tokenizer = build_tokenizer(model_args, ["a few words of text"] * 4)
    assert build_model(model_args, tokenizer, data_args.max_seq_length).loss_type == "ForCausalLM"


def test_end_distributed_frees_a_finished_trainer_first():
    """What holds the process group (a finished Trainer, in reference cycles with its DDP model) is freed before the
    group is destroyed, not left to the interpreter's teardown, where gloo's threads could abort the process."""
    import gc
    import weakref

    from hf_sdt.training import end_distributed

    class Finished:
        pass

    trainer = Finished()
    trainer.cycle = trainer
    alive = weakref.ref(trainer)
    gc.disable()  # as if no collection ran between the end of training and the exit
    try:
        del trainer
        assert alive() is not None
        end_distributed()
        assert alive() is None
    finally:
        gc.enable()
