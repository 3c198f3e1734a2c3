"""Save, load and push SDT models: dense (vanilla-transformers compatible) and packed formats, and model cards.

- Dense format: `model.save_pretrained(dir)` as in transformers; weights with exact zeros, the `sdt_mask` buffers
  and `sdt_config` inside `config.json`. Vanilla `from_pretrained` loads it (the masks are reported as unused).
- Packed format: `save_pretrained(model, dir, packed=True)` writes `config.json` and `sdt_packed.safetensors`, in
  which each SDT weight keeps only its active elements (`<layer>.weight.sdt_active`) next to its mask.
"""

from __future__ import annotations

import importlib.resources
import os
import tempfile
from typing import Any

import torch
import transformers
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig

from .config import SDTConfig
from .model import get_sdt_model, sdt_layers, sparsity_summary

PACKED_WEIGHTS_NAME = "sdt_packed.safetensors"
PACKED_FORMAT = "hf_sdt-packed-1"
ACTIVE_SUFFIX = ".weight.sdt_active"
MASK_SUFFIX = ".sdt_mask"
CARD_IMAGES = ("sdt_density.png", "sdt_masks.png")


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, packed: bool = False, **kwargs) -> None:
    """Save an SDT model: dense (`model.save_pretrained`, loadable by vanilla transformers) or `packed`, where the
    targeted weights take about `density` of their dense bytes and only `hf_sdt.from_pretrained` can read them.

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
    if not packed:
        model.save_pretrained(save_directory, **kwargs)
        return
    os.makedirs(save_directory, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as transformers' own save_pretrained records it
    model.config.save_pretrained(save_directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(save_directory)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        layer_name = key.rpartition(".")[0]
        if key.endswith(".weight") and layer_name in layers:
            tensors[layer_name + ACTIVE_SUFFIX] = value[layers[layer_name].storage_element_mask()].contiguous()  # (n,)
        elif value.untyped_storage().data_ptr() not in storages:  # tied weights are saved once and re-tied
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value.contiguous()
    save_file(tensors, os.path.join(save_directory, PACKED_WEIGHTS_NAME), metadata={"format": PACKED_FORMAT})


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


def _model_class(config, model_class):
    if model_class is not None:
        return model_class
    for architecture in getattr(config, "architectures", None) or []:
        if hasattr(transformers, architecture):
            return getattr(transformers, architecture)
    raise ValueError(
        f"Cannot tell the model class from config.architectures={getattr(config, 'architectures', None)}; pass "
        "model_class=, e.g. transformers.AutoModelForCausalLM."
    )


def _saved_tensors(folder: str, suffix: str) -> dict[str, torch.Tensor]:
    """Tensors whose names end with `suffix` in a folder's safetensors files (single or sharded)."""
    files = [name for name in os.listdir(folder) if name.endswith(".safetensors")]
    found = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(suffix):
                    found[key[: -len(suffix)]] = handle.get_tensor(key)
    return found


def from_pretrained(repo_id_or_path: str, model_class=None, **kwargs) -> nn.Module:
    """Load an SDT model (local folder or Hub repo id, dense or packed) with its `SDTLinear` layers and masks.

    `kwargs` go to the model class's `from_pretrained` (dense format), and `revision`, `token` and `cache_dir`
    also to the Hub download. Nothing is returned half-loaded: any mismatch raises before the model is returned.

    Example:
        >>> model = from_pretrained("path/to/sdt-model")  # doctest: +SKIP
    """
    hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
    folder = _resolve(repo_id_or_path, **hub_kwargs)
    config = AutoConfig.from_pretrained(folder)
    stored = getattr(config, "sdt_config", None)
    if stored is None:
        raise ValueError(
            f"{repo_id_or_path!r} has no sdt_config in its config.json: it is not an SDT checkpoint. Load it with "
            "transformers, convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)) and save that."
        )
    sdt_config = SDTConfig.from_dict(stored)
    cls = _model_class(config, model_class)
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
    return get_sdt_model(model, sdt_config, masks=masks)


def _load_packed(path: str, config, cls, sdt_config: SDTConfig) -> nn.Module:
    with safe_open(path, framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != PACKED_FORMAT:
            raise ValueError(f"{path} is not an hf_sdt packed checkpoint (format {PACKED_FORMAT} expected).")
    tensors = load_file(path)
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
        weight = torch.zeros(layer.weight.shape, dtype=active.dtype)
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
        groups.setdefault(value.untyped_storage().data_ptr(), []).append(key)
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
    axis.set_xlabel("density (fraction of the weight in active blocks)")
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
        axis.imshow(layer.sdt_mask.cpu().numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(name.split(".", 1)[-1][-24:], fontsize=5)
    figure.suptitle("Active blocks (dark) of each SDT layer", fontsize=8)
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
    """Write `README.md` (from `model_cards/sdt_model_card.md`) and its two PNG pictures into `directory`.

    Example:
        >>> write_model_card(model, "out", repo_id="me/sparse-gpt2", metrics={"eval_loss": 3.1})  # doctest: +SKIP
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    summary = sparsity_summary(model)
    config = SDTConfig.from_dict(model.config.sdt_config)
    metrics = metrics or {}
    card_data = ModelCardData(
        library_name="hf_sdt",
        tags=["sdt", "sparse", "block-sparse", "hf_sdt"],
        base_model=base_model,
        datasets=datasets,
        metrics=sorted(metrics) or None,
    )
    _plot(model, directory)
    template = importlib.resources.files("hf_sdt.model_cards") / "sdt_model_card.md"
    densities = (
        f"at {config.density}" if config.schedule == "constant" else f"{config.initial_density} -> {config.density}"
    )
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
    )
    card.save(os.path.join(directory, "README.md"))
    return card


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
    """Upload an SDT model with its metadata, model card and pictures to the Hub; returns the commit info.

    Example:
        >>> push_to_hub(model, "me/sparse-gpt2", base_model="gpt2", datasets=["austen"])  # doctest: +SKIP
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, packed=packed)
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
