"""Density and drop-fraction schedules, update steps and per-layer allocation: pure functions of the config."""

from __future__ import annotations

import math

from .config import SDTConfig
from .masks import active_block_count, block_grid


def density_at(step: int, total_steps: int, config: SDTConfig) -> float:
    """Target density at optimizer step `step` (0-based) of `total_steps`.

    `"cubic"` is Zhu & Gupta's d(t) = d_f + (d_i - d_f) (1 - p)^3 with p the progress through
    [schedule_start, schedule_end]; `"linear"` uses (1 - p); `"constant"` is `density` throughout. The steps of
    the `dense_tail` are at density 1.

    Example:
        >>> config = SDTConfig(density=0.25, initial_density=1.0, schedule="linear", schedule_end=0.5)
        >>> [density_at(step, 100, config) for step in (0, 25, 50, 99)]
        [1.0, 0.625, 0.25, 0.25]
        >>> density_at(99, 100, SDTConfig(density=0.25, dense_tail=0.1))
        1.0
    """
    if in_dense_tail(step, total_steps, config):
        return 1.0
    if config.schedule == "constant":
        return config.density
    start, end = config.schedule_start * total_steps, config.schedule_end * total_steps
    progress = 1.0 if end <= start else min(max((step - start) / (end - start), 0.0), 1.0)
    power = 3 if config.schedule == "cubic" else 1
    return config.density + (config.initial_density - config.density) * (1 - progress) ** power


def in_dense_tail(step: int, total_steps: int, config: SDTConfig) -> bool:
    """Whether step `step` is in the last `dense_tail` of the steps, which train dense.

    Example:
        >>> config = SDTConfig(dense_tail=0.1)
        >>> [step for step in range(100) if in_dense_tail(step, 100, config)][:2]
        [90, 91]
    """
    return config.dense_tail > 0 and step >= (1 - config.dense_tail) * total_steps


def initial_density(config: SDTConfig) -> float:
    """Density of the mask `get_sdt_model` builds: the schedule's value at step 0 (dense, when the compute budget
    plans the density: the planned schedule prunes from dense)."""
    if config.plans_density:
        return config.initial_density
    return density_at(0, 1, config)


def is_update_step(step: int, total_steps: int, config: SDTConfig) -> bool:
    """Whether optimizer step `step` ends with a drop/grow update: every `update_interval` steps, before `update_end`
    and before the dense tail (where every block is active).

    Example:
        >>> config = SDTConfig(update_interval=10, update_end=0.5)
        >>> [step for step in range(100) if is_update_step(step, 100, config)]
        [10, 20, 30, 40]
    """
    before_end = step < config.update_end * total_steps and not in_dense_tail(step, total_steps, config)
    return step > 0 and step % config.update_interval == 0 and before_end


def drop_fraction_at(step: int, total_steps: int, config: SDTConfig) -> float:
    """RigL's cosine decay: drop_fraction / 2 * (1 + cos(pi * step / (update_end * total_steps))), 0 after it.

    Example:
        >>> config = SDTConfig(drop_fraction=0.3, update_end=0.5)
        >>> [round(drop_fraction_at(step, 100, config), 3) for step in (0, 25, 50)]
        [0.3, 0.15, 0.0]
    """
    end = config.update_end * total_steps
    if step >= end:
        return 0.0
    return config.drop_fraction / 2 * (1 + math.cos(math.pi * step / end))


def erk_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Erdos-Renyi-Kernel densities of linear layers (out, in): proportional to (in + out) / (in * out), scaled so
    that the weighted mean is `density`; layers that would exceed 1 are made dense and the rest rescaled.

    Example:
        >>> [round(d, 3) for d in erk_densities([(64, 64), (256, 1024)], 0.5)]
        [1.0, 0.492]
    """
    sizes = [rows * cols for rows, cols in shapes]
    raw = [(rows + cols) / (rows * cols) for rows, cols in shapes]
    dense: set[int] = set()
    while True:
        sparse = [i for i in range(len(shapes)) if i not in dense]
        if not sparse:  # every layer is dense (density 1, up to rounding)
            return [1.0] * len(shapes)
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        scale = budget / sum(raw[i] * sizes[i] for i in sparse)
        over = {i for i in sparse if raw[i] * scale > 1}
        if not over:
            return [1.0 if i in dense else raw[i] * scale for i in range(len(shapes))]
        dense |= over


def target_block_counts(
    shapes: list[tuple[int, int]], block: tuple[int, int], density: float, distribution: str
) -> list[int]:
    """Active blocks per layer at `density` for the `"uniform"` and `"erk"` distributions (at least one each).

    Example:
        >>> target_block_counts([(64, 64), (128, 64)], (32, 32), 0.5, "uniform")
        [2, 4]
    """
    if distribution == "global":
        raise ValueError("The 'global' distribution has no fixed per-layer counts; they follow the block scores.")
    densities = erk_densities(shapes, density) if distribution == "erk" else [density] * len(shapes)
    grids = [block_grid(shape, block) for shape in shapes]
    return [active_block_count(d, rows * cols) for d, (rows, cols) in zip(densities, grids, strict=True)]
