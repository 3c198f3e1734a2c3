import itertools

import pytest

from hf_sdt import SDTConfig
from hf_sdt.masks import block_grid
from hf_sdt.schedule import (
    density_at,
    drop_fraction_at,
    erk_densities,
    in_dense_tail,
    initial_density,
    is_update_step,
    target_block_counts,
)


@pytest.mark.parametrize("schedule", ["cubic", "linear"])
def test_gradual_schedules_are_monotone_with_exact_endpoints(schedule):
    config = SDTConfig(density=0.1, initial_density=1.0, schedule=schedule, schedule_start=0.1, schedule_end=0.6)
    values = [density_at(step, 200, config) for step in range(200)]
    assert values[0] == values[20] == 1.0
    assert values[120] == values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(values))
    if schedule == "cubic":  # Zhu & Gupta: most of the pruning early
        assert values[45] < 1 - 0.5 * (1 - 0.1)


def test_constant_schedule_and_initial_density():
    assert initial_density(SDTConfig(density=0.3, schedule="constant")) == 0.3
    assert initial_density(SDTConfig(density=0.3)) == 1.0
    assert initial_density(SDTConfig(density=0.3, initial_density=0.3)) == 0.3


def test_update_steps_and_cosine_drop_fraction():
    config = SDTConfig(update_interval=25, update_end=0.75, drop_fraction=0.4)
    assert [s for s in range(100) if is_update_step(s, 100, config)] == [25, 50]
    assert drop_fraction_at(0, 100, config) == pytest.approx(0.4)
    assert drop_fraction_at(75, 100, config) == 0.0
    fractions = [drop_fraction_at(s, 100, config) for s in range(75)]
    assert all(a >= b for a, b in itertools.pairwise(fractions))


@pytest.mark.parametrize("schedule", ["cubic", "constant"])
def test_the_dense_tail_trains_dense_and_updates_nothing(schedule):
    config = SDTConfig(density=0.1, schedule=schedule, dense_tail=0.25, update_interval=10, update_end=1.0)
    tail = [step for step in range(100) if in_dense_tail(step, 100, config)]
    assert tail == list(range(75, 100))
    assert [density_at(step, 100, config) for step in (74, 75, 99)] == [pytest.approx(0.1), 1.0, 1.0]
    assert [s for s in range(100) if is_update_step(s, 100, config)] == [10, 20, 30, 40, 50, 60, 70]
    assert not config.fixed_block_counts and not config.compact_storage, "the tail changes the block counts"
    assert not any(in_dense_tail(step, 100, SDTConfig()) for step in range(100))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"dense_tail": 1.0}, r"dense_tail must be in \[0, 1\)"),
        ({"dense_tail": -0.1}, r"dense_tail must be in \[0, 1\)"),
        ({"dense_tail": "0.1"}, r"dense_tail must be in \[0, 1\)"),
        ({"dense_tail": 0.6}, r"schedule_end \(0\.5\) must not exceed 1 - dense_tail \(0\.4\)"),
        ({"dense_tail": 0.1, "mode": "updates"}, "updates mode keeps its pretrained weights"),
        ({"dense_tail": 0.1, "schedule": "constant", "storage": "compact"}, "no dense_tail"),
    ],
)
def test_bad_dense_tails_say_what_to_change(fields, match):
    with pytest.raises(ValueError, match=match):
        SDTConfig(**fields)


def test_uniform_counts_are_exact():
    shapes = [(100, 72), (64, 64), (96, 32)]
    counts = target_block_counts(shapes, (32, 32), 0.25, "uniform")
    grids = [block_grid(shape, (32, 32)) for shape in shapes]
    assert counts == [max(1, round(0.25 * rows * cols)) for rows, cols in grids]


def test_erk_sums_to_the_target_and_favours_small_layers():
    shapes = [(64, 64), (256, 1024), (1024, 256), (512, 512)]
    densities = erk_densities(shapes, 0.2)
    sizes = [rows * cols for rows, cols in shapes]
    assert sum(d * n for d, n in zip(densities, sizes, strict=True)) == pytest.approx(0.2 * sum(sizes))
    assert densities[0] > densities[1] == densities[2] > densities[3]
    assert all(0 < d <= 1 for d in densities)
    assert erk_densities([(8, 8), (4096, 4096)], 0.5)[0] == 1.0, "layers above 1 are made dense"
    with pytest.raises(ValueError, match="global"):
        target_block_counts(shapes, (32, 32), 0.2, "global")


@pytest.mark.parametrize(
    "field,value",
    [("initial_density", 0.1), ("schedule", "exp"), ("update_interval", 0), ("schedule_end", 1.5),
     ("prune_criterion", "l1"), ("grow_criterion", "x"), ("distribution", "none")],
)  # fmt: skip
def test_bad_schedule_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SDTConfig(density=0.25, **{field: value})


def test_erk_at_full_density_is_dense_everywhere():
    # Float rounding used to mark every layer dense and divide by an empty sum (SmolLM2's shapes).
    assert erk_densities([(576, 576), (192, 576), (1536, 576), (576, 1536)], 1.0) == [1.0] * 4
