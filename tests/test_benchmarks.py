"""The benchmark scripts run in seconds-long smoke modes (they are never imported, only run)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_blocked_cpu_benchmark_smoke(tmp_path):
    output = tmp_path / "table.md"
    run_script("benchmarks/bench_blocked_cpu.py", "--smoke", "--output", str(output))
    assert "speed-up (dense / SDT)" in output.read_text()


def test_gpu_kernel_benchmark_smoke_under_the_interpreter(tmp_path):
    output = tmp_path / "table.md"
    run_script("benchmarks/bench_kernels_gpu.py", "--smoke", "--output", str(output), env={"TRITON_INTERPRET": "1"})
    text = output.read_text()
    assert "rel. error Y" in text and "SDT Triton (ms)" in text


def test_update_overhead_benchmark_smoke(tmp_path):
    output = tmp_path / "table.md"
    run_script("benchmarks/bench_update_overhead.py", "--smoke", "--output", str(output))
    assert "topology changes" in output.read_text()


def test_quality_scratch_benchmark_smoke(tmp_path):
    output = tmp_path / "table.md"
    run_script("benchmarks/bench_quality_scratch.py", "--smoke", "--output", str(output))
    assert "iso-FLOP" in output.read_text()


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/install.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0
