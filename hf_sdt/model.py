"""Attach SDT to a model: swap its target layers (see `hf_sdt.targets`) for SDT layers in place, undo it,
summarise it."""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .config import SDTConfig
from .layer import SDTCompactLinear, SDTLayer, SDTLinear
from .masks import block_element_counts, block_grid, block_norms, topk_block_mask
from .schedule import initial_density, target_block_counts
from .targets import check_not_tied, find_modules_to_save, find_target_modules
from .topology import global_block_counts
from .update_layer import SDTUpdateLinear

# SDT layers whose schedule a controller runs (`mark_controlled`); a model that trains while none of its SDT layers
# is here gets one warning that its schedule never runs.
_CONTROLLED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def mark_controlled(layers: Iterable[nn.Module]) -> None:
    """Record that a controller (`SDTController`, driven by `SDTTrainer` / `SDTCallback` or a plain loop) runs the
    schedule and topology updates of these SDT layers, so that their model trains without the warning of
    `UncontrolledTrainingWarning`."""
    _CONTROLLED.update(layers)


class UncontrolledTrainingWarning:
    """A forward pre-hook that `get_sdt_model` puts on the converted model: at its first training forward (one that
    builds a graph), if no controller runs the schedule of its SDT layers, it warns once that SDT's schedule
    (pruning, drop/grow, updates mode's selection) will not happen, and how to run it; then it removes itself."""

    def __init__(self, layers: list[nn.Module], config: SDTConfig):
        self.layers = weakref.WeakSet(layers)
        self.config = config
        self.handle = None

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self.handle.remove()
        if not sdt_layers(module) or any(layer in _CONTROLLED for layer in self.layers):
            return  # unloaded since, or driven by a controller
        config = self.config
        if config.mode == "updates":
            missed = "the trainable blocks stay the random ones they started as: no gradient selection, no drop/grow"
        elif config.plans_density or (config.schedule != "constant" and config.initial_density > config.density):
            goal = "the density the compute budget plans" if config.plans_density else config.density
            missed = f"the density stays at {config.initial_density} and nothing is pruned towards {goal}"
        else:
            missed = "the active blocks never move: no drop/grow"
        warnings.warn(
            f"This SDT model is training without an SDT controller, so {missed}. Train it with hf_sdt.SDTTrainer "
            "(or add hf_sdt.SDTCallback to another Trainer), or call hf_sdt.SDTController's begin_step / "
            "before_optimizer_step / after_optimizer_step in your loop (this warning is shown once).",
            stacklevel=2,
        )


