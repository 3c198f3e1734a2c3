"""Save, load and push SDT models: dense (vanilla-transformers compatible) and packed formats, adapters, and cards.

- Adapter (updates mode): `save_pretrained(model, dir)` writes `sdt_adapter_config.json` (the SDT config and the
  base model's id) and `sdt_adapter.safetensors` (each layer's compact updates and block ids, and the tensors of
  `modules_to_save`); `from_pretrained(dir_or_repo_id)` loads the base model and applies it exactly.
- Dense format: transformers' own files (weights with exact zeros, `sdt_config` inside `config.json`), which vanilla
  `from_pretrained` loads silently, and the block masks in `sdt_masks.safetensors`, which only hf_sdt reads.
  (`model.save_pretrained(dir)` also works, with the masks inside the weights file: vanilla transformers then
  reports them as unexpected keys.)
- Packed format: `save_pretrained(model, dir, packed=True)` writes `config.json` and `sdt_packed.safetensors`, in
  which each SDT weight keeps only its active elements (`<layer>.weight.sdt_active`) next to its mask.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from .blocks import check_block_ids
from .config import SDTConfig
from .layer import SDTUpdateLinear
from .masks import block_grid
from .model import find_target_modules, get_sdt_model, sdt_layers, sparsity_summary
from .sharding import any_sharded, full_state_dict, local_window, shard_like

# Never `adapter_config.json`: transformers would then try to load a PEFT adapter.
ADAPTER_CONFIG_NAME = "sdt_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "sdt_adapter.safetensors"
ADAPTER_FORMAT = "hf_sdt-adapter-1"
UPDATES_SUFFIX = ".sdt_updates"
BLOCK_IDS_SUFFIX = ".sdt_block_ids"
MASKS_NAME = "sdt_masks.safetensors"
MASKS_FORMAT = "hf_sdt-masks-1"
PACKED_WEIGHTS_NAME = "sdt_packed.safetensors"
PACKED_FORMAT = "hf_sdt-packed-1"
ACTIVE_SUFFIX = ".weight.sdt_active"
MASK_SUFFIX = ".sdt_mask"
CARD_IMAGES = ("sdt_density.png", "sdt_masks.png")


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    packed: bool = False,
    base_model: str | None = None,
    revision: str | None = None,
    **kwargs,
) -> None:
    """Save an SDT model.

    Updates mode: only the adapter, whose size is about `density` times the targeted weights' fp32 bytes (plus the
    block ids and `modules_to_save`), with the base model's id or folder (`base_model`, default the model's
    `config._name_or_path`) and `revision`, so that `hf_sdt.from_pretrained(save_directory)` can rebuild it.

    Weights mode: dense (transformers' files, loadable by vanilla transformers, plus `sdt_masks.safetensors`;
    `kwargs`, e.g. `state_dict`, go to `model.save_pretrained`) or `packed`, where the targeted weights take about
    `density` of their dense bytes and only `hf_sdt.from_pretrained` can read them.

    Under FSDP2, call it on every process: the shards are gathered (`state_dict` defaults to the gathered
    `model.state_dict()`) and rank 0 writes (or the processes given `is_main_process=True`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_sdt import SDTConfig, get_sdt_model
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64))
        >>> model = get_sdt_model(model, SDTConfig(density=0.25, block_size=16, schedule="constant"))
        >>> save_pretrained(model, tempfile.mkdtemp(), packed=True)
    """
    layers = sdt_layers(model)
    if not layers:
        raise ValueError("This model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)).")
    state = kwargs.pop("state_dict", None)
    state = full_state_dict(model) if state is None else state
    kwargs.setdefault("is_main_process", not any_sharded(model) or dist.get_rank() == 0)
    if not kwargs["is_main_process"]:
        return
    if SDTConfig.from_dict(model.config.sdt_config).mode == "updates":
        _save_adapter(model, state, str(save_directory), base_model, revision)
        return
    if not packed:
        _save_dense(model, state, str(save_directory), **kwargs)
        return
    os.makedirs(save_directory, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as transformers' own save_pretrained records it
    model.config.save_pretrained(save_directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        layer_name = key.rpartition(".")[0]
        if key.endswith(".weight") and layer_name in layers:
            tensors[layer_name + ACTIVE_SUFFIX] = value[layers[layer_name].storage_element_mask()].contiguous()  # (n,)
        elif value.untyped_storage().data_ptr() not in storages:  # tied weights are saved once and re-tied
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value.contiguous()
    save_file(tensors, os.path.join(save_directory, PACKED_WEIGHTS_NAME), metadata={"format": PACKED_FORMAT})


def _save_dense(model: nn.Module, state: dict[str, torch.Tensor], directory: str, **kwargs) -> None:
    state = dict(state)
    topology = (MASK_SUFFIX, BLOCK_IDS_SUFFIX)  # masks, and the slot order of compact storage
    masks = {key: state.pop(key).contiguous().cpu() for key in list(state) if key.endswith(topology)}
    model.save_pretrained(directory, state_dict=state, **kwargs)
    save_file(masks, os.path.join(directory, MASKS_NAME), metadata={"format": MASKS_FORMAT})


def load_checkpoint_(model: nn.Module, folder: str) -> None:
    """Load a checkpoint folder saved by `save_pretrained` (a Trainer checkpoint, say) into `model`, an SDT model of
    the same architecture and mode: weights and masks, or in updates mode the adapter. Checked before it is applied.

    Example:
        >>> load_checkpoint_(trainer.model, "out/checkpoint-500")  # doctest: +SKIP
    """
    if SDTConfig.from_dict(model.config.sdt_config).mode == "updates":
        from_pretrained(folder, base_model=model)
        return
    expected = model.state_dict()
    # The slot order of compact storage means nothing to a model converted with dense storage.
    state = {k: v for k, v in _saved_tensors(folder).items() if k in expected or not k.endswith(BLOCK_IDS_SUFFIX)}
    missing = set(expected) - set(state) - _tied_keys(model)
    wrong = [key for key in state if key not in expected or expected[key].shape != state[key].shape]
    if missing or wrong:
        raise ValueError(
            f"The checkpoint in {folder} does not fit this {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unknown or of another shape {wrong[:5]}."
        )
    model.load_state_dict({key: shard_like(value, expected[key]) for key, value in state.items()}, strict=False)


def _save_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str, base_model: str | None, revision: str | None
) -> None:
    os.makedirs(directory, exist_ok=True)
    sdt_config = model.config.sdt_config
    tensors = {}
    for name in sdt_layers(model):
        tensors[name + UPDATES_SUFFIX] = state[name + UPDATES_SUFFIX]  # (n, block_rows, block_cols)
        tensors[name + BLOCK_IDS_SUFFIX] = state[name + BLOCK_IDS_SUFFIX]  # (n,)
    for module_name in sdt_config["modules_to_save"]:
        tensors.update({key: value for key, value in state.items() if key.startswith(module_name + ".")})
    tensors = {key: value.detach().contiguous() for key, value in tensors.items()}
    save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(directory, ADAPTER_WEIGHTS_NAME),
              metadata={"format": ADAPTER_FORMAT})  # fmt: skip
    description = {
        "format": ADAPTER_FORMAT,
        "base_model_name_or_path": base_model or getattr(model.config, "_name_or_path", None) or None,
        "revision": revision,
        "architectures": [type(model).__name__],
        "layer_shapes": {name: [layer.out_features, layer.in_features] for name, layer in sdt_layers(model).items()},
        "sdt_config": sdt_config,
    }
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(description, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _read_safetensors(path: str, suffix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors whose names end with `suffix` (all by default) and the metadata of a safetensors file; an
    unreadable file is an error that names it."""
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.endswith(suffix)}
            return tensors, handle.metadata() or {}
    except Exception as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(error).__name__}: {error}); it is corrupt or "
            "incomplete (an interrupted save or download?): save or download it again."
        ) from error


