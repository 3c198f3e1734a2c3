import subprocess
import sys
from pathlib import Path

import pytest

from hf_sdt import SDTConfig
from hf_sdt.arguments import parse_train_args
from hf_sdt.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "configs" / "tiny.yaml")


def test_yaml_then_flags_with_the_usual_names():
    model_args, data_args, training_args, sdt = parse_train_args(
        [TINY, "--density", "0.1", "--learning_rate", "5e-4", "--target_modules", "c_attn", "c_fc", "--seed", "3"]
    )
    assert model_args.model_config and '"n_layer": 2' in model_args.model_config
    assert data_args.max_seq_length == 64 and training_args.learning_rate == 5e-4
    assert sdt == SDTConfig(density=0.1, block_size=16, update_interval=2, target_modules=["c_attn", "c_fc"], seed=3)


def test_target_modules_forms_and_dense_baseline():
    _, _, _, sdt = parse_train_args([TINY, "--target_modules", r".*\.mlp\..*", "--block_size", "16", "32"])
    assert sdt.target_modules == r".*\.mlp\..*" and sdt.block_shape == (16, 32)
    _, _, _, sdt = parse_train_args([TINY, "--target_modules", "all-linear"])
    assert sdt.target_modules == "all-linear"
    assert parse_train_args([TINY, "--dense"])[3] is None
    assert parse_train_args([TINY, "--compute_budget", "0.15"])[3].compute_budget == 0.15


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("densty: 0.5\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['densty'\]"):
        parse_train_args([str(config)])


def test_newcomer_errors_are_clear(tmp_path, capsys):
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="density"):
        main(["train", TINY, "--density", "2"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["train", TINY, "--train_files", str(tmp_path / "nothing.txt")])
    with pytest.raises(SystemExit, match="local folder"):
        main(["train", TINY, "--model_name_or_path", "nobody/not-a-model", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"fine-tunes a pretrained model.*--model_name_or_path"):
        main(["train", TINY, "--mode", "updates", "--output_dir", str(tmp_path / "scratch")])
    assert not (tmp_path / "scratch").exists(), "refused before training"
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2 and "hf-sdt demo" in capsys.readouterr().out


def run_cli(*args, cwd=ROOT, env=None, launcher=()):
    result = subprocess.run([*launcher, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_train_then_summary_through_the_console_script(tmp_path):
    out = tmp_path / "tiny"
    printed = run_cli(sys.executable, "-m", "hf_sdt.cli", "train", TINY, "--output_dir", str(out))
    assert '"eval_loss"' in printed and '"sdt/density"' in printed
    assert f"Saved to {out} (model.safetensors, sdt_masks.safetensors)" in printed
    summary = run_cli(sys.executable, "-m", "hf_sdt.cli", "summary", str(out))
    assert "transformer.h.1.mlp.c_proj" in summary and "8 SDT layers" in summary
    assert (out / "README.md").is_file() and (out / "sdt_masks.png").is_file()


@pytest.mark.slow
def test_train_under_two_cpu_processes(tmp_path):
    from sdt_helpers import two_cpu_processes

    launcher, env = two_cpu_processes()
    out = tmp_path / "ddp"
    run_cli("-m", "hf_sdt.cli", "train", TINY, "--output_dir", str(out), launcher=launcher, env=env)
    summary = run_cli(sys.executable, "-m", "hf_sdt.cli", "summary", str(out))
    assert "8 SDT layers" in summary


def test_push_uploads_with_the_card(tmp_path, hub_server):
    out = tmp_path / "tiny"
    main(["train", TINY, "--output_dir", str(out), "--max_steps", "2"])
    main(["push", str(out), "test-user/cli-push"])
    _, files = hub_server.files("test-user/cli-push")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "sdt_density.png"} <= set(files)


def test_an_unknown_command_is_named(capsys):
    with pytest.raises(SystemExit, match="unknown command 'bogus'; use one of demo, train, summary, push"):
        main(["bogus"])


def test_train_help_is_short_and_shows_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    short = capsys.readouterr().out
    assert len(short.splitlines()) < 200 and "--help-all" in short
    assert "(default: None)" not in short.split("SDT (see hf_sdt.SDTConfig)")[1]
    assert "(default: 0.3)" in short and "(default: cubic)" in short and "--learning_rate" in short
    assert "default 64 in weights mode, 16 in updates mode" in " ".join(short.split())  # a mode's default
    assert "--adam_beta1" not in short
    main(["train", "--help-all"])
    assert "--adam_beta1" in capsys.readouterr().out
