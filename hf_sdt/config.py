"""`SDTConfig`: what to sparsify and how, in the style of PEFT's tuner configs."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

CONFIG_NAME = "sdt_config.json"
ALL_LINEAR = "all-linear"
BACKENDS = ("auto", "triton", "torch", "reference")
SCHEDULES = ("cubic", "linear", "constant")
PRUNE_CRITERIA = ("magnitude", "taylor", "wanda")
GROW_CRITERIA = ("gradient", "random")
DISTRIBUTIONS = ("uniform", "erk", "global")
MODES = ("weights", "updates")
STORAGES = ("auto", "compact", "dense")
# Defaults that depend on the mode (a field left at None takes its mode's value).
MODE_DEFAULTS = {
    "weights": {"density": 0.25, "update_interval": 100, "block_size": 64},
    "updates": {"density": 0.05, "update_interval": 20, "block_size": 16, "grow_criterion": "random"},
}
# Updates mode's default `update_scale` is sqrt(UPDATE_SCALE_DENSITY / density): 2.0 at the default density 0.05.
UPDATE_SCALE_DENSITY = 0.2


@dataclass
class SDTConfig:
    """Configuration of Sparse-Dynamic Training (SDT) for a transformers model.

    Each targeted weight matrix (out x in) is cut into blocks of `block_size`; a boolean block mask says which
    blocks are active. Two modes:

    - `"weights"` (pre-training, or making a sparse model): the weights themselves are block-sparse. Only active
      blocks are stored as non-zero, multiplied and trained; a density schedule prunes to `density` and drop/grow
      updates move the active blocks.
    - `"updates"` (fine-tuning a pretrained model): the pretrained weights stay and are frozen; only a block-sparse
      set of updates to them is trained, stored compactly as (n_active, block_rows, block_cols) and saved as a small
      adapter. By default the active set is drawn at random (SHiRA's choice, in 16 x 16 blocks) after
      `selection_steps` steps and re-chosen every `update_interval` steps (drop the blocks with the smallest
      update, grow random ones); `grow_criterion="gradient"` chooses by the dense gradient accumulated over those
      steps instead.
      The updates enter the weight scaled by `update_scale` (as LoRA's `lora_alpha / r`), so that the learning
      rate you would give LoRA works here too (`benchmarks/results/finetune_classification.md`). The fields
      `initial_density`, `schedule*` and `prune_criterion` belong to weights mode and are ignored here.

    Args:
        mode (`str`, defaults to `"weights"`):
            `"weights"` (block-sparse weights) or `"updates"` (block-sparse trainable updates of frozen pretrained
            weights, for fine-tuning).
        target_modules (`list[str]` or `str`, defaults to `"all-linear"`):
            The modules to sparsify. A list of names matches a module whose qualified name equals an entry or ends
            with `"." + entry` (as in PEFT); a string is a regular expression matched against the full name with
            `re.fullmatch`; `"all-linear"` targets every `nn.Linear` and GPT-2 `Conv1D` except the output embedding
            (`lm_head`), classification heads (`classifier`, `score`) and the layers of PEFT adapters (on a PEFT
            model, the layers LoRA wraps are targets, its `lora_A` / `lora_B` are not).
        exclude_modules (`list[str]` or `str`, *optional*):
            Modules never to sparsify, with the same matching rules as `target_modules`.
        density (`float`, defaults to 0.25 in weights mode and 0.05 in updates mode):
            Fraction of active blocks, in (0, 1]: in weights mode the final fraction of the weights kept, in updates
            mode the fraction of each targeted layer's weights that is trained. With the uniform distribution each
            layer has exactly `max(1, round(density * n_blocks))` active blocks. With `compute_budget` and no
            `density`, the controller chooses it on the first step (see `compute_budget`).
        block_size (`int` or `tuple[int, int]`, defaults to 64 in weights mode and 16 in updates mode):
            Block shape (rows, cols) in the (out, in) weight layout; an int means square blocks. Larger blocks run
            faster, smaller blocks lose less quality; 64 is a good compromise on GPUs and CPUs alike for sparse
            weights. Updates mode trains a small share of each layer: 16 x 16 blocks (the smallest the Triton
            kernels take) spread it over many places, which learned better in the classification benchmark
            (`docs/benchmarks.md`).
        backend (`str`, defaults to `"auto"`):
            Kernel backend: `"triton"` (GPU kernels), `"torch"` (blocked PyTorch path, fast on a CPU),
            `"reference"` (masked dense matmul, the slow oracle used by tests) or `"auto"` (Triton for CUDA tensors
            when it is installed, the blocked PyTorch path otherwise).
        storage (`str`, defaults to `"auto"`):
            How weights mode stores a layer's weight: `"compact"` keeps only the active blocks (parameters, gradients
            and optimizer states take `density` of the dense memory, and no masking work remains); `"dense"` keeps the
            whole weight with zeros outside the mask; `"auto"` is compact whenever the number of blocks of each layer
            is fixed, i.e. with `schedule="constant"`, no `dense_tail` and the `uniform` or `erk` distribution (a
            gradual schedule prunes, a dense tail restores, the `global` distribution moves blocks between layers: all
            need dense storage). Checkpoints hold the dense weight either way. Updates mode always stores its
            trainable updates compactly.
        seed (`int`, defaults to 0):
            Seed of every random choice SDT makes (tie-breaking in the initial mask, random growth).
        initial_density (`float`, defaults to 1.0):
            Density of the mask that `get_sdt_model` builds, from which the schedule goes down to `density`. 1.0
            starts dense and prunes gradually, which loses least from a pretrained model (the fine-tuning default);
            set it to `density` to train sparse from the first step (the from-scratch setting).
        schedule (`str`, defaults to `"cubic"`):
            How the density goes from `initial_density` to `density` between `schedule_start` and `schedule_end`:
            `"cubic"` (Zhu & Gupta's gradual pruning: fast at first, while the network can recover), `"linear"`, or
            `"constant"` (`density` from the first step on).
        schedule_start (`float`, defaults to 0.0):
            Fraction of the training steps at which the density starts to fall.
        schedule_end (`float`, defaults to 0.5):
            Fraction of the training steps at which `density` is reached; the rest of training recovers at it.
        dense_tail (`float`, defaults to 0.0):
            Weights mode: the fraction of the training steps at the end that train the whole model dense again (a
            dense restoration phase, as MST's and SPDF's): every pruned block comes back at zero, with a fresh
            optimizer state, and the saved model is dense. In [0, 1), at most `1 - schedule_end`; 0 keeps the model
            sparse to the end. With `compute_budget` the planner counts the tail's dense steps (and so plans a lower
            density): in the byte-level pre-training benchmark a tail of 0.02 was level with none at budget 0.15 and
            longer tails were worse (`docs/benchmarks.md`).
        update_interval (`int`, defaults to 100 in weights mode and 20 in updates mode):
            Steps between drop/grow topology updates (RigL's 100: enough steps for grown blocks to prove useful;
            SpIEL's 20 for sparse fine-tuning, whose runs are short).
        drop_fraction (`float`, defaults to 0.3):
            Fraction of each layer's active blocks replaced at the first update, decayed with a cosine to 0 at
            `update_end` (RigL's 0.3).
        update_end (`float`, defaults to 0.75):
            Fraction of the training steps after which the topology is frozen (RigL's 75%), so the final network
            trains on a fixed structure.
        prune_criterion (`str`, defaults to `"magnitude"`):
            Block score for dropping and pruning: `"magnitude"` (Frobenius norm, free), `"taylor"` (|w * g| summed
            between updates) or `"wanda"` (|w| times the input-feature norm, tracked in the forward pass; strong for
            pretrained models).
        grow_criterion (`str`, defaults to `"random"` in updates mode or with `compute_budget`, else `"gradient"`):
            How blocks are grown: `"gradient"` (RigL: largest dense-gradient block norm, computed on update steps
            only) or `"random"` (SET). Random growth takes no dense weight gradient: at a compute budget it buys a
            higher density, and it trained better at budgets 0.3 and 0.15; in updates mode it also makes the first
            choice of blocks (SHiRA's random choice, in blocks) and, with 16 x 16 blocks, learned better than the
            gradient's choice in 64 x 64 blocks (`docs/benchmarks.md`).
        distribution (`str`, defaults to `"uniform"`):
            How the density is spread over layers: `"uniform"` (every layer at `density`: predictable savings),
            `"erk"` (Erdos-Renyi-Kernel: small layers denser, often more accurate but more FLOPs) or `"global"`
            (block scores compared across layers; weights mode only).
        selection_steps (`int`, defaults to 5):
            Updates mode: steps before each selection of blocks, over which gradient growth accumulates the dense
            weight gradients (SpIEL's 5). The first selection ends step `selection_steps - 1`; until then nothing
            is trained. Random growth (the default) accumulates nothing: `selection_steps=1` chooses at the first
            step.
        modules_to_save (`list[str]`, *optional*):
            Updates mode: modules trained densely and saved with the adapter, matched like `target_modules` (PEFT's
            field). By default the classification head (`classifier` or `score`) when the model has one.
        update_scale (`float`, defaults to `sqrt(0.2 / density)` in updates mode, 2.0 at density 0.05):
            Updates mode: the effective weight is `base + update_scale * updates`, as LoRA's `lora_alpha / r` scales
            its product. With Adam each trained weight moves by about `update_scale x learning rate` per step; few
            weights move, so each must move further than in full fine-tuning, and the fewer they are (the lower the
            density) the further: the default grows as 1 / sqrt(density). It is saved with the adapter. Ignored in
            weights mode (None there).
        compute_budget (`float`, *optional*):
            Weights mode: the share of the dense model's whole-model training FLOPs (the compute receipt,
            `sdt/train_flops_ratio`) the run may spend, in (0, 1]. On the first step the controller measures what
            the targeted layers take of a dense step and plans the schedule: cubic from dense at step 0 to `density`,
            ending at the latest step that keeps the receipt at the end within the budget. Without `density` it
            first chooses the highest density the budget affords (which leaves little for the prune: it ends early). A
            budget that cannot be met is an error that names the lowest one. The plan is saved with the controller's
            state and written into `model.config.sdt_config`.

    Example:
    >>> from hf_sdt import SDTConfig
    >>> config = SDTConfig(target_modules=["q_proj", "v_proj"], density=0.5, block_size=32)
    >>> config.block_shape
    (32, 32)
    >>> SDTConfig(mode="updates").density
    0.05
    """

    mode: str = field(
        default="weights",
        metadata={"help": f"{MODES}: block-sparse weights, or block-sparse updates of frozen pretrained weights."},
    )
    target_modules: list[str] | str | None = field(
        default=ALL_LINEAR,
        metadata={
            "help": "Modules to sparsify: a list of names (exact or suffix match), a regex (full match), "
            "or 'all-linear' for every nn.Linear / Conv1D except the output embedding."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules never to sparsify, matched like target_modules."},
    )
    density: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of active blocks per targeted layer, in (0, 1] (default 0.25 in weights mode, 0.05 "
            "in updates mode; with compute_budget, chosen by the planner when unset)."
        },
    )
    block_size: int | tuple[int, int] | None = field(
        default=None,
        metadata={
            "help": "Block shape (rows, cols) of the (out, in) weight; an int means square blocks (default 64 in "
            "weights mode, 16 in updates mode)."
        },
    )
    backend: str = field(
        default="auto",
        metadata={"help": f"Kernel backend, one of {BACKENDS}."},
    )
    storage: str = field(
        default="auto",
        metadata={
            "help": f"Weights-mode storage, one of {STORAGES}: 'compact' keeps only the active blocks (memory ~ "
            "density), 'dense' the whole weight; 'auto' is compact when every layer's block count is fixed "
            "(constant schedule, no dense_tail, uniform or erk distribution)."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of SDT's random choices (mask tie-breaking, random growth)."},
    )
    initial_density: float = field(
        default=1.0,
        metadata={
            "help": "Density at conversion, >= density: 1.0 starts dense (fine-tuning), = density starts sparse."
        },
    )
    schedule: str = field(default="cubic", metadata={"help": f"Density schedule, one of {SCHEDULES}."})
    schedule_start: float = field(
        default=0.0, metadata={"help": "Fraction of training steps at which the density starts to fall."}
    )
    schedule_end: float = field(
        default=0.5, metadata={"help": "Fraction of training steps at which the final density is reached."}
    )
    dense_tail: float = field(
        default=0.0,
        metadata={"help": "Weights mode: fraction of the steps at the end that train dense again (0: none)."},
    )
    update_interval: int | None = field(
        default=None,
        metadata={"help": "Steps between drop/grow topology updates (default 100 in weights mode, 20 in updates)."},
    )
    drop_fraction: float = field(
        default=0.3, metadata={"help": "Fraction of active blocks replaced at the first update (cosine decay)."}
    )
    update_end: float = field(
        default=0.75, metadata={"help": "Fraction of training steps after which the topology is frozen."}
    )
    prune_criterion: str = field(default="magnitude", metadata={"help": f"Block score, one of {PRUNE_CRITERIA}."})
    grow_criterion: str | None = field(
        default=None,
        metadata={
            "help": f"Growth rule, one of {GROW_CRITERIA} (default 'random' in updates mode and with compute_budget, "
            "else 'gradient')."
        },
    )
    distribution: str = field(default="uniform", metadata={"help": f"Density over layers, one of {DISTRIBUTIONS}."})
    selection_steps: int = field(
        default=5, metadata={"help": "Updates mode: steps of dense-gradient accumulation before each selection."}
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Updates mode: modules trained densely and saved with the adapter (default: the classifier "
            "head, if any)."
        },
    )
    update_scale: float | None = field(
        default=None,
        metadata={
            "help": "Updates mode: effective weight = base + update_scale * updates, like LoRA's lora_alpha / r "
            "(default sqrt(0.2 / density): 2.0 at density 0.05)."
        },
    )

    compute_budget: float | None = field(
        default=None,
        metadata={
            "help": "Weights mode: the share of the dense model's whole-model training FLOPs the run may spend, in "
            "(0, 1] (e.g. 0.15). The controller then plans the schedule (cubic from dense at step 0 to `density`, "
            "ending as late as the budget allows) so that the compute receipt ends at most at the budget; without "
            "`density`, it chooses the highest density the budget affords."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.block_size, list):
            self.block_size = tuple(self.block_size)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if self.mode not in MODES:
            raise ValueError(
                f"SDTConfig.mode must be one of {MODES}, got {self.mode!r}: 'updates' to fine-tune a pretrained "
                "model, 'weights' to train a sparse one."
            )
        for name, value in MODE_DEFAULTS[self.mode].items():
            if getattr(self, name) is None and not (name == "density" and self.plans_density):
                setattr(self, name, value)
        if self.grow_criterion is None:
            self.grow_criterion = "random" if self.compute_budget is not None else "gradient"
        if self.mode == "updates" and self.update_scale is None and _is_number(self.density) and self.density > 0:
            self.update_scale = math.sqrt(UPDATE_SCALE_DENSITY / self.density)
        self.validate()

    @property
    def plans_density(self) -> bool:
        """Whether the controller chooses the density (weights mode with `compute_budget` and no `density`)."""
        return self.mode == "weights" and self.compute_budget is not None and self.density is None

    @property
    def fixed_block_counts(self) -> bool:
        """Whether every layer keeps the same number of active blocks throughout training (weights mode)."""
        return self.schedule == "constant" and self.distribution != "global" and not self.dense_tail

    @property
    def compact_storage(self) -> bool:
        """Whether weights mode stores only the active blocks (see `storage`)."""
        return self.storage == "compact" or (self.storage == "auto" and self.fixed_block_counts)

    def validate(self) -> None:
        """Raise a `ValueError` that names the field when a value is out of range."""
        if not self.plans_density:  # else the controller chooses it
            if not _is_number(self.density):
                raise ValueError(f"SDTConfig.density must be a number in (0, 1], got {self.density!r}.")
            if not 0 < self.density <= 1:
                raise ValueError(
                    f"SDTConfig.density must be in (0, 1] (the fraction of active blocks), got {self.density}. "
                    "Use e.g. density=0.25 to keep a quarter of the blocks."
                )
        rows, cols = _as_pair(self.block_size)
        for value in (rows, cols):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"SDTConfig.block_size must be a positive int or a pair of positive ints, got {self.block_size!r}."
                )
        for name, choices in (
            ("backend", BACKENDS),
            ("schedule", SCHEDULES),
            ("prune_criterion", PRUNE_CRITERIA),
            ("grow_criterion", GROW_CRITERIA),
            ("distribution", DISTRIBUTIONS),
            ("storage", STORAGES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"SDTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.mode == "weights" and not self.plans_density and not self.density <= self.initial_density <= 1:
            raise ValueError(
                f"SDTConfig.initial_density must be in [density, 1] = [{self.density}, 1], got {self.initial_density}"
                ": the schedule only prunes. Use 1.0 to start dense or the density itself to start sparse."
            )
        for name in ("schedule_start", "schedule_end", "update_end", "drop_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SDTConfig.{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.schedule_start > self.schedule_end:
            raise ValueError(
                f"SDTConfig.schedule_start ({self.schedule_start}) must not exceed schedule_end ({self.schedule_end})."
            )
        self._validate_dense_tail()
        for name in ("update_interval", "selection_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SDTConfig.{name} must be a positive int, got {value!r}.")
        if self.storage == "compact" and self.mode == "weights" and not self.fixed_block_counts:
            raise ValueError(
                "SDTConfig.storage='compact' keeps a fixed number of blocks per layer, but "
                f"schedule={self.schedule!r} with distribution={self.distribution!r} and dense_tail={self.dense_tail} "
                "changes it: use schedule='constant' with the 'uniform' or 'erk' distribution and no dense_tail, or "
                "storage='auto' (dense here)."
            )
        if self.compute_budget is not None:
            self._validate_compute_budget()
        if self.update_scale is not None and not (_is_number(self.update_scale) and self.update_scale > 0):
            raise ValueError(
                f"SDTConfig.update_scale must be a positive number, got {self.update_scale!r} (the factor of the "
                "updates in the effective weight; leave it unset for the default)."
            )
        if self.mode == "updates" and self.distribution == "global":
            raise ValueError(
                "SDTConfig.distribution='global' moves blocks between layers, but in updates mode every layer keeps "
                "a fixed number of trainable blocks (its parameter shape never changes); use 'uniform' or 'erk'."
            )
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if name == "target_modules" and value is None:
                raise ValueError("SDTConfig.target_modules must be set: a list of names, a regex or 'all-linear'.")
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"SDTConfig.{name} is not a valid regular expression: {err}.") from err
            elif value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise ValueError(f"SDTConfig.{name} must be a list of strings or a regex string, got {value!r}.")

    def _validate_dense_tail(self) -> None:
        if not (_is_number(self.dense_tail) and 0 <= self.dense_tail < 1):
            raise ValueError(
                f"SDTConfig.dense_tail must be in [0, 1) (the fraction of the steps at the end that train dense), got "
                f"{self.dense_tail!r}."
            )
        if self.dense_tail and self.mode != "weights":
            raise ValueError(
                "SDTConfig.dense_tail restores weights mode's pruned blocks; updates mode keeps its pretrained "
                "weights dense already. Remove dense_tail (or train all weights: full fine-tuning)."
            )
        if self.dense_tail and self.schedule != "constant" and self.schedule_end > 1 - self.dense_tail:
            raise ValueError(
                f"SDTConfig.schedule_end ({self.schedule_end}) must not exceed 1 - dense_tail "
                f"({1 - self.dense_tail:g}): the prune must end before the dense tail starts. Lower one of them."
            )

    def _validate_compute_budget(self) -> None:
        if not (_is_number(self.compute_budget) and 0 < self.compute_budget <= 1):
            raise ValueError(
                f"SDTConfig.compute_budget must be in (0, 1] (a share of the dense model's training FLOPs, e.g. "
                f"0.15), got {self.compute_budget!r}."
            )
        if self.mode != "weights":
            raise ValueError(
                "SDTConfig.compute_budget plans weights mode's density schedule; updates mode computes the forward "
                "and dX densely, so its compute is set by `density` alone. Remove compute_budget."
            )
        if self.schedule != "cubic" or self.initial_density != 1.0 or self.schedule_start != 0.0:
            raise ValueError(
                "With SDTConfig.compute_budget the planner chooses the schedule (cubic from dense at step 0); leave "
                "schedule, initial_density and schedule_start at their defaults ('cubic', 1.0, 0.0)."
            )

    @property
    def block_shape(self) -> tuple[int, int]:
        """The block size as a (rows, cols) pair."""
        return _as_pair(self.block_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        data = asdict(self)
        if isinstance(data["block_size"], tuple):
            data["block_size"] = list(data["block_size"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDTConfig:
        """Build a config from `to_dict()` output; unknown keys are an error that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SDTConfig field(s) {unknown}; known fields are {sorted(known)}.")
        if data.get("mode") == "updates" and "update_scale" not in data:
            data = {**data, "update_scale": 1.0}  # saved before the field existed: trained unscaled
        return cls(**data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the config as `sdt_config.json` in `save_directory` and return the file path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=2, sort_keys=True)
            handle.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> SDTConfig:
        """Read a config written by `save_pretrained` (a folder or the JSON file itself)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"No {CONFIG_NAME} found at {path}; save one with SDTConfig.save_pretrained().")
        with open(file, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"SDTConfig.block_size must be an int or a (rows, cols) pair, got {block_size!r}.")
        return block_size[0], block_size[1]
    return block_size, block_size
