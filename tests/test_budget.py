import dataclasses
import itertools

import pytest
import torch
from test_compute import gpt2, training_loss

from hf_sdt import SDTConfig, SDTController, get_sdt_model
from hf_sdt.budget import plan_schedule_end, planned_receipt
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


def test_a_budget_that_cannot_be_met_names_the_lowest_one():
    config = SDTConfig(density=0.1, compute_budget=0.1)
    with pytest.raises(ValueError, match=r"lowest receipt is 0\.2\d+.*leaves dense take 20\.0%"):
        plan_schedule_end(config, 100, targeted_share=0.8)


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


def run(controller, model, steps, optimizer):
    for step in steps:
        controller.begin_step(step)
        training_loss(model).backward()
        controller.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        controller.after_optimizer_step()


def test_controller_plans_the_budget_and_resumes_the_plan(force_blocked_path):
    """A run with a budget ends with its receipt at most at the budget and within a step's worth of it; resumed
    midway, it continues on the same plan, identically."""
    config = SDTConfig(density=0.25, block_size=16, compute_budget=0.45, update_interval=10)

    def fresh():
        torch.manual_seed(0)
        model = get_sdt_model(gpt2(tied=False), config)
        return model, SDTController(model, config, total_steps=40), torch.optim.SGD(model.parameters(), lr=1e-3)

    model, controller, optimizer = fresh()
    run(controller, model, range(40), optimizer)
    assert 0 < controller.planned_schedule_end < 1
    assert 0.44 < controller.metrics()["sdt/train_flops_ratio"] <= 0.45

    resumed_model, first, resumed_optimizer = fresh()
    run(first, resumed_model, range(15), resumed_optimizer)
    state = first.state_dict()
    second = SDTController(resumed_model, config, total_steps=40)
    second.load_state_dict(state)
    assert second.config.schedule_end == controller.planned_schedule_end
    run(second, resumed_model, range(15, 40), resumed_optimizer)
    for (name, expected), actual in zip(model.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
    assert second.metrics()["sdt/train_flops_ratio"] == controller.metrics()["sdt/train_flops_ratio"]


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
