"""The compute-budget planner: the density schedule whose compute receipt ends at a budget (pure functions).

A planned run prunes with the cubic schedule from dense at step 0 to `density` at `schedule_end`, the latest end
that keeps the receipt within the budget: the longer a run stays dense-ish, the more it learns in its first steps,
and the more it spends. A `dense_tail` trains dense again for the last steps, and they are paid for like the rest.
The receipt of a step at density d is (1 - s) + s c(d), where s is the share of the dense step's FLOPs in the
targeted layers (measured on the first step, see `hf_sdt.compute`: the output layer, attention and untargeted layers
make up 1 - s) and c(d) what the targeted layers' products cost at density d as a share of their dense cost, as they
really run (the controller prices each layer's whole blocks on its device, so that a CPU layer whose blocked product
does not pay counts dense; d itself by default); each drop/grow update with gradient growth adds a dense weight
gradient of the targeted layers, s / 3. Steps of unequal size (the epoch's last batch is often smaller) weigh by
their size, as the receipt weighs them by their FLOPs: `step_sizes`, e.g. from `epoch_step_sizes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .config import SDTConfig
from .schedule import density_at, is_update_step


def planned_receipt(config: SDTConfig, total_steps: int, targeted_share: float, step_cost=None,
                    step_sizes: Sequence[float] | None = None) -> float:  # fmt: skip
    """The receipt at the end of `total_steps` steps of `config`'s schedule, when the targeted layers take
    `targeted_share` of a dense step's FLOPs. Step t runs on the mask pruned at the end of step t - 1 (step 0 is
    dense); `step_cost(density)` is what the targeted layers cost at a target density, as a share of their dense
    cost (default: the density itself); `step_sizes` weighs each step by its tokens or sequences (default: equal).

    At density 0.1 with 90% of the FLOPs targeted a step costs 0.19 of a dense one; with the dense first step, 100
    steps cost 0.1981.

    Example:
        >>> config = SDTConfig(density=0.1, schedule="constant")
        >>> round(planned_receipt(config, 100, targeted_share=0.9), 4)
        0.1981
    """
    step_cost = step_cost or (lambda density: density)
    sizes = [1.0] * total_steps if step_sizes is None else step_sizes
    per_step = [1.0] + [(1 - targeted_share) + targeted_share * step_cost(density_at(t - 1, total_steps, config))
                        for t in range(1, total_steps)]  # fmt: skip
    if config.grow_criterion == "gradient":
        captures = [is_update_step(t, total_steps, config) for t in range(total_steps)]
        per_step = [cost + targeted_share / 3 * capture for cost, capture in zip(per_step, captures, strict=True)]
    return sum(size * cost for size, cost in zip(sizes, per_step, strict=True)) / sum(sizes)


def epoch_step_sizes(num_samples: int, batch_size: int, drop_last: bool, accumulation: int,
                     total_steps: int) -> list[int]:  # fmt: skip
    """The samples of each of `total_steps` optimizer steps that cycle through epochs of `num_samples` in batches of
    `batch_size` (the last one smaller unless `drop_last`), `accumulation` batches per step (fewer in the epoch's
    last step), as `transformers.Trainer` steps on one process.

    Example:
        >>> epoch_step_sizes(10, batch_size=4, drop_last=False, accumulation=1, total_steps=4)
        [4, 4, 2, 4]
    """
    batches = [batch_size] * (num_samples // batch_size)
    if num_samples % batch_size and not drop_last:
        batches.append(num_samples % batch_size)
    epoch = [sum(batches[i : i + accumulation]) for i in range(0, len(batches), accumulation)]
    return [epoch[t % len(epoch)] for t in range(total_steps)]


def plan_density(config: SDTConfig, total_steps: int, targeted_share: float, step_cost=None,
                 step_sizes: Sequence[float] | None = None) -> float:  # fmt: skip
    """The highest final density whose run can keep `planned_receipt` (with `step_cost` and `step_sizes`) within
    `config.compute_budget`, for a config that leaves `density` to the planner: the budget buys as many active blocks
    as it can, and `plan_schedule_end` then spends what is left on the prune from dense. A `ValueError` names the
    lowest budget when even the lowest density (one block per layer, as `step_cost` prices it) does not fit.

    Example:
        >>> config = SDTConfig(compute_budget=0.3)
        >>> round(plan_density(config, 1000, targeted_share=0.9), 3)
        0.221
    """

    def lowest_receipt(density: float) -> float:
        pruned_at_once = dataclasses.replace(config, density=density, schedule_end=0.0)
        return planned_receipt(pruned_at_once, total_steps, targeted_share, step_cost, step_sizes)

    low, high = 1e-6, 1.0
    if lowest_receipt(high) <= config.compute_budget:
        return high
    _check_feasible(config, total_steps, targeted_share, lowest_receipt(low))
    for _ in range(30):  # the receipt grows with the density
        middle = (low + high) / 2
        low, high = (middle, high) if lowest_receipt(middle) <= config.compute_budget else (low, middle)
    return low


def _check_feasible(config: SDTConfig, total_steps: int, targeted_share: float, lowest: float) -> None:
    if lowest > config.compute_budget:
        at = (
            "even at the lowest density (one block per layer)"
            if config.plans_density
            else f"at density {config.density}"
        )
        gradient = config.grow_criterion == "gradient"
        cost = ", each gradient-growth update adds a dense weight gradient" if gradient else ""
        cost += f", the dense tail runs {config.dense_tail:.0%} of the steps dense" if config.dense_tail else ""
        fixes = ["use smaller blocks" if config.plans_density else "lower the density", "target more layers"]
        fixes += ["use grow_criterion='random'"] if gradient else []
        fixes += ["shorten dense_tail"] if config.dense_tail else []
        raise ValueError(
            f"SDTConfig.compute_budget={config.compute_budget} cannot be met {at} over {total_steps} steps: the "
            f"lowest receipt is {lowest:.4f} (the layers SDT leaves dense take {1 - targeted_share:.1%} of a dense "
            f"step{cost}). Raise the budget to at least {lowest:.4f}, {', '.join(fixes[:-1])} or {fixes[-1]}."
        )


def plan_schedule_end(config: SDTConfig, total_steps: int, targeted_share: float, step_cost=None,
                      step_sizes: Sequence[float] | None = None) -> float:  # fmt: skip
    """The latest `schedule_end` (a fraction of the steps, at most `1 - config.dense_tail`) at which the cubic prune
    from dense to `config.density` keeps `planned_receipt` (with `step_cost` and `step_sizes`) within
    `config.compute_budget`; a `ValueError` names the lowest budget when none does.

    Example:
        >>> config = SDTConfig(density=0.1, compute_budget=0.3)
        >>> end = plan_schedule_end(config, 1000, targeted_share=0.9)
        >>> planned_receipt(dataclasses.replace(config, schedule_end=end), 1000, 0.9) <= 0.3
        True
    """

    def receipt(end: float) -> float:
        planned = dataclasses.replace(config, schedule_end=end)
        return planned_receipt(planned, total_steps, targeted_share, step_cost, step_sizes)

    budget = config.compute_budget
    _check_feasible(config, total_steps, targeted_share, receipt(0.0))
    low, high = 0.0, 1.0 - config.dense_tail  # the prune ends before the dense tail
    if receipt(high) <= budget:
        return high
    for _ in range(20):  # receipt(end) grows with end; 2^-20 of the steps is below one step
        middle = (low + high) / 2
        low, high = (middle, high) if receipt(middle) <= budget else (low, middle)
    return low
