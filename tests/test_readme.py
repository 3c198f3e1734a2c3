"""The Python blocks of the README and of each page in docs/ run, each page in order as one script: on a tiny Llama
saved where they say "path/to/model", for 6 steps instead of their hundreds, and against a local Hub."""

import os
import re
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

from hf_sdt.training import ModelArguments, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)


def save_tiny_llama(folder: Path) -> None:
    texts = (ROOT / "hf_sdt" / "data" / "persuasion_excerpt.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = build_tokenizer(ModelArguments(tokenizer_vocab_size=512), texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_the_readme_python_blocks_run_in_order(tmp_path, monkeypatch, hub_server):
    assert len([block for page in PAGES for block in python_blocks(page)]) >= 4
    save_tiny_llama(tmp_path / "model")
    os.symlink(ROOT / "hf_sdt", tmp_path / "hf_sdt")  # the blocks' data paths are relative to the repository
    monkeypatch.chdir(tmp_path)
    for page in PAGES:
        namespace: dict = {}
        for number, block in enumerate(python_blocks(page), 1):
            code = re.sub(r"max_steps=\d+", "max_steps=6", block.replace("path/to/model", str(tmp_path / "model")))
            exec(compile(code, f"{page.relative_to(ROOT)} python block {number}", "exec"), namespace)
    assert "me/sparse-model" in hub_server.repos
