#!/usr/bin/env bash
# Everything GPU-related, in one call of at most 8 minutes on the lent GPU machine (see the brief):
#   1. the kernel, functional and layer tests on the GPU (real Triton kernels, bf16 included: the products on a
#      dense weight and on a compact block store, and the compact weight-gradient kernel of both modes);
#   2. benchmarks/bench_kernels_gpu.py: bf16 correctness on large shapes, then the fwd+bwd timing table against
#      cuBLAS and PyTorch's BSR kernels, written to $OUT (or benchmarks/results/) with the GPU name and date;
#   3. benchmarks/bench_e2e_gpu.py: SDTTrainer vs Trainer tokens/s and peak memory on a 1.1B Llama-style model, bf16:
#      weights mode vs dense, and fine-tuning (full vs LoRA vs SDT updates mode at equal trainable parameters);
#   4. benchmarks/bench_decode.py: greedy generate tokens/s, SDT at 0.5 / 0.25 / 0.1 vs dense, SmolLM2-135M shape.
# The machine's own python3 already has torch, triton and transformers; hf_sdt is installed without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -m pip install -q --no-deps --no-build-isolation -e .
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_functional.py tests/test_layer.py \
  2>&1 | tee "$results/gpu_tests.log"
python3 benchmarks/bench_kernels_gpu.py --output "$results/gpu_kernels_$(date +%F).md" 2>&1 \
  | tee "$results/gpu_kernels.log"
python3 benchmarks/bench_e2e_gpu.py --output "$results/gpu_e2e_$(date +%F).md" 2>&1 | tee "$results/gpu_e2e.log"
python3 benchmarks/bench_decode.py --device cuda --repeats 2 --output "$results/gpu_decode_$(date +%F).md" 2>&1 \
  | tee "$results/gpu_decode.log"
