"""Correctness and speed of the Triton block-sparse kernels on a GPU, against cuBLAS and PyTorch's BSR kernels.

1. Correctness at bf16 on large shapes: forward, dX and dW of the Triton backend against the masked-dense
   reference computed in fp32 from the same bf16 inputs (relative Frobenius error, NaN never passes).
2. Forward+backward time (CUDA events, warm-up, median, inputs rotated among several sets) for each
   (tokens, in -> out, block, density) of SDT's Triton backend, of dense `F.linear` (cuBLAS), and of PyTorch's
   own Triton BSR kernels (`bsr_dense_mm` for Y and dX, `sampled_addmm` for dW) where they run.

    python benchmarks/bench_kernels_gpu.py --output benchmarks/results/gpu_kernels.md   # the issue's grid
    TRITON_INTERPRET=1 python benchmarks/bench_kernels_gpu.py --smoke                   # CPU: checks the script
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from benchmark_report import finish_report

from hf_sdt.functional import reference_linear, sdt_linear
from hf_sdt.masks import active_block_count, expand_block_mask, topk_block_mask

FULL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)


def random_mask(out_features: int, in_features: int, block: int, density: float, device) -> torch.Tensor:
    grid = (-(-out_features // block), -(-in_features // block))
    scores = torch.rand(grid, generator=torch.Generator().manual_seed(0))
    return topk_block_mask(scores, active_block_count(density, scores.numel())).to(device)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check_correctness(tokens, in_features, out_features, block, density, dtype, device) -> dict:
    mask = random_mask(out_features, in_features, block, density, device)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, out_features, device=device, dtype=dtype)
    out = sdt_linear(x, weight, None, mask, (block, block), "triton")
    grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad_out)
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = reference_linear(x32, w32, None, mask, (block, block))
    ref_x, ref_w = torch.autograd.grad(ref, (x32, w32), grad_out.float())
    errors = {"Y": relative_error(out, ref), "dX": relative_error(grad_x, ref_x), "dW": relative_error(grad_w, ref_w)}
    return {"shape": f"{tokens} x {in_features} -> {out_features}", "block": block, "density": density, **errors}


def median_ms(step, inputs, warmup: int, repeats: int, device) -> float:
    """Median time of `step(*inputs[i])` over rotating input sets; CUDA events on a GPU, host clock otherwise."""
    for i in range(warmup):
        step(*inputs[i % len(inputs)])
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            step(*args)
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def time_row(tokens, in_features, out_features, block, density, dtype, device, warmup, repeats, rotations) -> dict:
    mask = random_mask(out_features, in_features, block, density, device)
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype) * 0.02
    weight.requires_grad_()
    inputs = [
        (
            torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True),
            torch.randn(tokens, out_features, device=device, dtype=dtype),
        )
        for _ in range(rotations)
    ]

    def dense_step(x, grad_out):
        torch.autograd.grad(F.linear(x, weight), (x, weight), grad_out)

    def sdt_step(x, grad_out):
        torch.autograd.grad(sdt_linear(x, weight, None, mask, (block, block), "triton"), (x, weight), grad_out)

    row = {
        "shape": f"{tokens} x {in_features} -> {out_features}",
        "block": block,
        "density": density,
        "dense_ms": median_ms(dense_step, inputs, warmup, repeats, device),
        "sdt_ms": median_ms(sdt_step, inputs, warmup, repeats, device),
    }
    row["bsr_ms"] = torch_bsr_ms(weight.detach(), mask, block, inputs, warmup, repeats, device)
    return row


def torch_bsr_ms(weight, mask, block, inputs, warmup, repeats, device):
    """PyTorch's own Triton BSR kernels for the same three products, or the reason they did not run."""
    try:
        from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm

        # The BSR pattern of the masked weight holds exactly the active blocks (random weights: none is all-zero).
        masked = weight * expand_block_mask(mask, (block, block), tuple(weight.shape))
        weight_bsr = masked.to_sparse_bsr((block, block))  # Y^T = W X^T
        weight_t_bsr = masked.t().contiguous().to_sparse_bsr((block, block))  # dX^T = W^T dY^T
        if weight_bsr._nnz() != int(mask.sum()):
            return "the BSR conversion dropped an active block"

        def step(x, grad_out):
            bsr_dense_mm(weight_bsr, x.detach().t())  # (out, T)
            bsr_dense_mm(weight_t_bsr, grad_out.t())  # (in, T)
            sampled_addmm(weight_bsr, grad_out.t(), x.detach(), beta=0.0)  # dW at the active blocks

        return median_ms(step, inputs, warmup, repeats, device)
    except Exception as error:  # report, never hide, why the peer did not run
        return f"did not run: {type(error).__name__}: {str(error).splitlines()[0][:80]}"


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| shape | block | density | cuBLAS fwd+bwd (ms) | SDT Triton (ms) | speed-up vs cuBLAS | torch BSR (ms) | "
        "SDT vs torch BSR |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        bsr = row["bsr_ms"]
        bsr_cells = f"{bsr:.3f} | {bsr / row['sdt_ms']:.2f}x" if isinstance(bsr, float) else f"{bsr} | n/a"
        lines.append(
            f"| {row['shape']} | {row['block']} | {row['density']} | {row['dense_ms']:.3f} | {row['sdt_ms']:.3f} | "
            f"{row['dense_ms'] / row['sdt_ms']:.2f}x | {bsr_cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", help="write the report as markdown to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: checks that the script runs")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("No GPU here: run with TRITON_INTERPRET=1 and --smoke to check the script on a CPU.")
    shapes = FULL_SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter cannot load bf16
    if args.smoke:
        args.tokens, shapes, args.blocks, args.densities = 64, [(96, 80)], [16], [1.0, 0.25]
        args.warmup, args.repeats = 1, 2
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    header = (
        f"{datetime.date.today()} | {gpu} | torch {torch.__version__} | "
        f"triton {triton.__version__} | {dtype} | median of {args.repeats} after {args.warmup} warm-up"
    )
    print(header, flush=True)

    checks = [
        check_correctness(args.tokens, shapes[0][0], shapes[0][1], block, density, dtype, device)
        for block in args.blocks
        for density in (1.0, 0.25)
    ]
    check_lines = ["| shape | block | density | rel. error Y | dX | dW |", "|---|---:|---:|---:|---:|---:|"]
    check_lines += [
        f"| {c['shape']} | {c['block']} | {c['density']} | {c['Y']:.2e} | {c['dX']:.2e} | {c['dW']:.2e} |"
        for c in checks
    ]
    print("\n".join(check_lines), flush=True)
    failed = [c for c in checks if not all(c[k] < 2e-2 for k in ("Y", "dX", "dW"))]  # NaN compares False

    rows = []
    for in_features, out_features in shapes:
        for block in args.blocks:
            for density in args.densities:
                rows.append(
                    time_row(
                        args.tokens, in_features, out_features, block, density, dtype, device,
                        args.warmup, args.repeats, rotations=3,
                    )
                )  # fmt: skip
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    report = [header, "", f"Correctness ({dtype} inputs, fp32 reference):", "", *check_lines, "", format_rows(rows)]
    finish_report(report, args.output)
    if failed:
        sys.exit(f"Correctness check failed: {failed}")


if __name__ == "__main__":
    main()
