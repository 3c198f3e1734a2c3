"""Fine-tune a causal language model with Sparse-Dynamic Training: run_clm with SDTTrainer in place of Trainer.

Every flag is transformers' own (TrainingArguments), plus the data/model flags of run_clm and one flag per
SDTConfig field; a YAML file may hold any of them, and flags after it override it.

    python recipes/finetune_clm.py recipes/configs/smollm2_austen.yaml
    python recipes/finetune_clm.py --model_name_or_path models/smollm2-135m \
        --train_files hf_sdt/data/pride_and_prejudice.txt --output_dir out/ft --max_steps 200 \
        --density 0.25 --block_size 64 --prune_criterion wanda
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/finetune_clm.py \
        recipes/configs/smollm2_austen.yaml --use_cpu false --bf16 true
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no recipes/finetune_clm.py recipes/configs/tiny.yaml
"""

import sys

from hf_sdt.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
