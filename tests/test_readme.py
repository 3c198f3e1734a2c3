"""The Python blocks of the README and of each page in docs/ run, each page in order as one script: on a tiny Llama
saved where they say "path/to/model", for 6 steps instead of their hundreds, and against a local Hub."""

import os
import re
from pathlib import Path

from sdt_helpers import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)


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