def get_sdt_model(
    model: nn.Module,
    config: SDTConfig,
    masks: dict[str, torch.Tensor] | None = None,
    block_ids: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Swap every targeted layer of `model` for an SDT layer in place and return the same model object.

    The config is stored as a dict in `model.config.sdt_config`, so it survives `save_pretrained`.

    Weights mode: each targeted layer becomes an `SDTCompactLinear` (only the active blocks stored) when
    `config.compact_storage` (the number of blocks is fixed: `schedule="constant"`, `uniform` or `erk`
    distribution), an `SDTLinear` (dense storage) otherwise. The initial mask keeps the blocks of largest Frobenius
    norm (so a pretrained model loses as little as possible) at the schedule's starting density
    (`initial_density`, or `density` with `schedule="constant"`), spread over layers by `distribution`: with
    `"uniform"` each layer keeps exactly `max(1, round(d * n_blocks))` blocks. The other weights are set to exactly
    zero. `masks` (layer name -> block mask) restores saved masks instead, as `hf_sdt.from_pretrained` does; their
    names must be exactly the targeted layers and their shapes must fit the weights (with compact storage,
    `block_ids` may give each mask's blocks in slot order).

    Updates mode: each targeted layer becomes an `SDTUpdateLinear` with `max(1, round(density * n_blocks))`
    trainable blocks (uniform; ERK spreads them by layer shape); every other parameter is frozen except those of
    `modules_to_save`. The blocks start at random (seeded by `config.seed`): `SDTController` and `SDTTrainer`
    choose them afresh (by `grow_criterion`) after `selection_steps` steps, while a plain loop without the controller
    trains these random blocks (a static mask, as PEFT's SHiRA). `block_ids` (layer name -> (n,) block ids in slot
    order) restores saved blocks instead, as `hf_sdt.from_pretrained` does for adapters.

    Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2))
    >>> model = get_sdt_model(model, SDTConfig(density=0.5, block_size=16, schedule="constant"))
    >>> round(sparsity_summary(model)["density"], 2)
    0.5
    >>> model = get_sdt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2)),
    ...                       SDTConfig(mode="updates", density=0.25, block_size=16))
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # a quarter of the 49152 targeted weights
    12288
    """
    if sdt_layers(model):
        raise ValueError(
            "This model already has SDT layers (get_sdt_model was applied); call hf_sdt.unload(model) first "
            "to convert it again with another config."
        )
    targets = find_target_modules(model, config)
    block = config.block_shape
    layers = [model.get_submodule(name) for name in targets]
    for name, layer in zip(targets, layers, strict=True):
        check_not_tied(model, name, layer)
    weights = [layer.weight if isinstance(layer, nn.Linear) else layer.weight.t() for layer in layers]  # (out, in)
    shapes = [tuple(weight.shape) for weight in weights]
    counts = None  # blocks per layer at the final density: fixed, except with the global distribution
    if config.distribution != "global" and not config.plans_density:  # planned: dense until the first step
        counts = target_block_counts(shapes, block, config.density, config.distribution)
        if masks is None and block_ids is None:  # a saved model being loaded warned when it was converted
            _check_some_layer_is_sparse(targets, shapes, config, counts)
            _warn_if_density_rounds(shapes, block, config.density, counts)
    stored = config.to_dict()
    if config.mode == "updates":
        dense_modules = find_modules_to_save(model, config)
        stored["modules_to_save"] = dense_modules
        if block_ids is not None:
            _check_saved_names(block_ids, targets, "block ids")
            ids = [block_ids[name] for name in targets]
        else:
            ids = _random_block_ids(shapes, block, counts, config.seed)
        model.requires_grad_(False)
        for name in dense_modules:
            model.get_submodule(name).requires_grad_(True)
        new_layers = [
            SDTUpdateLinear(layer, block, layer_ids, config.backend, config.update_scale)
            for layer, layer_ids in zip(layers, ids, strict=True)
        ]
    else:
        if masks is not None:
            _check_saved_masks(masks, targets, shapes, block)
            chosen = [masks[name].bool() for name in targets]
        else:
            chosen = _initial_masks(weights, config)
        if config.compact_storage:
            slot_ids = [None if block_ids is None else block_ids.get(name) for name in targets]
            new_layers = [
                SDTCompactLinear(layer, block, mask, config.backend, ids)
                for layer, mask, ids in zip(layers, chosen, slot_ids, strict=True)
            ]
        else:
            new_layers = [
                SDTLinear(layer, block, mask, config.backend) for layer, mask in zip(layers, chosen, strict=True)
            ]
    for name, new_layer in zip(targets, new_layers, strict=True):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new_layer)
    warning = UncontrolledTrainingWarning(new_layers, config)
    warning.handle = model.register_forward_pre_hook(warning)
    if hasattr(model, "config"):
        model.config.sdt_config = stored
    return model


def _check_some_layer_is_sparse(targets: list[str], shapes: list[tuple[int, int]], config: SDTConfig, counts) -> None:
    """Refuse a density below 1 that no targeted layer can honour: blocks so large that each layer keeps all of its
    few blocks (at least one per layer), so the run would go on fully dense. Names a block size that works."""

    def dense_layers(block: tuple[int, int], counts: list[int]) -> list[bool]:
        return [count == rows * cols for count, (rows, cols) in zip(counts, _grids(shapes, block), strict=True)]

    block = config.block_shape
    if config.density >= 1 or not all(dense_layers(block, counts)):
        return
    side = 2 ** ((max(block) - 1).bit_length() - 1)  # from the largest power of two below the block, halved
    while side > 1 and any(dense_layers((side, side), target_block_counts(shapes, (side, side), config.density,
                                                                          config.distribution))):  # fmt: skip
        side //= 2
    names = ", ".join(f"{name} ({rows} x {cols})" for name, (rows, cols) in zip(targets[:3], shapes[:3], strict=True))
    raise ValueError(
        f"SDTConfig.density={config.density} cannot be honoured with blocks of {block}: every targeted layer has so "
        f"few blocks that it keeps all of them, and the run would be fully dense ({names}"
        f"{', ...' if len(targets) > 3 else ''}). Use smaller blocks, e.g. block_size={side}."
    )


def _grids(shapes: list[tuple[int, int]], block) -> list[tuple[int, int]]:
    return [block_grid(shape, block) for shape in shapes]


def _warn_if_density_rounds(shapes: list[tuple[int, int]], block, density: float, counts: list[int]) -> None:
    """Warn when whole blocks (`counts` per layer) cannot come within 5% of `density` (small layers, large blocks)."""
    grids = _grids(shapes, block)
    sizes = [rows * cols for rows, cols in shapes]
    achieved = sum(c / (g[0] * g[1]) * n for c, g, n in zip(counts, grids, sizes, strict=True)) / sum(sizes)
    if abs(achieved - density) > 0.05 * density:
        fewest = min(g[0] * g[1] for g in grids)
        warnings.warn(
            f"SDT density {density} becomes {achieved:.4f} with blocks of {block}: a layer keeps a whole "
            f"number of blocks, at least one, and the smallest targeted layer has only {fewest}. Use smaller blocks "
            "for a density closer to the one asked for.",
            stacklevel=3,
        )


def _random_block_ids(shapes: list[tuple[int, int]], block, counts: list[int], seed: int) -> list[torch.Tensor]:
    """Seeded random placeholder blocks of updates mode, `counts` per layer."""
    generator = torch.Generator().manual_seed(seed)
    grids = [block_grid(shape, block) for shape in shapes]
    return [
        torch.randperm(rows * cols, generator=generator)[:count]
        for (rows, cols), count in zip(grids, counts, strict=True)
    ]


def _initial_masks(weights: list[torch.Tensor], config: SDTConfig) -> list[torch.Tensor]:
    """The largest-norm blocks of each (out, in) weight at the schedule's starting density and distribution."""
    block = config.block_shape
    scores = [block_norms(weight, block) for weight in weights]
    shapes = [tuple(weight.shape) for weight in weights]
    if config.distribution == "global":
        total = max(len(weights), round(initial_density(config) * sum(score.numel() for score in scores)))
        candidates = [torch.ones_like(score, dtype=torch.bool) for score in scores]
        counts = global_block_counts(scores, candidates, [block_element_counts(block, s) for s in shapes], total)
    else:
        counts = target_block_counts(shapes, block, initial_density(config), config.distribution)
    generator = torch.Generator().manual_seed(config.seed)
    return [topk_block_mask(score, count, generator) for score, count in zip(scores, counts, strict=True)]


