"""The `hf-sdt` command: `demo` (the built-in main job), `train`, `summary` and `push`.

hf-sdt demo                                   # SDT vs dense on a public-domain novel, a few minutes on a CPU
hf-sdt train recipes/configs/tiny.yaml --density 0.1 --max_steps 50
accelerate launch -m hf_sdt.cli train recipes/configs/tiny.yaml     # the same under accelerate (DDP)
hf-sdt summary out/sdt                        # per-layer density table of a checkpoint (folder or Hub id)
hf-sdt push out/sdt me/sparse-model           # upload with the SDT model card
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .arguments import build_train_parser, parse_train_args
from .training import end_distributed, is_main_process, run_training


def _train(argv: list[str]) -> None:
    if "--help-all" in argv:
        build_train_parser(show_all=True).print_help()
        return
    model_args, data_args, training_args, sdt_config = parse_train_args(argv)
    try:
        metrics = run_training(model_args, data_args, training_args, sdt_config)
        if is_main_process():
            print(json.dumps(metrics, indent=2, sort_keys=True))
            folder = os.path.abspath(training_args.output_dir)
            saved = ", ".join(sorted(name for name in os.listdir(folder) if name.endswith(".safetensors")))
            print(f"Saved to {folder} ({saved})")
    finally:
        end_distributed()


def _summary(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-sdt summary", description="Per-layer density table of a checkpoint.")
    parser.add_argument("path_or_repo")
    args = parser.parse_args(argv)
    from .hub import from_pretrained
    from .model import print_sparsity_summary

    print_sparsity_summary(from_pretrained(args.path_or_repo))


def _push(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-sdt push", description="Upload an SDT checkpoint with its card.")
    parser.add_argument("path")
    parser.add_argument("repo_id")
    parser.add_argument("--packed", action="store_true", help="upload the packed format (hf_sdt only)")
    parser.add_argument("--format", choices=("sdt", "peft"), default="sdt",
                        help="peft: an updates-mode adapter in PEFT's SHiRA format (stock peft loads it)")  # fmt: skip
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--base_model", default=None)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from .hub import from_pretrained, push_to_hub

    model = from_pretrained(args.path)
    tokenizer = AutoTokenizer.from_pretrained(args.path) if os.path.isfile(f"{args.path}/tokenizer.json") else None
    info = push_to_hub(
        model, args.repo_id, packed=args.packed, processing_class=tokenizer, private=args.private,
        base_model=args.base_model, format=args.format,
    )  # fmt: skip
    print(f"Pushed to {info}")


def _demo(argv: list[str]) -> None:
    from .demo import main as demo_main

    demo_main(argv)


COMMANDS = {"demo": _demo, "train": _train, "summary": _summary, "push": _push}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] in ("-h", "--help"):
            raise SystemExit(0)
        known = ", ".join(COMMANDS)
        raise SystemExit(f"hf-sdt: unknown command {argv[0]!r}; use one of {known}." if argv else 2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except (FileNotFoundError, ValueError, OSError) as error:
        raise SystemExit(f"hf-sdt {argv[0]}: {error}") from error


if __name__ == "__main__":
    main()