def _load_adapter(folder: str, base_model, model_class, kwargs) -> nn.Module:
    config_path = os.path.join(folder, ADAPTER_CONFIG_NAME)
    try:
        with open(config_path, encoding="utf-8") as handle:
            description = json.load(handle)
        sdt_config = SDTConfig.from_dict(description["sdt_config"])
    except (ValueError, KeyError) as error:
        raise ValueError(f"{config_path} is not a valid hf_sdt adapter config ({error}).") from error
    tensors, metadata = _read_safetensors(os.path.join(folder, ADAPTER_WEIGHTS_NAME))
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{os.path.join(folder, ADAPTER_WEIGHTS_NAME)} is not an hf_sdt adapter ({ADAPTER_FORMAT}).")
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        source = base_model or description.get("base_model_name_or_path")
        if not source:
            raise ValueError(
                f"The adapter in {folder} records no base model; pass base_model= (a Hub id, a folder or a model)."
            )
        revision = None if base_model else description.get("revision")
        cls = _model_class(description.get("architectures"), model_class)
        try:
            model = cls.from_pretrained(source, **({"revision": revision} if revision else {}), **kwargs)
        except OSError as error:
            raise OSError(
                f"The adapter's base model {source!r} could not be loaded ({error}). Offline, pass base_model= with "
                "the folder of a local copy."
            ) from error
    shapes = {name: tuple(shape) for name, shape in description.get("layer_shapes", {}).items()}
    apply_adapter_(model, sdt_config, tensors, source=folder, shapes=shapes)
    return model


