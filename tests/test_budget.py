import dataclasses
import itertools

import pytest
import torch
from test_compute import gpt2, training_loss

from hf_sdt import SDTConfig, SDTController, get_sdt_model
from hf_sdt.budget import epoch_step_sizes, plan_density, plan_schedule_end, planned_receipt
from hf_sdt.model import sdt_layers
from hf_sdt.schedule import density_at


@pytest.mark.parametrize("steps", [50, 200, 1000])
@pytest.mark.parametrize("budget", [0.2, 0.3, 0.6])
def test_plan_meets_the_budget_closely(steps, budget):
    config = SDTConfig(density=0.1, compute_budget=budget, update_interval=10)
    end = plan_schedule_end(config, steps, targeted_share=0.95)
    planned = dataclasses.replace(config, schedule_end=end)
    receipt = planned_receipt(planned, steps, 0.95)
    assert receipt <= budget
    later = planned_receipt(dataclasses.replace(config, schedule_end=min(1.0, end + 1.5 / steps)), steps, 0.95)
    assert end == 1.0 or later > budget, "a later end (by a step or so) would still have fit"
    densities = [density_at(step, steps, planned) for step in range(steps)]
    assert all(a >= b for a, b in itertools.pairwise(densities)), "the planned schedule only prunes"


def test_receipt_grows_with_the_end_of_the_prune():
    config = SDTConfig(density=0.1, compute_budget=0.5)
    receipts = [planned_receipt(dataclasses.replace(config, schedule_end=end), 100, 0.9) for end in (0, 0.2, 0.5, 1)]
    assert receipts == sorted(receipts) and receipts[0] == pytest.approx((1 + 99 * 0.19) / 100)


@pytest.mark.parametrize(
    ("samples", "batch", "drop_last", "accumulation", "expected"),
    [
        (20, 8, False, 1, [8, 8, 4, 8, 8, 4, 8]),
        (20, 8, True, 1, [8, 8, 8, 8, 8, 8, 8]),
        (52, 8, False, 2, [16, 16, 16, 4, 16, 16, 16]),
        (40, 8, False, 2, [16, 16, 8, 16, 16, 8, 16]),  # 5 batches: the epoch's last step takes the fifth
    ],
)
def test_epoch_step_sizes_follow_the_trainer_epochs(samples, batch, drop_last, accumulation, expected):
    assert epoch_step_sizes(samples, batch, drop_last, accumulation, total_steps=7) == expected


def test_the_plan_weighs_unequal_steps_as_the_receipt_does():
    """A small step in the sparse phase weighs less, which raises the receipt: planned as equal steps, the run
    would end above the budget; planned with the sizes, it ends within it (and equal sizes change nothing)."""
    config = SDTConfig(density=0.1, compute_budget=0.3, update_interval=10)
    sizes = epoch_step_sizes(70, 16, drop_last=False, accumulation=1, total_steps=100)  # every 5th step takes 6
    assert planned_receipt(config, 100, 0.95, step_sizes=[3.0] * 100) == pytest.approx(
        planned_receipt(config, 100, 0.95)
    )
    as_equal = dataclasses.replace(config, schedule_end=plan_schedule_end(config, 100, 0.95))
    assert planned_receipt(as_equal, 100, 0.95, step_sizes=sizes) > 0.3
    end = plan_schedule_end(config, 100, 0.95, step_sizes=sizes)
    assert 0.29 < planned_receipt(dataclasses.replace(config, schedule_end=end), 100, 0.95, step_sizes=sizes) <= 0.3


def test_a_budget_that_cannot_be_met_names_the_lowest_one():
    config = SDTConfig(density=0.1, compute_budget=0.1)
    with pytest.raises(ValueError, match=r"lowest receipt is 0\.2\d+.*leaves dense take 20\.0%"):
        plan_schedule_end(config, 100, targeted_share=0.8)


