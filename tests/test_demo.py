import re

import pytest

from hf_sdt import demo, from_pretrained, sdt_layers


def test_demo_code_path_reports_the_runs_own_metrics(tmp_path, monkeypatch):
    runs = {}
    original = demo.run_training

    def recording(*args):
        metrics = original(*args)
        runs["sdt" if args[3] is not None else "dense"] = metrics
        return metrics

    monkeypatch.setattr(demo, "run_training", recording)
    tiny_gpt = '{"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}'
    overrides = [
        *("--max_steps", "4", "--model_config", tiny_gpt, "--max_seq_length", "32", "--tokenizer_vocab_size", "300"),
        *("--update_interval", "2", "--block_size", "16", "--logging_steps", "2", "--compute_budget", "0.8"),
        *("--train_files", "hf_sdt/data/persuasion_excerpt.txt"),
    ]
    table = demo.main(["--output_dir", str(tmp_path), *overrides])
    dense, sdt = runs["dense"], runs["sdt"]
    assert f"{dense['eval_loss']:.4f}" in table and f"{sdt['eval_loss']:.4f}" in table
    assert f"{sdt['perplexity']:.2f}" in table and f"{1 - sdt['sdt/linear_flops_saved']:.1%}" in table
    assert re.search(rf"whole-model training FLOPs.*100%\s+{sdt['sdt/train_flops_ratio']:.1%}", table)
    assert re.search(rf"final density.*1\.000\s+{sdt['sdt/density']:.3f}", table)
    assert (tmp_path / "results.md").read_text().startswith("```\n" + table)
    model = from_pretrained(str(tmp_path / "sdt"))
    assert sdt_layers(model)
    assert (tmp_path / "sdt" / "README.md").is_file() and (tmp_path / "sdt" / "sdt_density.png").is_file()


def test_demo_help_shows_its_options_and_starts_nothing(capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_training", lambda *args: pytest.fail("--help started a training run"))
    with pytest.raises(SystemExit) as done:
        demo.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "usage: hf-sdt demo" in out and "--max_steps" in out and "--output_dir" in out
    assert "--compute_budget" in out
    assert "=== dense run ===" not in out
