"""Worker for the FSDP2 test: `python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py OUTPUT_DIR`,
with the `FSDP_*` variables `accelerate launch` sets for recipes/accelerate/fsdp2.yaml.

Runs under FSDP2 on CPU processes (gloo), in both modes: the plain-loop run of `sdt_helpers.train_with_controller`
(each rank saves its gathered state dict, whether its own shards are zero outside the masks, and the logits of two
sequences; the model is saved with `hf_sdt.save_pretrained`), and `SDTTrainer` for 12 steps with a checkpoint at
step 6, then resumed from that checkpoint (each rank saves both final state dicts); with TRL installed, TRL's
SFTTrainer with SDT in updates mode (each rank saves its final state dict). First, models converted with different
seeds on the two ranks must be refused.
"""

import importlib.util
import os
import sys

import torch
import torch.distributed as dist
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from sdt_helpers import controller_config, make_config, sft_trainer, tiny_gpt2, train_with_controller, training_args

import hf_sdt
from hf_sdt.blocks import zero_inactive_blocks_
from hf_sdt.demo_data import ByteChunks
from hf_sdt.sharding import full_state_dict
from hf_sdt.trainer import SDTTrainer


class FSDPOnCPU:
    """`accelerate launch` with an FSDP config falls back to DDP on CPUs: set the accelerator to FSDP2 as that config
    does on GPUs, with the plugin its `FSDP_*` variables (in this process's environment) describe."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.is_fsdp_enabled = True


class FSDPOnCPUTrainer(FSDPOnCPU, SDTTrainer):
    pass


def shards_zero_outside_masks(model) -> bool:
    """Weights mode: whether every weight shard of this process is exactly zero outside its mask (compact storage
    holds nothing outside it)."""
    for layer in hf_sdt.sdt_layers(model).values():
        if isinstance(layer, hf_sdt.SDTCompactLinear):
            continue
        local, offset = layer.local_out_in(layer.weight)
        if not torch.equal(
            zero_inactive_blocks_(local.detach().clone(), layer.sdt_mask, layer.block_size, offset), local
        ):
            return False
    return True


def different_topologies_are_refused(rank: int) -> bool:
    """Processes whose models hold different masks must not start training."""
    model = hf_sdt.get_sdt_model(tiny_gpt2(), make_config())
    next(iter(hf_sdt.sdt_layers(model).values())).sdt_mask[0, 0] ^= rank == 1
    try:
        hf_sdt.SDTController(model, make_config(), 12)
    except RuntimeError as error:
        return "different block masks" in str(error)
    return False


def train_with_trainer(mode: str, output_dir: str, resume: bool) -> dict[str, torch.Tensor]:
    args = training_args(output_dir, max_steps=12, per_device_train_batch_size=4, save_strategy="steps", save_steps=6)
    trainer = FSDPOnCPUTrainer(
        model=tiny_gpt2(), args=args, train_dataset=ByteChunks(), sdt_config=controller_config(mode)
    )
    trainer.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-6") if resume else None)
    return full_state_dict(trainer.model)


if __name__ == "__main__":
    output_dir, rank = sys.argv[1], int(os.environ["RANK"])
    dist.init_process_group("gloo")
    torch.save(different_topologies_are_refused(rank), f"{output_dir}/refused-rank{rank}.pt")
    for mode in ("weights", "weights-compact", "updates"):
        model, probe = train_with_controller(mode)
        with torch.no_grad():
            logits = model(input_ids=probe).logits
        result = {
            "state": full_state_dict(model),
            "logits": logits,
            "zero_outside": mode == "updates" or shards_zero_outside_masks(model),
        }
        hf_sdt.save_pretrained(model, f"{output_dir}/saved-{mode}")
        torch.save(result, f"{output_dir}/loop-{mode}-rank{rank}.pt")
        run_dir = f"{output_dir}/trainer-{mode}"
        uninterrupted = train_with_trainer(mode, run_dir, resume=False)
        resumed = train_with_trainer(mode, run_dir, resume=True)
        torch.save({"uninterrupted": uninterrupted, "resumed": resumed}, f"{output_dir}/trainer-{mode}-rank{rank}.pt")
    if importlib.util.find_spec("trl"):  # TRL's SFTTrainer with SDT, updates mode
        from hf_sdt import SDTSFTTrainer

        class FSDPOnCPUSFTTrainer(FSDPOnCPU, SDTSFTTrainer):
            pass

        trainer = sft_trainer(f"{output_dir}/sft", "updates", "messages", trainer_class=FSDPOnCPUSFTTrainer,
                              per_device_train_batch_size=2)  # fmt: skip
        trainer.train()
        torch.save(full_state_dict(trainer.model), f"{output_dir}/sft-updates-rank{rank}.pt")
    dist.destroy_process_group()