def apply_adapter_(
    model: nn.Module,
    sdt_config: SDTConfig,
    tensors: dict[str, torch.Tensor],
    source: str,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Apply adapter tensors (`<layer>.sdt_updates`, `<layer>.sdt_block_ids`, `modules_to_save` tensors) to `model`,
    converting it first if it has no SDT layers. Everything is checked before the model is touched, so an adapter
    for another base model (names or shapes differ; `shapes` holds the (out, in) of each layer it was saved
    from) raises and leaves the model as it was.

    Example:
        >>> apply_adapter_(model, SDTConfig(mode="updates"), tensors, "adapter/")  # doctest: +SKIP
    """
    converted = bool(sdt_layers(model))
    targets = list(sdt_layers(model)) if converted else find_target_modules(model, sdt_config)
    saved = {key[: -len(UPDATES_SUFFIX)] for key in tensors if key.endswith(UPDATES_SUFFIX)}
    if saved != set(targets):
        missing, unexpected = sorted(set(targets) - saved), sorted(saved - set(targets))
        raise ValueError(
            f"The adapter from {source} does not fit {type(model).__name__}: no updates for {missing[:5]}, updates "
            f"for layers it does not have {unexpected[:5]}. Is it an adapter for another base model?"
        )
    block = sdt_config.block_shape
    ids = {}
    for name in targets:
        layer = model.get_submodule(name)
        shape = _out_in_shape(layer)
        ids[name] = tensors.get(name + BLOCK_IDS_SUFFIX, torch.empty(0, 0))
        try:
            if shapes and tuple(shapes.get(name, shape)) != shape:
                raise ValueError(f"it was saved from a {shapes[name][0]} x {shapes[name][1]} layer")
            check_block_ids(ids[name], block_grid(shape, block))
            expected = (ids[name].numel(), *block)
            if tuple(tensors[name + UPDATES_SUFFIX].shape) != expected:
                raise ValueError(f"updates of shape {tuple(tensors[name + UPDATES_SUFFIX].shape)}, not {expected}")
            if converted and not isinstance(layer, SDTUpdateLinear):
                raise ValueError("the model was converted in weights mode; load the adapter onto its base model")
            if converted and (layer.block_size != block or layer.sdt_updates.shape != expected):
                raise ValueError(f"the model's layer has {layer.sdt_updates.shape[0]} blocks of {layer.block_size}")
        except ValueError as error:
            raise ValueError(
                f"The adapter from {source} does not fit layer {name!r} ({shape[0]} x {shape[1]}, blocks of {block}): "
                f"{error}. Is it an adapter for another base model?"
            ) from error
    state = model.state_dict()
    dense = {key: value for key, value in tensors.items() if not key.endswith((UPDATES_SUFFIX, BLOCK_IDS_SUFFIX))}
    for key, value in dense.items():
        if key not in state or state[key].shape != value.shape:
            found = "no such tensor" if key not in state else f"shape {tuple(state[key].shape)}"
            raise ValueError(
                f"The adapter from {source} holds {key!r} of shape {tuple(value.shape)}; {type(model).__name__} has "
                f"{found}. Is it an adapter for another base model?"
            )
    if not converted:
        get_sdt_model(model, sdt_config, block_ids=ids)
    with torch.no_grad():
        for name, layer in sdt_layers(model).items():
            layer.move_blocks_(torch.arange(ids[name].numel(), device=layer.sdt_block_ids.device), ids[name])
            layer.sdt_updates.copy_(shard_like(tensors[name + UPDATES_SUFFIX], layer.sdt_updates))
            layer.materialize_()  # now: a layer sharded by FSDP2 gathers its weight from the shards again in backward
        model.load_state_dict({key: shard_like(value, state[key]) for key, value in dense.items()}, strict=False)


def _out_in_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or SDT layer, or of a GPT-2 Conv1D (whose weight is (in, out))."""
    if hasattr(layer, "out_features"):
        return layer.out_features, layer.in_features
    return layer.weight.shape[1], layer.weight.shape[0]


def _resolve(repo_id_or_path: str, **hub_kwargs) -> str:
    if os.path.isdir(repo_id_or_path):
        return str(repo_id_or_path)
    try:
        return snapshot_download(repo_id_or_path, **hub_kwargs)
    except Exception as error:
        raise OSError(
            f"{repo_id_or_path!r} is neither a local folder nor a Hub repository that could be downloaded "
            f"({type(error).__name__}: {error}). Offline, pass the path of a folder saved with save_pretrained."
        ) from error


def _model_class(architectures: list[str] | None, model_class):
    if model_class is not None:
        return model_class
    for architecture in architectures or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    raise ValueError(
        f"Cannot tell the model class from architectures={architectures}; pass model_class=, e.g. "
        "transformers.AutoModelForCausalLM."
    )


def _saved_tensors(folder: str, suffix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose names end with `suffix` (all by default) in a folder's safetensors files (single or sharded,
    `sdt_masks.safetensors` included), by name without the suffix."""
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    found = {}
    for name in files:
        tensors, _ = _read_safetensors(os.path.join(folder, name), suffix)
        found.update({key[: len(key) - len(suffix)]: value for key, value in tensors.items()})
    return found


def from_pretrained(repo_id_or_path: str, model_class=None, base_model=None, **kwargs) -> nn.Module:
    """Load an SDT model or adapter (local folder or Hub repo id) with its SDT layers.

    An adapter (updates mode) is applied exactly to its base model: the Hub id or folder it records, or
    `base_model` (an id, a folder, or a loaded model, which is converted in place); the result can train further.
    A weights-mode checkpoint (dense or packed) comes back with its `SDTLinear` layers and masks.

    `kwargs` go to the model class's `from_pretrained`, and `revision`, `token` and `cache_dir` also to the Hub
    download. Nothing is returned half-loaded: any mismatch raises before the model is returned or changed.

    Example:
        >>> model = from_pretrained("path/to/sdt-model")  # doctest: +SKIP
        >>> model = from_pretrained("me/my-adapter", base_model="path/to/base")  # doctest: +SKIP
    """
    hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
    folder = _resolve(repo_id_or_path, **hub_kwargs)
    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_NAME)):
        base_kwargs = {key: value for key, value in kwargs.items() if key not in ("revision", "cache_dir")}
        return _load_adapter(folder, base_model, model_class, base_kwargs)
    config = AutoConfig.from_pretrained(folder)
    stored = getattr(config, "sdt_config", None)
    if stored is None:
        raise ValueError(
            f"{repo_id_or_path!r} has no sdt_config in its config.json: it is not an SDT checkpoint. Load it with "
            "transformers, convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)) and save that."
        )
    sdt_config = SDTConfig.from_dict(stored)
    cls = _model_class(getattr(config, "architectures", None), model_class)
    packed_path = os.path.join(folder, PACKED_WEIGHTS_NAME)
    if os.path.isfile(packed_path):
        return _load_packed(packed_path, config, cls, sdt_config)
    masks = _saved_tensors(folder, MASK_SUFFIX)
    if not masks:
        raise ValueError(f"{repo_id_or_path!r} has an sdt_config but no sdt_mask tensors in its weights.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the masks are "unexpected keys" to transformers; they load below
    try:
        model = cls.from_pretrained(folder, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return get_sdt_model(model, sdt_config, masks=masks, block_ids=_saved_tensors(folder, BLOCK_IDS_SUFFIX))


def _load_packed(path: str, config, cls, sdt_config: SDTConfig) -> nn.Module:
    tensors, metadata = _read_safetensors(path)
    if metadata.get("format") != PACKED_FORMAT:
        raise ValueError(f"{path} is not an hf_sdt packed checkpoint (format {PACKED_FORMAT} expected).")
    masks = {key[: -len(MASK_SUFFIX)]: value for key, value in tensors.items() if key.endswith(MASK_SUFFIX)}
    model = get_sdt_model(cls(config), sdt_config, masks=masks)
    state = {key: value for key, value in tensors.items() if not key.endswith(ACTIVE_SUFFIX)}
    for name, layer in sdt_layers(model).items():
        active = tensors.get(name + ACTIVE_SUFFIX)
        element_mask = layer.storage_element_mask()
        if active is None or active.numel() != int(element_mask.sum()):
            raise ValueError(
                f"Packed checkpoint {path}: layer {name!r} should store {int(element_mask.sum())} active values, "
                f"found {None if active is None else active.numel()}; the file is corrupt or from another model."
            )
        weight = torch.zeros(element_mask.shape, dtype=active.dtype)
        weight[element_mask] = active
        state[name + ".weight"] = weight
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _tied_keys(model)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Packed checkpoint {path} does not fit {cls.__name__}: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(result.unexpected_keys)[:5]}."
        )
    model.tie_weights()
    return model.eval()


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that share their storage with another key (tied embeddings): saved once, re-tied on load."""
    groups: dict[int, list[str]] = {}
    for key, value in model.state_dict().items():
        groups.setdefault(local_window(value)[0].untyped_storage().data_ptr(), []).append(key)
    return {key for keys in groups.values() if len(keys) > 1 for key in keys}


def _plot(model: nn.Module, directory: str) -> None:
    """Write the per-layer density chart and the mask picture shown in the card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = sparsity_summary(model)
    names = [layer["name"] for layer in summary["layers"]]
    figure, axis = plt.subplots(figsize=(8, max(2.5, 0.22 * len(names) + 1)))
    axis.barh(range(len(names)), [layer["density"] for layer in summary["layers"]], color="#3b6ea5")
    axis.set_yticks(range(len(names)), names, fontsize=6)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    what = "trained" if summary["mode"] == "updates" else "active"
    axis.set_xlabel(f"density (fraction of the weight in {what} blocks)")
    axis.set_title(f"SDT layers: overall density {summary['density']:.3f}")
    figure.tight_layout()
    figure.savefig(os.path.join(directory, CARD_IMAGES[0]), dpi=100)
    plt.close(figure)

    layers = list(sdt_layers(model).values())
    columns = min(8, len(layers))
    rows = -(-len(layers) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, name, layer in zip(axes.flat, names, layers, strict=False):
        axis.axis("on")  # a frame shows the whole block grid; the ticks would only clutter it
        axis.set_xticks([])
        axis.set_yticks([])
        axis.imshow(layer.block_mask.cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(name.split(".", 1)[-1][-24:], fontsize=5)
    what = "Trained" if summary["mode"] == "updates" else "Active"
    figure.suptitle(f"{what} blocks (dark) of each SDT layer", fontsize=8)
    figure.tight_layout()
    figure.savefig(os.path.join(directory, CARD_IMAGES[1]), dpi=100)
    plt.close(figure)


def write_model_card(
    model: nn.Module,
    directory: str | os.PathLike,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | str | None = None,
    metrics: dict[str, float] | None = None,
    training_seconds: float | None = None,
    flops_saved: float | None = None,
    packed: bool = False,
) -> ModelCard:
    """Write `README.md` (from `model_cards/sdt_model_card.md`) and its two PNG pictures into `directory`; an
    updates-mode model gets an adapter card (`base_model_relation: adapter`, a picture of the trained blocks).

    Example:
        >>> write_model_card(model, "out", repo_id="me/sparse-gpt2", metrics={"eval_loss": 3.1})  # doctest: +SKIP
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    summary = sparsity_summary(model)
    config = SDTConfig.from_dict(model.config.sdt_config)
    metrics = metrics or {}
    adapter = config.mode == "updates"
    card_data = ModelCardData(
        library_name="hf_sdt",
        tags=["sdt", "sparse", "block-sparse", "hf_sdt"],
        base_model=base_model,
        base_model_relation="adapter" if adapter else None,
        datasets=datasets,
        metrics=sorted(metrics) or None,
    )
    _plot(model, directory)
    template = importlib.resources.files("hf_sdt.model_cards") / "sdt_model_card.md"
    if adapter:
        schedule = (
            f"blocks chosen by gradient over {config.selection_steps} steps, drop/grow every "
            f"{config.update_interval} steps ({config.distribution})"
        )
    else:
        constant = config.schedule == "constant"
        densities = f"at {config.density}" if constant else f"{config.initial_density} -> {config.density}"
        schedule = (
            f"{config.schedule} {densities}; drop/grow every {config.update_interval} steps "
            f"({config.prune_criterion} / {config.grow_criterion}, {config.distribution})"
        )
    card = ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=(repo_id or type(model).__name__).split("/")[-1],
        repo_id=repo_id or "path/to/this/folder",
        base_model=base_model,
        architecture=type(model).__name__,
        n_layers=len(summary["layers"]),
        density=f"{summary['density']:.4f}",
        block_size="x".join(str(side) for side in config.block_shape),
        schedule=schedule,
        flops_ratio=f"{summary['linear_flops_ratio']:.4f}",
        flops_saved="not measured" if flops_saved is None else f"{flops_saved:.1%}",
        wall_time="not measured" if training_seconds is None else f"{training_seconds:.0f} s",
        metrics={name: f"{value:.4g}" for name, value in metrics.items()},
        packed=packed,
        adapter=adapter,
    )
    card.save(os.path.join(directory, "README.md"))
    return card


