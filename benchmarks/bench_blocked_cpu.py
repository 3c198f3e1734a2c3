"""Forward+backward time of `SDTLinear` (blocked PyTorch backend) against dense `nn.Linear`, side by side.

Each row times the dense layer and the SDT layer alternately in the same process on the same input, and reports
the ratio of their median times (dense / SDT, so > 1 means SDT is faster). Masks are the layer's own initial mask
(largest-norm blocks of a random weight), so block-rows hold unequal numbers of blocks, as in training.

    python benchmarks/bench_blocked_cpu.py                       # the issue's table: 2048 tokens, 4096 -> 4096, fp32
    python benchmarks/bench_blocked_cpu.py --fallback-sweep      # also: where the blocked path stops paying
    python benchmarks/bench_blocked_cpu.py --smoke               # seconds-long check of the script itself
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
from benchmark_report import finish_report
from torch import nn

from hf_sdt import SDTLinear, functional
from hf_sdt.functional import dispatch
from hf_sdt.masks import active_block_count, block_norms, topk_block_mask


def time_fwd_bwd(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return elapsed


def measure(tokens: int, features: int, block: int, density: float, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = nn.Linear(features, features, bias=False)
    base = nn.Linear(features, features, bias=False)
    scores = block_norms(base.weight, (block, block))
    mask = topk_block_mask(scores, active_block_count(density, scores.numel()))
    sparse = SDTLinear(base, (block, block), mask, backend="torch")
    x = torch.randn(tokens, features, requires_grad=True)
    grad = torch.randn(tokens, features)
    dense_times, sparse_times = [], []
    time_fwd_bwd(dense, x, grad), time_fwd_bwd(sparse, x, grad)  # warm-up
    for _ in range(repeats):
        dense_times.append(time_fwd_bwd(dense, x, grad))
        sparse_times.append(time_fwd_bwd(sparse, x, grad))
    dense_s, sparse_s = statistics.median(dense_times), statistics.median(sparse_times)
    return {
        "block": block,
        "density": sparse.density,
        "dense_ms": dense_s * 1e3,
        "sdt_ms": sparse_s * 1e3,
        "speedup": dense_s / sparse_s,
        "path": "blocked" if functional.blocked_path_pays(sparse.layout("torch"), tokens, (block, block)) else "dense",
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def format_table(rows: list[dict]) -> str:
    lines = [
        "| block | density | dense fwd+bwd (ms) | SDT fwd+bwd (ms) | speed-up (dense / SDT) | path |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['block']} | {row['density']:.3f} | {row['dense_ms']:.1f} | {row['sdt_ms']:.1f} | "
            f"{row['speedup']:.2f}x | {row['path']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--fallback-sweep",
        action="store_true",
        help="also time the blocked path, forced, at --sweep-densities to find where it stops paying",
    )
    parser.add_argument("--sweep-densities", type=float, nargs="+", default=[0.45, 0.55, 0.65, 0.75, 0.85, 1.0])
    parser.add_argument("--output", help="write the tables as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.features, args.blocks, args.densities, args.repeats = 64, 128, [32], [0.5], 1

    header = (
        f"{datetime.date.today()} | {cpu_name()} | {os.cpu_count()} CPUs | "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) | fp32 | "
        f"{args.tokens} tokens x {args.features} -> {args.features}, bias-free, median of {args.repeats}"
    )
    print(header, flush=True)
    rows = []
    for block in args.blocks:
        for density in args.densities:
            rows.append(measure(args.tokens, args.features, block, density, args.repeats))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    report = [header, "", format_table(rows)]
    if args.fallback_sweep:
        dispatch_rule = dispatch.blocked_path_pays
        dispatch.blocked_path_pays = lambda layout, tokens, block: True  # force the blocked path
        sweep = []
        for block in args.blocks:
            for density in args.sweep_densities:
                row = measure(args.tokens, args.features, block, density, args.repeats)
                sweep.append({**row, "path": "blocked (forced)"})
                print(format_table(sweep[-1:]).splitlines()[-1], flush=True)
        dispatch.blocked_path_pays = dispatch_rule
        report += [
            "",
            "Blocked path forced (the dispatch rule of hf_sdt.functional off), to see where it stops paying:",
            "",
            format_table(sweep),
        ]
    finish_report(report, args.output)


if __name__ == "__main__":
    main()
