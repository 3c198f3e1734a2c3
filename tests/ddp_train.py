"""Worker for the 2-process test: `accelerate launch ... tests/ddp_train.py OUTPUT_DIR BATCH_SIZE MODE`."""

import sys

from sdt_helpers import train_and_save_state

from hf_sdt.training import end_distributed

if __name__ == "__main__":
    train_and_save_state(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    end_distributed()
