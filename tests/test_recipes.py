from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "accelerate").glob("*.yaml"))


def test_there_are_single_multi_gpu_and_multi_node_configs():
    assert {path.stem for path in CONFIGS} == {"single_gpu", "multi_gpu", "multi_node"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_accelerate_reads_the_config(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.mixed_precision == "bf16"
    if path.stem != "single_gpu":
        assert config.distributed_type == "MULTI_GPU" and config.num_processes > 1
    if path.stem == "multi_node":
        assert config.num_machines == 2
