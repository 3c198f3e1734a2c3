"""Pre-train a small GPT from scratch with Sparse-Dynamic Training at a compute budget.

Defaults to recipes/configs/demo.yaml: 30% of the dense run's whole-model training FLOPs (`compute_budget: 0.3`) at
the highest density that budget affords, which the planner chooses on the first step (docs/training.md, "A compute
budget"); drop/grow updates choose the pathways. Any flag of `hf-sdt train` overrides it.

    python recipes/pretrain_gpt.py
    python recipes/pretrain_gpt.py --max_steps 1000 --compute_budget 0.15 --block_size 32
    python recipes/pretrain_gpt.py --max_steps 1000 --density 0.1   # the planner fits the schedule to this density
    accelerate launch --config_file recipes/accelerate/single_gpu.yaml recipes/pretrain_gpt.py --use_cpu false
"""

import sys
from pathlib import Path

from hf_sdt.cli import main

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"

if __name__ == "__main__":
    main(["train", str(CONFIG), "--output_dir", "out/pretrain-gpt-sdt", *sys.argv[1:]])
