"""Pre-train a small GPT from scratch with Sparse-Dynamic Training (sparse from the first step).

Defaults to recipes/configs/demo.yaml with `schedule=constant` (the from-scratch setting: density 0.25 at every
step, drop/grow updates choosing the pathways); any flag of `hf-sdt train` overrides it.

    python recipes/pretrain_gpt.py
    python recipes/pretrain_gpt.py --max_steps 1000 --density 0.1 --distribution erk
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/pretrain_gpt.py --use_cpu false
"""

import sys
from pathlib import Path

from hf_sdt.cli import main

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

if __name__ == "__main__":
    main(["train", str(CONFIG), "--schedule", "constant", "--output_dir", "out/pretrain-gpt-sdt", *sys.argv[1:]])
