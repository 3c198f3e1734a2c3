"""Greedy `generate` tokens/s of an SDT model (weights mode) against the same model dense, side by side.

A SmolLM2-135M-shaped Llama (from its config, random weights, tied embeddings: the 49152 x 576 output layer stays
dense) generates `--new-tokens` tokens after a 32-token prompt, at batch 1 and 8; the SDT copies are the dense model
converted at each density with 64 x 64 blocks (`schedule="constant"`, all linear layers of the blocks), and one more
that keeps one block per layer: what generation costs when the SDT layers do (almost) no work, the bound on what any
density can gain. The runs alternate in one process (dense, SDT 0.5, 0.25, 0.1, the one-block model, then again),
and each row reports the median of `--repeats`.
With `--compile`, each model's forward is also compiled (`torch.compile`, inductor, into a fresh cache directory)
and timed after a warm-up generation of 8 tokens; the warm-up's time, compilation included, has its own column.

    python benchmarks/bench_decode.py --output benchmarks/results/decode_cpu.md   # the issue's table (CPU)
    python benchmarks/bench_decode.py --compile --batches 1 --new-tokens 32 --repeats 2 \
        --output benchmarks/results/decode_cpu_compiled.md                        # also compiled (CPU), batch 1
    python benchmarks/bench_decode.py --compile --batches 8 --new-tokens 32 --repeats 2 \
        --output benchmarks/results/decode_cpu_compiled_batch8.md                 # and batch 8
    python benchmarks/bench_decode.py --device cuda                               # on a GPU (gpu_check.sh)
    python benchmarks/bench_decode.py --smoke                                     # seconds-long check of the script

Compiled on the CPU, one batch size per run: a run with batches 1 and 8 together had not finished after 40 minutes
(every model compiles a few graphs per batch size: the prompt, then one token, recompiled once more when the key/value
cache changes its strides after the first step); batch 8 alone took about 30 minutes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
from benchmark_report import finish_report
from transformers import LlamaConfig, LlamaForCausalLM

from hf_sdt import SDTConfig, get_sdt_model

SMOLLM2_135M = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip
SMOKE = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True,
}  # fmt: skip
DENSITIES = (0.5, 0.25, 0.1)
FLOOR = "SDT 1 block/layer"
ONE_BLOCK = 1e-9  # max(1, round(density * blocks)) = 1 block per layer
PROMPT_TOKENS = 32


def density_of(name: str) -> float | None:
    """The density of a model row: "dense" (None), "SDT 0.25", or the one-block floor."""
    return None if name == "dense" else ONE_BLOCK if name == FLOOR else float(name.split()[1])


def convert(model: torch.nn.Module, density: float, **overrides) -> tuple[torch.nn.Module, SDTConfig]:
    """`model` converted with SDT at `density` (64 x 64 blocks, constant schedule, so compact storage; `overrides`
    for other SDTConfig fields), and its config."""
    config = SDTConfig(density=density, block_size=64, schedule="constant", **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the floor's density rounds up to one block per layer, as meant
        return get_sdt_model(model, config), config


def build_models(shape: dict, densities, compile_models: bool, device: str) -> dict[str, torch.nn.Module]:
    """The dense model and its SDT copies, by name ("dense", "SDT 0.5", ..., the floor), each eager and, if asked,
    compiled."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**shape)).to(device).eval()
    models = {"dense": dense}
    for name in [*(f"SDT {density}" for density in densities), FLOOR]:
        models[name] = convert(copy.deepcopy(dense), density_of(name))[0].eval()
    if compile_models:
        # All models share one compiled code object (the model class's forward), each with its own graphs (prompt,
        # then one token, per batch size): more than dynamo's default limit of 8, past which it runs them eagerly.
        torch._dynamo.config.recompile_limit = 64
        for name, model in list(models.items()):
            compiled = copy.copy(model)  # the same modules and weights, its own forward
            compiled.forward = torch.compile(model.forward)
            models[f"{name} (compiled)"] = compiled
    return models


def time_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    if prompt.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def measure(models: dict, batch: int, new_tokens: int, repeats: int, vocab: int, device: str) -> list[dict]:
    prompt = torch.randint(vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch)).to(device)
    warm_up = {name: time_generate(model, prompt, min(new_tokens, 8)) for name, model in models.items()}  # compiles
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name].append(time_generate(model, prompt, new_tokens))
    rows = []
    for name, samples in times.items():
        seconds = statistics.median(samples)
        baseline = statistics.median(times["dense (compiled)" if "compiled" in name else "dense"])
        rows.append({
            "model": name, "batch": batch, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": batch * new_tokens / seconds, "speedup_vs_dense": baseline / seconds,
            "warm_up_seconds": warm_up[name],
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the Triton kernels; gpu_check.sh)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few tokens: checks the script")
    parser.add_argument("--output", default=None, help="write the Markdown table here (and a .json beside it)")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else SMOLLM2_135M
    if args.compile:  # compilation starts cold, as in a fresh environment; the directory goes when the script ends
        cache = tempfile.TemporaryDirectory(prefix="bench_decode_inductor_", ignore_cleanup_errors=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    new_tokens, repeats = (4, 1) if args.smoke else (args.new_tokens, args.repeats)
    models = build_models(shape, DENSITIES, args.compile, args.device)
    rows = [
        row
        for batch in args.batches
        for row in measure(models, batch, new_tokens, repeats, shape["vocab_size"], args.device)
    ]
    cpu = f"{platform.machine()}, {torch.get_num_threads()} threads"
    machine = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    lines = [
        f"# Greedy generate, SDT (weights mode, 64 x 64 blocks) vs dense, {'smoke' if args.smoke else 'SmolLM2-135M'}"
        " shape",
        "",
        f"{datetime.date.today()}, {machine}, torch {torch.__version__}, fp32; {PROMPT_TOKENS}-token prompt, "
        f"{new_tokens} new tokens, median of {repeats}.",
        "",
        "| model | batch | seconds | tokens/s | speed-up vs dense | warm-up s (compilation included) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['model']} | {row['batch']} | {row['seconds']:.2f} | {row['tokens_per_second']:.1f} | "
        f"{row['speedup_vs_dense']:.2f}x | {row['warm_up_seconds']:.1f} |"
        for row in rows
    ]
    finish_report(lines, args.output)
    if args.output:
        with open(os.path.splitext(args.output)[0] + ".json", "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
