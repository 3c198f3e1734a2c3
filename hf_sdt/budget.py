"""The compute-budget planner: the density schedule whose compute receipt ends at a budget (pure functions).

A planned run prunes with the cubic schedule from dense at step 0 to `density` at `schedule_end`, the latest end
that keeps the receipt within the budget: the longer a run stays dense-ish, the more it learns in its first steps,
and the more it spends. The receipt of a step at density d is (1 - s) + s c(d), where s is the share of the dense
step's FLOPs in the targeted layers (measured on the first step, see `hf_sdt.compute`: the output layer, attention
and untargeted layers make up 1 - s) and c(d) what the targeted layers' products cost at density d as a share of
their dense cost, as they really run (the controller prices each layer's whole blocks on its device, so that a CPU
layer whose blocked product does not pay counts dense; d itself by default); each drop/grow update with gradient
growth adds a dense weight gradient of the targeted layers, s / 3.
"""

from __future__ import annotations

import dataclasses

from .config import SDTConfig
from .schedule import density_at, is_update_step


def planned_receipt(config: SDTConfig, total_steps: int, targeted_share: float, step_cost=None) -> float:
    """The receipt at the end of `total_steps` steps of `config`'s schedule, when the targeted layers take
    `targeted_share` of a dense step's FLOPs. Step t runs on the mask pruned at the end of step t - 1 (step 0 is
    dense); `step_cost(density)` is what the targeted layers cost at a target density, as a share of their dense
    cost (default: the density itself).

    At density 0.1 with 90% of the FLOPs targeted a step costs 0.19 of a dense one; with the dense first step, 100
    steps cost 0.1981.

    Example:
        >>> config = SDTConfig(density=0.1, schedule="constant")
        >>> round(planned_receipt(config, 100, targeted_share=0.9), 4)
        0.1981
    """
    step_cost = step_cost or (lambda density: density)
    per_step = [1.0] + [(1 - targeted_share) + targeted_share * step_cost(density_at(t - 1, total_steps, config))
                        for t in range(1, total_steps)]  # fmt: skip
    captures = 0
    if config.grow_criterion == "gradient":
        captures = sum(is_update_step(t, total_steps, config) for t in range(total_steps))
    return (sum(per_step) + captures * targeted_share / 3) / total_steps


def plan_schedule_end(config: SDTConfig, total_steps: int, targeted_share: float, step_cost=None) -> float:
    """The latest `schedule_end` (a fraction of the steps) at which the cubic prune from dense to `config.density`
    keeps `planned_receipt` (with `step_cost`) within `config.compute_budget`; a `ValueError` names the lowest
    budget when none does.

    Example:
        >>> config = SDTConfig(density=0.1, compute_budget=0.3)
        >>> end = plan_schedule_end(config, 1000, targeted_share=0.9)
        >>> planned_receipt(dataclasses.replace(config, schedule_end=end), 1000, 0.9) <= 0.3
        True
    """

    def receipt(end: float) -> float:
        return planned_receipt(dataclasses.replace(config, schedule_end=end), total_steps, targeted_share, step_cost)

    budget = config.compute_budget
    lowest = receipt(0.0)
    if lowest > budget:
        raise ValueError(
            f"SDTConfig.compute_budget={budget} cannot be met at density {config.density} over {total_steps} "
            f"steps: the lowest receipt is {lowest:.4f} (the layers SDT leaves dense take {1 - targeted_share:.1%} "
            "of a dense step, each gradient-growth update adds a dense weight gradient). Raise the budget to at "
            f"least {lowest:.4f}, lower the density, target more layers or use grow_criterion='random'."
        )
    low, high = 0.0, 1.0
    if receipt(high) <= budget:
        return high
    for _ in range(20):  # receipt(end) grows with end; 2^-20 of the steps is below one step
        middle = (low + high) / 2
        low, high = (middle, high) if receipt(middle) <= budget else (low, middle)
    return low
