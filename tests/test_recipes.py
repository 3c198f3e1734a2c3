import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from sdt_helpers import save_tiny_llama

import hf_sdt

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml"))


def test_there_are_single_multi_gpu_multi_node_and_fsdp2_configs():
    assert {path.stem for path in CONFIGS} == {"single_gpu", "multi_gpu", "multi_node", "fsdp2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_accelerate_reads_the_config(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.mixed_precision == "bf16"
    if path.stem == "fsdp2":
        assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    elif path.stem != "single_gpu":
        assert config.distributed_type == "MULTI_GPU" and config.num_processes > 1
    if path.stem == "multi_node":
        assert config.num_machines == 2


def tiny_bert(folder: Path, words: list[str]) -> None:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    BertTokenizerFast(vocab={token: index for index, token in enumerate(tokens)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)


# Updates mode trains few weights: a higher learning rate (see SDTConfig), and time for its blocks between selections.
MODE_FLAGS = {
    "weights": ["--update_interval", "4"],
    "updates": ["--update_interval", "10", "--selection_steps", "2", "--learning_rate", "3e-3"],
}


@pytest.mark.parametrize("mode", ["weights", "updates"])
def test_classification_recipe_trains_a_sparse_encoder(tmp_path, mode):
    rows = [("happy joyful glad", "pos"), ("sad gloomy bad", "neg")] * 32
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "\n".join(f"{text},{label}" for text, label in rows) + "\n")
    tiny_bert(tmp_path / "bert", [word for text, _ in rows for word in text.split()])
    script = Path(__file__).resolve().parents[1] / "recipes" / "finetune_classification.py"
    result = subprocess.run(
        [sys.executable, str(script), "--model_name_or_path", str(tmp_path / "bert"), "--train_file", str(data),
         "--validation_file", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "40",
         "--learning_rate", "1e-3", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
         "--density", "0.5", "--block_size", "16", "--mode", mode, *MODE_FLAGS[mode]],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.split("'eval_accuracy': ")[1].split(",")[0])
    assert accuracy >= 0.9, result.stdout[-500:]
    model = hf_sdt.from_pretrained(str(tmp_path / "out"))
    names = set(hf_sdt.sdt_layers(model))
    assert names and not any("classifier" in name for name in names), "the head stays dense"
    if mode == "updates":  # the adapter holds the trained head (modules_to_save) and applies to the base
        assert model.config.sdt_config["modules_to_save"] == ["classifier"]
        assert all(p.requires_grad for p in model.classifier.parameters())


@pytest.mark.parametrize("script", ["finetune_clm.py", "pretrain_gpt.py"])
def test_causal_lm_recipes_run(tmp_path, script):
    root = Path(__file__).resolve().parents[1]
    tiny = ["--model_config", '{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}', "--max_steps", "2",
            "--tokenizer_vocab_size", "300", "--max_seq_length", "32", "--block_size", "16",
            "--train_files", "hf_sdt/data/persuasion_excerpt.txt", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    # pretrain_gpt.py runs demo.yaml's compute budget; one dense step of two is half of this tiny run's compute
    config = (
        [str(root / "recipes" / "configs" / "tiny.yaml")]
        if script == "finetune_clm.py"
        else ["--compute_budget", "0.95"]
    )
    result = subprocess.run(
        [sys.executable, str(root / "recipes" / script), *config, *tiny],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"eval_loss"' in result.stdout
    assert hf_sdt.sdt_layers(hf_sdt.from_pretrained(str(tmp_path / "out")))


def test_trl_sft_recipe_runs(tmp_path):
    pytest.importorskip("trl")
    root = Path(__file__).resolve().parents[1]
    save_tiny_llama(tmp_path / "model")
    flags = ["--model_name_or_path", str(tmp_path / "model"), "--train_file", "hf_sdt/data/persuasion_excerpt.txt",
             "--output_dir", str(tmp_path / "out"), "--max_steps", "8", "--per_device_train_batch_size", "4",
             "--max_length", "64", "--block_size", "16", "--selection_steps", "1", "--update_interval", "4",
             "--report_to", "none", "--use_cpu", "true"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(root / "recipes" / "sft_trl.py"), *flags],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Saved to" in result.stdout and "sdt_adapter.safetensors" in os.listdir(tmp_path / "out")
    model = hf_sdt.from_pretrained(str(tmp_path / "out"))
    assert all(layer.sdt_updates.abs().sum() > 0 for layer in hf_sdt.sdt_layers(model).values())