def hub_base_model(model: nn.Module) -> str | None:
    """The Hub id the model was loaded from (`config._name_or_path`), or None for a local folder or none at all."""
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return source if source and not os.path.exists(source) else None


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    packed: bool = False,
    processing_class: Any | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload SDT model",
    **card_kwargs,
):
    """Upload an SDT model (or, in updates mode, its adapter) with its metadata, model card and pictures to the
    Hub; returns the commit info. `base_model` defaults to the Hub id the model was loaded from.

    Example:
        >>> push_to_hub(model, "me/sparse-gpt2", base_model="gpt2", datasets=["austen"])  # doctest: +SKIP
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    card_kwargs["base_model"] = card_kwargs.get("base_model") or hub_base_model(model)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, packed=packed, base_model=card_kwargs["base_model"])
        if processing_class is not None:
            processing_class.save_pretrained(folder)
        write_model_card(model, folder, repo_id=repo_id, packed=packed, **card_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


def card_metrics_from_log(log_history: list[dict]) -> dict[str, float]:
    """The last evaluation metrics of a Trainer log history (`eval_*` keys, without timings), for the card.

    Example:
        >>> card_metrics_from_log([{"eval_loss": 3.0, "eval_runtime": 1.2}, {"eval_loss": 2.5, "eval_accuracy": 0.9}])
        {'eval_loss': 2.5, 'eval_accuracy': 0.9}
    """
    timings = ("_runtime", "_per_second")
    metrics: dict[str, float] = {}
    for entry in log_history:
        metrics.update(
            {key: value for key, value in entry.items() if key.startswith("eval_") and not key.endswith(timings)}
        )
    return metrics