def _check_saved_names(saved: dict[str, torch.Tensor], targets: list[str], what: str) -> None:
    missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"The saved {what} do not match the layers the SDT config targets: missing {what} for {missing[:5]}, "
            f"{what} for layers it does not target {unexpected[:5]}. Was the checkpoint saved from this model class "
            "with this sdt_config?"
        )


def _check_saved_masks(masks: dict[str, torch.Tensor], targets: list[str], shapes: list, block) -> None:
    _check_saved_names(masks, targets, "masks")
    for name, shape in zip(targets, shapes, strict=True):
        if tuple(masks[name].shape) != block_grid(shape, block):
            raise ValueError(
                f"The saved mask of layer {name!r} has shape {tuple(masks[name].shape)}, but its {shape[0]} x "
                f"{shape[1]} weight with blocks of {block} needs {block_grid(shape, block)}."
            )


def sdt_layers(model: nn.Module) -> dict[str, SDTLayer]:
    """The SDT layers (`SDTLinear`, `SDTCompactLinear` or `SDTUpdateLinear`) of `model` by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, SDTLayer)}


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Swap every SDT layer back to its original class and drop `sdt_config`.

    Weights mode: the weights keep their zeros. Updates mode: the pretrained weights come back (PEFT's `unload`),
    or with `merge=True` the updates are merged into them (see `merge_and_unload`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = get_sdt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), SDTConfig())
        >>> sdt_layers(unload(model))
        {}
    """
    for name, layer in sdt_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.unload(merge=merge))
    if hasattr(model, "config") and hasattr(model.config, "sdt_config"):
        del model.config.sdt_config
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """A plain transformers model (base + updates) from an updates-mode SDT model, trainable as a whole again;
    `save_pretrained` then writes a checkpoint that vanilla `from_pretrained` loads.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> config = SDTConfig(mode="updates", block_size=16)
        >>> model = get_sdt_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), config)
        >>> type(merge_and_unload(model).transformer.h[0].mlp.c_fc).__name__
        'Conv1D'
    """
    model = unload(model, merge=True)
    model.requires_grad_(True)
    return model


