"""Save, load and push SDT models: which format a model is saved in, the dense and packed formats of weights mode,
and the Hub. The adapter format of updates mode is `hf_sdt.adapter`'s, the card `hf_sdt.card`'s.

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

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import transformers
from huggingface_hub import HfApi, snapshot_download
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig

from .adapter import ADAPTER_CONFIG_NAME, BLOCK_IDS_SUFFIX, load_adapter, recorded_base, save_adapter
from .card import write_model_card
from .config import SDTConfig
from .files import model_class_for, read_safetensors
from .model import get_sdt_model, sdt_layers
from .peft_format import save_peft_shira
from .sharding import any_sharded, full_state_dict, local_window, shard_like

MASKS_NAME = "sdt_masks.safetensors"
MASKS_FORMAT = "hf_sdt-masks-1"
PACKED_WEIGHTS_NAME = "sdt_packed.safetensors"
PACKED_FORMAT = "hf_sdt-packed-1"
ACTIVE_SUFFIX = ".weight.sdt_active"
MASK_SUFFIX = ".sdt_mask"

SAVE_FORMATS = ("sdt", "peft")  # hf_sdt's own files, or PEFT's SHiRA adapter format (updates mode)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    packed: bool = False,
    base_model: str | None = None,
    revision: str | None = None,
    format: str = "sdt",
    **kwargs,
) -> None:
    """Save an SDT model.

    Updates mode: only the adapter, whose size is about `density` times the targeted weights' fp32 bytes (plus the
    block ids and `modules_to_save`), with the base model's id or folder (`base_model`, default the model's
    `config._name_or_path`) and `revision`, so that `hf_sdt.from_pretrained(save_directory)` can rebuild it.

    Weights mode: dense (transformers' files, loadable by vanilla transformers, plus `sdt_masks.safetensors`;
    `kwargs`, e.g. `state_dict`, go to `model.save_pretrained`) or `packed`, where the targeted weights take about
    `density` of their dense bytes and only `hf_sdt.from_pretrained` can read them.

    `format="peft"` (updates mode, `nn.Linear` targets) writes the adapter in PEFT's SHiRA format instead, which
    `peft.PeftModel.from_pretrained(base, save_directory)` loads without hf_sdt (see `hf_sdt.peft_format`: for
    loading and merging, not for continuing SDT training).

    Under FSDP2, call it on every process: the shards are gathered (`state_dict` defaults to the gathered
    `model.state_dict()`) and rank 0 writes (or the processes given `is_main_process=True`).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_sdt import SDTConfig, get_sdt_model
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=64))
        >>> model = get_sdt_model(model, SDTConfig(density=0.25, block_size=16, schedule="constant"))
        >>> save_pretrained(model, tempfile.mkdtemp(), packed=True)
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"Unknown format {format!r}; use one of {SAVE_FORMATS}.")
    layers = sdt_layers(model)
    if not layers:
        raise ValueError("This model has no SDT layers; convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)).")
    state = kwargs.pop("state_dict", None)
    state = full_state_dict(model) if state is None else state
    kwargs.setdefault("is_main_process", not any_sharded(model) or dist.get_rank() == 0)
    if not kwargs["is_main_process"]:
        return
    if format == "peft":
        base = recorded_base(base_model or getattr(model.config, "_name_or_path", None))
        save_peft_shira(model, state, str(save_directory), base)
        return
    if SDTConfig.from_dict(model.config.sdt_config).mode == "updates":
        save_adapter(model, state, str(save_directory), base_model, revision)
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


def _saved_tensors(folder: str, suffix: str = "") -> dict[str, torch.Tensor]:
    """Tensors whose names end with `suffix` (all by default) in a folder's safetensors files (single or sharded,
    `sdt_masks.safetensors` included), by name without the suffix."""
    files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    found = {}
    for name in files:
        tensors, _ = read_safetensors(os.path.join(folder, name), suffix)
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
        return load_adapter(folder, base_model, model_class, base_kwargs)
    config = AutoConfig.from_pretrained(folder)
    stored = getattr(config, "sdt_config", None)
    if stored is None:
        raise ValueError(
            f"{repo_id_or_path!r} has no sdt_config in its config.json: it is not an SDT checkpoint. Load it with "
            "transformers, convert it with hf_sdt.get_sdt_model(model, SDTConfig(...)) and save that."
        )
    sdt_config = SDTConfig.from_dict(stored)
    cls = model_class_for(getattr(config, "architectures", None), model_class)
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
    tensors, metadata = read_safetensors(path)
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
    expected = model.state_dict()
    wrong = [key for key in state if key in expected and tuple(state[key].shape) != tuple(expected[key].shape)]
    if wrong:
        key = wrong[0]
        raise ValueError(
            f"Packed checkpoint {path} does not fit its model's config: {key!r} has shape {tuple(state[key].shape)}, "
            f"{cls.__name__} built from config.json expects {tuple(expected[key].shape)}"
            + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else "")
            + ". The file is corrupt or was saved from another model."
        )
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
    format: str = "sdt",
    token: str | None = None,
    commit_message: str = "Upload SDT model",
    **card_kwargs,
):
    """Upload an SDT model (or, in updates mode, its adapter) with its metadata, model card and pictures to the
    Hub; returns the commit info. `base_model` defaults to the Hub id the model was loaded from; `format="peft"`
    uploads an updates-mode adapter in PEFT's SHiRA format (see `save_pretrained`).

    Example:
        >>> push_to_hub(model, "me/sparse-gpt2", base_model="gpt2", datasets=["austen"])  # doctest: +SKIP
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    card_kwargs["base_model"] = card_kwargs.get("base_model") or hub_base_model(model)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, packed=packed, base_model=card_kwargs["base_model"], format=format)
        if processing_class is not None:
            processing_class.save_pretrained(folder)
        peft_format = format == "peft"
        write_model_card(model, folder, repo_id=repo_id, packed=packed, peft_format=peft_format, **card_kwargs)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
