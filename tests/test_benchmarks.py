"""The benchmark scripts run in seconds-long smoke modes (they are never imported, only run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,env,expected",
    [
        ("bench_blocked_cpu.py", {}, ["speed-up (dense / SDT)"]),
        ("bench_kernels_gpu.py", {"TRITON_INTERPRET": "1"}, ["rel. error Y", "SDT Triton (ms)"]),
        ("bench_update_overhead.py", {}, ["topology changes"]),
        ("bench_quality_scratch.py", {}, ["iso-FLOP"]),
    ],
)
def test_benchmark_smoke_mode_writes_its_report(tmp_path, script, env, expected):
    output = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = output.read_text()
    assert all(phrase in text for phrase in expected) and f"Command: `python benchmarks/{script} --smoke" in text


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/install.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