@contextlib.contextmanager
def disable_updates(model: nn.Module) -> Iterator[nn.Module]:
    """Run an updates-mode model as its pretrained base inside the block (PEFT's `disable_adapter()`): every
    `SDTUpdateLinear` computes with its frozen pretrained weight, the trained updates untouched; DPO's reference
    log-probs come from here, with no second copy of the model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
        >>> tokens = torch.arange(8)[None]
        >>> before = base(tokens).logits
        >>> model = get_sdt_model(base, SDTConfig(mode="updates", block_size=16))
        >>> _ = [layer.sdt_updates.data.fill_(0.1) for layer in sdt_layers(model).values()]
        >>> with disable_updates(model):
        ...     torch.allclose(model(tokens).logits, before)
        True
        >>> torch.allclose(model(tokens).logits, before)
        False
    """
    layers = [layer for layer in sdt_layers(model).values() if isinstance(layer, SDTUpdateLinear)]
    if not layers:
        raise ValueError("disable_updates needs an updates-mode SDT model (SDTConfig(mode='updates')).")
    scales = [layer.update_scale for layer in layers]
    try:
        for layer in layers:
            layer.set_update_scale_(0.0)
        yield model
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.set_update_scale_(scale)


def unused_trainable_parameters(model: nn.Module) -> list[str] | None:
    """The names of the trainable parameters that a forward pass of the model's `dummy_inputs` leaves out of the
    autograd graph, or None when the model has no dummy inputs or cannot run them (then nothing is known).

    DDP needs `find_unused_parameters=True` only when this is not empty: SDT layers use every parameter they hold
    (their inactive blocks are not parameters), so `SDTTrainer` sets the flag from this list instead of
    transformers' cautious `True`, which costs a graph traversal per step and a warning. The forward runs in
    eval mode (no dropout, so no random numbers drawn) on a batch of 3 x 5 tokens; the modes are restored after.
    A model whose parameters in use change from step to step gets None too: one that drops layers at random in
    training (a `*layerdrop` config field above 0) or routes tokens to experts (a `*experts` field above 1).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2))
        >>> unused_trainable_parameters(model)
        []
        >>> model.transformer.h[0].unused = nn.Linear(4, 4)
        >>> unused_trainable_parameters(model)
        ['transformer.h.0.unused.weight', 'transformer.h.0.unused.bias']
    """
    dummy_inputs = getattr(model, "dummy_inputs", None)
    if not isinstance(dummy_inputs, dict) or _parameter_use_varies(getattr(model, "config", None)):
        return None
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in dummy_inputs.items()}
    if "input_ids" in inputs and "attention_mask" in inspect.signature(model.forward).parameters:
        # the dummy ids hold zeros, often the pad id: without a mask transformers would warn about padding
        inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    try:
        model.eval()
        with torch.enable_grad():
            outputs = model(**inputs)
    except Exception:  # a model whose dummy inputs do not fit its forward: nothing is known
        return None
    finally:
        for module, training in modes.items():
            module.train(training)
    values = outputs.values() if isinstance(outputs, dict) else outputs
    reached = _graph_leaves([value for value in values if torch.is_tensor(value) and value.grad_fn is not None])
    return [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in reached]


