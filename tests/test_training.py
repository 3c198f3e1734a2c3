from pathlib import Path

from hf_sdt.cli import parse_train_args
from hf_sdt.training import run_training

TINY = str(Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny.yaml")


def test_the_seed_fixes_a_from_scratch_run(tmp_path):
    def eval_loss(name: str, seed: int) -> float:
        argv = [TINY, "--max_steps", "2", "--seed", str(seed), "--output_dir", str(tmp_path / name)]
        return run_training(*parse_train_args(argv))["eval_loss"]

    assert eval_loss("first", 0) == eval_loss("again", 0) != eval_loss("other_seed", 1)
