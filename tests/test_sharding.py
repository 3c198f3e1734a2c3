import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sdt_helpers import assert_same_state, one_thread, tiny_gpt2, tiny_llama, train_with_controller

import hf_sdt
from hf_sdt.blocks import mask_of
from hf_sdt.masks import expand_block_mask
from hf_sdt.sharding import full_state_dict, local_window, shard_like, zero_at_


def test_a_plain_tensor_is_its_own_window():
    tensor = torch.randn(4, 3)
    local, offset = local_window(tensor)
    assert local is tensor and offset == (0, 0)
    assert shard_like(tensor, torch.zeros(4, 3)) is tensor


@pytest.mark.parametrize(
    "where", [torch.tensor([0, 2]), torch.tensor([True, False, True])], ids=["index", "bool-rows"]
)
def test_zero_at_takes_an_index_or_a_mask(where):
    tensor = torch.ones(3, 2, 2)
    zero_at_(tensor, where)
    assert tensor.flatten(1).sum(1).tolist() == [0.0, 4.0, 0.0]


def test_zero_at_takes_an_element_mask():
    tensor, where = torch.ones(3, 2), torch.tensor([[True, False], [False, False], [False, True]])
    zero_at_(tensor, where)
    assert torch.equal(tensor, (~where).float())


def frozen_outside_active_blocks(state: dict, pretrained: dict, conv1d: bool = True) -> bool:
    """Updates mode: every weight outside the active blocks, and every other tensor of the base model, equals the
    pretrained one exactly (weights stored (in, out) with `conv1d`, as GPT-2's)."""
    for key, value in pretrained.items():
        layer = key.rpartition(".")[0]
        if key.endswith(".weight") and layer + ".sdt_block_ids" in state:
            out_in = value.t() if conv1d else value
            shape, block = out_in.shape, state[layer + ".sdt_updates"].shape[1:]
            grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
            active = expand_block_mask(mask_of(state[layer + ".sdt_block_ids"], grid), tuple(block), tuple(shape))
            active = active.t() if conv1d else active
            if not torch.equal(state[key][~active], value[~active]):
                return False
        elif not torch.equal(state[key], value):
            return False
    return True


FSDP2_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp2.yaml"


def fsdp_launch_environment(config_file: Path) -> dict[str, str]:
    """The `FSDP_*` variables `accelerate launch --config_file config_file` sets, from which `SDTTrainer`'s FSDP
    plugin is built."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config_file), "x"]))
    return {key: value for key, value in prepare_multi_gpu_env(args).items() if key.startswith("FSDP_")}


def test_the_fsdp2_recipe_shards_with_fsdp2_and_saves_full_state_dicts():
    environment = fsdp_launch_environment(FSDP2_CONFIG)
    assert environment["FSDP_VERSION"] == "2" and environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert environment["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "false"


@pytest.mark.slow
def test_fsdp2_runs_match_one_process_save_full_checkpoints_and_resume(tmp_path):
    """2 CPU processes under FSDP2 (`fully_shard`, gloo), in both modes: the controller's plain loop against one
    process with the same micro-batches, checkpoints loaded in one process, and SDTTrainer resumed from a checkpoint
    against its uninterrupted run, with the plugin of recipes/accelerate/fsdp2.yaml (see fsdp_train.py)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(Path(__file__).parent / "fsdp_train.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, **fsdp_launch_environment(FSDP2_CONFIG), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert all(torch.load(tmp_path / f"refused-rank{rank}.pt") for rank in (0, 1)), "different masks not refused"
    pretrained = tiny_gpt2().state_dict()
    for mode in ("weights", "weights-compact", "updates"):
        ranks = [torch.load(tmp_path / f"loop-{mode}-rank{rank}.pt") for rank in (0, 1)]
        with one_thread():
            model, probe = train_with_controller(mode)
        single = full_state_dict(model)
        assert any(key.endswith(("sdt_mask", "sdt_block_ids")) for key in single)
        assert all(run["zero_outside"] for run in ranks), "a weight shard is not zero outside its mask"
        for key in single:
            assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), f"{mode}: {key} differs between ranks"
        assert_same_state(single, ranks[0]["state"])  # as one process
        if mode == "updates":
            assert frozen_outside_active_blocks(ranks[0]["state"], pretrained)
        base = {"base_model": tiny_gpt2()} if mode == "updates" else {}
        loaded = hf_sdt.from_pretrained(str(tmp_path / f"saved-{mode}"), **base).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=probe).logits, ranks[0]["logits"], rtol=0, atol=1e-6)
        for rank in (0, 1):
            trainer_run = torch.load(tmp_path / f"trainer-{mode}-rank{rank}.pt")
            uninterrupted, resumed = trainer_run["uninterrupted"], trainer_run["resumed"]
            for key, value in uninterrupted.items():
                torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{mode}, resumed: {key}")
    if importlib.util.find_spec("trl"):  # TRL's SFTTrainer with SDT under FSDP2: the ranks agree, the base stays
        ranks = [torch.load(tmp_path / f"sft-updates-rank{rank}.pt") for rank in (0, 1)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"SFT: {key} differs between ranks"
        assert frozen_outside_active_blocks(ranks[0], tiny_llama().state_dict(), conv1d=False)