def _parameter_use_varies(config) -> bool:
    """Whether a transformers config describes a model that uses other parameters at other training steps."""
    fields = vars(config) if config is not None else {}
    return any(
        isinstance(value, (int, float))
        and ((name.endswith("layerdrop") and value > 0) or (name.endswith("experts") and value > 1))
        for name, value in fields.items()
    )


def _graph_leaves(tensors: list[torch.Tensor]) -> set[int]:
    """The ids of the leaf tensors that the autograd graphs of `tensors` accumulate gradients into."""
    leaves, seen = set(), set()
    stack = [tensor.grad_fn for tensor in tensors]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def weighted_mean(layers, attribute: str) -> float:
    """Mean of a per-layer value (`density`, `flops_fraction`) over SDT layers, weighted by their weight sizes."""
    layers = list(layers)
    sizes = [layer.out_features * layer.in_features for layer in layers]
    return sum(getattr(layer, attribute) * size for layer, size in zip(layers, sizes, strict=True)) / sum(sizes)


def sparsity_summary(model: nn.Module) -> dict[str, Any]:
    """Density of the SDT layers of `model` and the multiply-adds their block-sparse products need.

    Returns a dict with `mode`, `storage` (`"compact"`: only the active blocks or trainable updates are stored,
    `"dense"`: whole weights with zeros outside the masks), `density` (active, or in updates mode trainable,
    fraction of all targeted weight elements), `linear_flops_ratio` (sparse / dense multiply-adds of the targeted
    layers for the forward and both gradients: the active fraction in weights mode, (2 + density) / 3 in updates
    mode, whose forward and dX are dense) and `layers`, one dict per layer with `name`, `shape` (out, in),
    `block_size`, `active_blocks`, `total_blocks` and `density`.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2))
        >>> model = get_sdt_model(model, SDTConfig(density=0.5, block_size=32, schedule="constant"))
        >>> sparsity_summary(model)["layers"][0]["active_blocks"]
        6
    """
    layers = []
    for name, layer in sdt_layers(model).items():
        layers.append(
            {
                "name": name,
                "shape": (layer.out_features, layer.in_features),
                "block_size": layer.block_size,
                "active_blocks": int(layer.block_mask.sum()),
                "total_blocks": layer.block_mask.numel(),
                "density": layer.density,
            }
        )
    if not layers:
        raise ValueError("This model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)).")
    modules = sdt_layers(model).values()
    first = next(iter(modules))
    return {
        "mode": "updates" if isinstance(first, SDTUpdateLinear) else "weights",
        "storage": "dense" if type(first) is SDTLinear else "compact",
        "density": weighted_mean(modules, "density"),
        "linear_flops_ratio": weighted_mean(modules, "flops_fraction"),
        "layers": layers,
    }


def print_sparsity_summary(model: nn.Module, file: Any | None = None) -> None:
    """Print `sparsity_summary(model)` as a table, one row per SDT layer and a total."""
    summary = sparsity_summary(model)
    width = max(len(layer["name"]) for layer in summary["layers"])
    rows = [f"{'layer':<{width}}  {'shape':>13}  {'block':>9}  {'blocks':>13}  {'density':>7}"]
    for layer in summary["layers"]:
        shape = "{} x {}".format(*layer["shape"])
        block = "{}x{}".format(*layer["block_size"])
        blocks = f"{layer['active_blocks']}/{layer['total_blocks']}"
        rows.append(f"{layer['name']:<{width}}  {shape:>13}  {block:>9}  {blocks:>13}  {layer['density']:>7.3f}")
    rows.append(
        f"{len(summary['layers'])} SDT layers ({summary['mode']} mode, {summary['storage']} storage), density "
        f"{summary['density']:.4f}, linear FLOPs ratio {summary['linear_flops_ratio']:.4f} of dense"
    )
    if summary["storage"] == "dense":
        rows.append(
            "Dense storage: whole weights, zero outside the masks (a gradual schedule or the global distribution "
            "changes the number of blocks); schedule='constant' with 'uniform' or 'erk' stores only active blocks."
        )
    print("\n".join(rows), file=file)
