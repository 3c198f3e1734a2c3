"""Worker for the 2-process tests: `accelerate launch ... tests/ddp_train.py OUTPUT_DIR BATCH_SIZE MODE` (MODE
"sft-updates" or "sft-weights": TRL's SFTTrainer with SDT)."""

import sys

from sdt_helpers import train_and_save_state, train_sft_and_save_state

from hf_sdt.training import end_distributed

if __name__ == "__main__":
    if sys.argv[3].startswith("sft-"):
        train_sft_and_save_state(sys.argv[1], sys.argv[3].removeprefix("sft-"))
    else:
        train_and_save_state(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    end_distributed()