@pytest.mark.parametrize("density", [0.1, None])
def test_the_plan_pays_for_the_dense_tail(density):
    """The tail's dense steps come out of the budget: the prune ends earlier (and, planned, the density is lower)
    than without the tail, before the tail starts, and the receipt stays within the budget."""
    config = SDTConfig(density=density, compute_budget=0.3, dense_tail=0.05, update_interval=10)
    no_tail = dataclasses.replace(config, dense_tail=0.0)
    if density is None:
        density = plan_density(config, 200, targeted_share=0.95)
        assert density < plan_density(no_tail, 200, targeted_share=0.95)
        config, no_tail = (dataclasses.replace(c, density=density) for c in (config, no_tail))
    end = plan_schedule_end(config, 200, targeted_share=0.95)
    assert end < plan_schedule_end(no_tail, 200, targeted_share=0.95) and end <= 0.95
    planned = dataclasses.replace(config, schedule_end=end)
    assert 0.29 < planned_receipt(planned, 200, 0.95) <= 0.3
    densities = [density_at(step, 200, planned) for step in range(200)]
    assert densities[190:] == [1.0] * 10 and densities[189] == pytest.approx(density)


def test_a_dense_tail_the_budget_cannot_pay_for_says_so():
    config = SDTConfig(density=0.1, compute_budget=0.2, dense_tail=0.2)
    with pytest.raises(ValueError, match=r"the dense tail runs 20% of the steps dense\)\..* or shorten dense_tail\.$"):
        plan_schedule_end(config, 100, targeted_share=0.9)


@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("budget", [0.2, 0.45])
def test_planned_density_is_the_highest_the_budget_affords(steps, budget):
    config = SDTConfig(compute_budget=budget, update_interval=10)
    density = plan_density(config, steps, targeted_share=0.9)
    planned = dataclasses.replace(config, density=density)
    end = plan_schedule_end(planned, steps, targeted_share=0.9)
    assert planned_receipt(dataclasses.replace(planned, schedule_end=end), steps, 0.9) <= budget
    higher = dataclasses.replace(config, density=density * 1.01)
    with pytest.raises(ValueError, match="cannot be met at density"):
        plan_schedule_end(higher, steps, targeted_share=0.9)


def test_planned_density_counts_the_blocks_each_layer_keeps():
    """Priced by block counts (at least one block per layer), a budget below one block per layer is refused, and a
    budget that affords all of them gives density 1."""
    config = SDTConfig(compute_budget=0.2)
    one_block_of_four = lambda density: max(1, round(4 * density)) / 4  # noqa: E731
    lowest = r"even at the lowest density \(one block per layer\).*least 0\.406"
    with pytest.raises(ValueError, match=lowest + r".* or target more layers\.$"):  # random growth: the default
        plan_density(config, 100, targeted_share=0.8, step_cost=one_block_of_four)
    with pytest.raises(ValueError, match=r"gradient-growth update adds .* or use grow_criterion='random'\.$"):
        plan_density(dataclasses.replace(config, grow_criterion="gradient"), 100, 0.8, step_cost=one_block_of_four)
    assert plan_density(dataclasses.replace(config, compute_budget=1.0), 100, 0.8) == 1.0


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"compute_budget": 0}, r"\(0, 1\]"),
        ({"compute_budget": 1.5}, r"\(0, 1\]"),
        ({"compute_budget": "0.1"}, r"\(0, 1\]"),
        ({"compute_budget": 0.2, "mode": "updates"}, "weights mode"),
        ({"compute_budget": 0.2, "schedule": "constant"}, "planner chooses the schedule"),
        ({"compute_budget": 0.2, "initial_density": 0.5}, "planner chooses the schedule"),
    ],
)
def test_compute_budget_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        SDTConfig(**fields)


def test_a_budget_without_a_density_leaves_it_to_the_planner():
    config = SDTConfig(compute_budget=0.2)
    assert config.plans_density and config.density is None
    assert SDTConfig.from_dict(config.to_dict()) == config
    assert not SDTConfig(compute_budget=0.2, density=0.1).plans_density
    assert SDTConfig().density == 0.25, "without a budget the mode's default stays"
    with pytest.raises(ValueError, match="density must be a number"):
        SDTConfig(density="0.1", compute_budget=0.2)
    torch.manual_seed(0)
    model = get_sdt_model(gpt2(tied=False), config)
    assert all(layer.sdt_mask.all() for layer in sdt_layers(model).values()), "the planned prune starts dense"
    with pytest.warns(UserWarning, match="nothing is pruned towards the density the compute budget plans"):
        training_loss(model).backward()


