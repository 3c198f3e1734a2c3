import pytest

from hf_sdt import SDTConfig


def test_round_trip(tmp_path):
    config = SDTConfig(target_modules=["q_proj", "v_proj"], density=0.1, block_size=(32, 64), seed=3)
    config.save_pretrained(tmp_path)
    loaded = SDTConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.block_shape == (32, 64)
    assert SDTConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "half"])
def test_density_out_of_range_names_the_field(density):
    with pytest.raises(ValueError, match="density"):
        SDTConfig(density=density)


@pytest.mark.parametrize("block_size", [0, -64, (64, 0), (64,), 1.5])
def test_bad_block_size_names_the_field(block_size):
    with pytest.raises(ValueError, match="block_size"):
        SDTConfig(block_size=block_size)


def test_bad_backend_and_regex():
    with pytest.raises(ValueError, match="backend"):
        SDTConfig(backend="cuda")
    with pytest.raises(ValueError, match="target_modules"):
        SDTConfig(target_modules="(unclosed")
    with pytest.raises(ValueError, match="exclude_modules"):
        SDTConfig(exclude_modules=[1, 2])


def test_unknown_field_lists_known_ones():
    with pytest.raises(ValueError, match=r"densty.*known fields"):
        SDTConfig.from_dict({"densty": 0.5})


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        SDTConfig.from_pretrained(tmp_path)


def test_mode_picks_its_defaults_and_is_checked():
    assert (SDTConfig().density, SDTConfig().update_interval) == (0.25, 100)
    updates = SDTConfig(mode="updates")
    assert (updates.density, updates.update_interval, updates.block_shape) == (0.05, 20, (16, 16))
    assert SDTConfig().block_shape == (64, 64)
    assert SDTConfig(mode="updates", block_size=64).block_shape == (64, 64)
    assert SDTConfig.from_dict(updates.to_dict()) == updates
    with pytest.raises(ValueError, match="mode must be one of"):
        SDTConfig(mode="sparse")
    with pytest.raises(ValueError, match="global"):
        SDTConfig(mode="updates", distribution="global")
    with pytest.raises(ValueError, match="selection_steps"):
        SDTConfig(mode="updates", selection_steps=0)


def test_growth_is_random_by_default_in_updates_mode_and_at_a_compute_budget_and_by_gradient_otherwise():
    assert SDTConfig(compute_budget=0.3).grow_criterion == SDTConfig(mode="updates").grow_criterion == "random"
    assert SDTConfig().grow_criterion == "gradient"
    assert SDTConfig(mode="updates", grow_criterion="gradient").grow_criterion == "gradient"
    assert SDTConfig(compute_budget=0.3, grow_criterion="gradient").grow_criterion == "gradient"
    budgeted = SDTConfig(compute_budget=0.3)
    assert SDTConfig.from_dict(budgeted.to_dict()) == budgeted


def test_storage_is_compact_exactly_when_block_counts_are_fixed():
    assert SDTConfig(schedule="constant").compact_storage
    assert SDTConfig(schedule="constant", distribution="erk").compact_storage
    assert not SDTConfig().compact_storage, "a gradual schedule prunes: dense storage"
    assert not SDTConfig(schedule="constant", distribution="global").compact_storage
    assert not SDTConfig(schedule="constant", storage="dense").compact_storage
    with pytest.raises(ValueError, match=r"storage='compact'.*schedule='cubic'"):
        SDTConfig(storage="compact")
    with pytest.raises(ValueError, match="storage must be one of"):
        SDTConfig(storage="sparse")
