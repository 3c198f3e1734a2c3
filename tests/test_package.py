"""The package's shape: no import circle between hf_sdt's modules, and `import hf_sdt` lazy for the Trainer, Hub
and card parts."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_sdt"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The hf_sdt modules (and names in them) that a module imports, at its top or inside its functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if target.startswith("hf_sdt"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("hf_sdt")}
    return found


def test_no_import_circle():
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}
    # A package's __init__ importing its own submodules is not a circle; a submodule importing back into it is.
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            if target.startswith(name + "."):
                continue
            assert state.get(target) != "open", f"import circle: {' -> '.join([*trail, name, target])}"
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_import_is_lazy_for_trainer_hub_and_card():
    lazy = ["transformers.trainer", "hf_sdt.trainer", "hf_sdt.hub", "hf_sdt.card", "matplotlib"]
    assert run_python(f"import sys, hf_sdt; print([m for m in {lazy!r} if m in sys.modules])") == "[]"
    modules = run_python("import hf_sdt; print(hf_sdt.SDTTrainer.__module__, hf_sdt.save_pretrained.__module__)")
    assert modules.split() == ["hf_sdt.trainer", "hf_sdt.hub"]


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