def run(controller, model, steps, optimizer):
    for step in steps:
        controller.begin_step(step)
        training_loss(model).backward()
        controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()


def budget_config(density, dense_tail=0.0):
    return SDTConfig(density=density, block_size=16, compute_budget=0.45, update_interval=10, dense_tail=dense_tail)


def budgeted_run(density, dense_tail=0.0):
    """(model, controller, optimizer) of a 40-step run of the test GPT-2 at compute budget 0.45."""
    config = budget_config(density, dense_tail)
    torch.manual_seed(0)
    model = get_sdt_model(gpt2(tied=False), config)
    return model, SDTController(model, config, total_steps=40), torch.optim.SGD(model.parameters(), lr=1e-3)


@pytest.mark.parametrize(("density", "dense_tail"), [(0.25, 0.0), (None, 0.0), (None, 0.1)])
def test_controller_plans_the_budget_and_resumes_the_plan(force_blocked_path, density, dense_tail):
    """A run with a budget ends with its receipt at most at the budget and within a step's worth of it; resumed
    midway, it continues on the same plan, identically. Without a density the controller plans it too, and the
    model's stored config (what a checkpoint saves) says which. A dense tail is paid for, and ends dense."""
    model, controller, optimizer = budgeted_run(density, dense_tail)
    run(controller, model, range(40), optimizer)
    end = controller.planned_schedule_end
    assert (0 < end < 1) if density else (end <= 2 / 40), "the highest density the budget affords is reached at once"
    assert 0.44 < controller.metrics()["sdt/train_flops_ratio"] <= 0.45
    planned = controller.planned_density
    assert (planned is None) if density else (0 < planned < 1)
    assert model.config.sdt_config["density"] == (density or planned)
    assert model.config.sdt_config["schedule_end"] == controller.planned_schedule_end
    metrics = controller.metrics()
    assert metrics["sdt/density"] == (1.0 if dense_tail else pytest.approx(density or planned, abs=0.05))
    assert (metrics["sdt/planned_density"], metrics["sdt/planned_schedule_end"]) == (
        density or planned,
        controller.planned_schedule_end,
    )

    resumed_model, first, resumed_optimizer = budgeted_run(density, dense_tail)
    run(first, resumed_model, range(15), resumed_optimizer)
    state = first.state_dict()
    second = SDTController(resumed_model, budget_config(density, dense_tail), total_steps=40)
    second.load_state_dict(state)
    assert (second.config.schedule_end, second.config.density) == (controller.planned_schedule_end, density or planned)
    run(second, resumed_model, range(15, 40), resumed_optimizer)
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
    assert second.metrics()["sdt/train_flops_ratio"] == controller.metrics()["sdt/train_flops_ratio"]


@pytest.mark.parametrize(("saved", "resumed"), [(None, 0.25), (0.25, None)])
def test_resuming_a_plan_under_the_other_kind_of_config_is_refused(force_blocked_path, saved, resumed):
    model, first, optimizer = budgeted_run(saved)
    run(first, model, range(2), optimizer)
    _, second, _ = budgeted_run(resumed)
    with pytest.raises(ValueError, match="Resume with the SDTConfig the run was trained with"):
        second.load_state_dict(first.state_dict())


def test_the_plan_prices_the_products_as_they_run_on_this_device():
    """On a CPU the blocked product pays only at low density (here below about 0.4), and a layer above it runs one
    dense GEMM: the plan counts that, so the receipt still ends within the budget."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = SDTConfig(density=0.2, block_size=32, compute_budget=0.6, update_interval=10)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=64, attn_implementation="eager"))
    model = get_sdt_model(gpt, config)
    controller = SDTController(model, config, total_steps=30)
    tokens = torch.randint(0, 64, (4, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(30):
        controller.begin_step(step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()
    receipt = controller.metrics()["sdt/train_flops_ratio"]
    assert 0.55 < receipt <= 0.6, receipt
