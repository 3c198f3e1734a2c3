"""The benchmark scripts run in seconds-long smoke modes (they are never imported, only run)."""

import json
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
        ("bench_quality.py", {}, ["iso-FLOP", "gap to dense"]),
        ("bench_e2e_gpu.py", {}, ["tokens/s", "speed-up vs Trainer"]),
        ("bench_finetune.py", {}, ["gap to full", "trainable state", "lora (density 0.25)"]),
        ("bench_decode.py", {}, ["tokens/s", "| SDT 0.1 | 8 |"]),
        ("bench_train_step.py", {}, ["| SDT 0.1 |", "SDT-layer state"]),
        (
            "bench_pretrain.py",
            {},
            [
                "compute (FlopCounterMode)",
                "dense, 60% of the steps | 4 |",
                "dense, narrower (n_embd 16) for 60% | 6 |",  # widths in multiples of 8: below 32, the smoke's width
                "not run: SDTConf",
                "SDT, density planned, compute_budget 0.6 | 6 |",
            ],
        ),
    ],
)
def test_benchmark_smoke_mode_writes_its_report(tmp_path, script, env, expected):
    output = tmp_path / "report.md"
    run_script(script, "--smoke", "--output", str(output), env=env)
    text = output.read_text()
    assert all(phrase in text for phrase in expected) and f"Command: `python benchmarks/{script} --smoke" in text


def test_quality_report_json_is_plotted_and_reused_as_baseline(tmp_path):
    run_script("bench_quality.py", "--smoke", "--output", str(tmp_path / "quality.md"))
    runs = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert [row["dense"] for row in runs] == [True, False, True] and "sdt/linear_flops_saved" in runs[1]["runs"][0]
    plot = tmp_path / "quality.png"
    run_script("plot_quality.py", str(tmp_path / "quality.json"), "--output", str(plot))
    assert plot.read_bytes().startswith(b"\x89PNG")
    run_script(
        "bench_quality.py",
        "--smoke",
        "--baseline",
        str(tmp_path / "quality.json"),
        "--output",
        str(tmp_path / "again.md"),
    )
    rerun = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert rerun[0]["name"] == "dense (from quality.json)" and rerun[0]["runs"] == runs[0]["runs"]


@pytest.mark.parametrize(
    "variant,flags,low,high",
    [
        ("SDT, n_embd 48", "--n_embd 48", 0.2, 0.6 / 1.5),  # a 1.5x wider dense step costs over 1.5x the table's
        ("SDT, 7 steps", "--max_steps 7", 0.6 * 6 / 7, 0.6 * 6 / 7),  # one step more than the table's 6
    ],
)
def test_a_wider_or_longer_pretraining_variant_gets_the_tables_budget_in_its_own_dense_runs_terms(
    tmp_path, variant, flags, low, high
):
    output = tmp_path / "variant.md"
    run_script("bench_pretrain.py", "--smoke", "--no_baselines", "--variant", variant, flags, "--output", str(output))
    _, row = json.loads(output.with_suffix(".json").read_text())["rows"]
    assert row["name"] == f"{variant}, compute_budget 0.6"
    assert low - 1e-9 <= row["own_compute_budget"] <= high + 1e-9
    if "--max_steps" in flags:  # the longer run's receipt, counted against the table's 6-step dense run, is within 0.6
        line = next(line for line in output.read_text().splitlines() if line.startswith(f"| {row['name']} |"))
        steps, receipt = line.split("|")[2], line.split("|")[6]
        assert int(steps) == 7 and 0.4 < float(receipt.strip(" %")) / 100 <= 0.6


def run_script(script: str, *argv: str, env: dict | None = None) -> None:
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["benchmarks/gpu_check.sh", "scripts/install.sh", ".ci/run"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


def test_classification_benchmark_logs_each_run_and_reports_every_method(tmp_path):
    log, report = tmp_path / "runs.jsonl", tmp_path / "report.md"
    run_script("bench_finetune_classification.py", "--smoke", "--log", str(log))
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [run["method"] for run in runs] == [
        "untouched", "full", "lora", "shira", "updates_half", "updates", "updates_double"
    ]  # fmt: skip
    assert len({run["trainable"] for run in runs if run["method"] in ("lora", "shira")}) == 1, "equal budgets"
    levers = tmp_path / "levers.jsonl"  # a lever study's runs, reported beside the defaults' under their own label
    run_script("bench_finetune_classification.py", "--smoke", "--methods", "updates", "--sdt", '{"drop_fraction": 0}',
               "--log", str(levers))  # fmt: skip
    run_script("bench_finetune_classification.py", "--smoke", "--methods", "updates", "--block_size", "16", "8",
               "--log", str(levers))  # fmt: skip
    run_script("bench_finetune_classification.py", "--log", str(log), str(levers), "--report", str(report))
    text = report.read_text()
    assert "Chance: 16.7%; the untouched encoder with its fresh head" in text and "| updates_double |" in text
    assert "| updates (drop_fraction=0) |" in text and "| updates (blocks 16x8) |" in text


def test_probe_report_merges_the_seeds_of_rows_of_one_name_from_probe_logs_and_a_report(tmp_path):
    def row(name, seed, loss, flags="--learning_rate 3e-3", dense=True):
        metrics = {"seed": seed, "max_steps": 300, "eval_loss": loss, "train_runtime": 10.0, "flop_counter": 100,
                   "receipt_flops": 100, "dense_model_flops": 100}  # fmt: skip
        if not dense:
            metrics.update(flop_counter=15, receipt_flops=15, **{"sdt/density": 0.1, "sdt/train_flops_ratio": 0.15})
        return {"name": name, "dense": dense, "runs": [metrics], "flags": flags, "n_embd": 256, "setting": "probed"}

    table = tmp_path / "table.json"  # a bench_pretrain.py report's twin holds seed 0; the probe log seeds 1 and 2
    twin_rows = [row("dense", 0, 2.0), row("SDT", 0, 2.2, dense=False)]
    table.write_text(json.dumps({"setting": "tabled", "rows": twin_rows}))
    log = tmp_path / "probes.jsonl"
    log.write_text("".join(json.dumps(row(*args)) + "\n" for args in [("dense", 1, 2.2), ("dense", 2, 2.4),
                   ("SDT", 1, 2.4, "--learning_rate 3e-3", False), ("dense", 1, 9.9)]))  # fmt: skip
    output = tmp_path / "report.md"
    tabled = ["--log", str(table), "--log", str(log), "--report", str(output)]
    run_script("probe_pretrain.py", *tabled, "--rows", "dense", "SDT")
    text = output.read_text()
    assert "| tabled; probed (each row's own flags in the .json twin)" in text  # each file's setting, once
    assert "| dense | 300 | 1.000 | 2.2000 (2.0000, 2.2000, 2.4000) | +0.00% | 100.0% |" in text  # seed 1 logged first
    assert "| SDT | 300 | 0.100 | 2.3000 (2.2000, 2.4000) | +4.55% | 15.0% | 15.0% | not compared |" in text
    assert "wall time not compared: the runs were separate probes" in text
    rates = [row("dense", seed, 2.0, f"--learning_rate {seed}e-3") for seed in (1, 3)]
    log.write_text("".join(json.dumps(logged) + "\n" for logged in rates))
    with pytest.raises(AssertionError, match="ran different settings"):
        run_script("probe_pretrain.py", "--log", str(log), "--report", str(output), "--rows", "dense")
