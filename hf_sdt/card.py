"""The model card of an SDT model or adapter: its text (from `model_cards/sdt_model_card.md`), its two pictures
(per-layer density, the block masks) and the metrics it reports."""

from __future__ import annotations

import importlib.resources
import os

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from .config import SDTConfig
from .model import sdt_layers, sparsity_summary

CARD_IMAGES = ("sdt_density.png", "sdt_masks.png")


def draw_card_pictures(model: nn.Module, directory: str) -> None:
    """Write the per-layer density chart and the mask picture shown in the card (`CARD_IMAGES`) into `directory`."""
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
    train_flops_ratio: float | None = None,
    packed: bool = False,
    peft_format: bool = False,
) -> ModelCard:
    """Write `README.md` (from `model_cards/sdt_model_card.md`) and its two PNG pictures into `directory`; an
    updates-mode model gets an adapter card (`base_model_relation: adapter`, a picture of the trained blocks), which
    says how stock PEFT loads it with `peft_format` (an adapter saved with `format="peft"`).

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
        library_name="peft" if peft_format else "hf_sdt",
        tags=["sdt", "sparse", "block-sparse", "hf_sdt"],
        base_model=base_model,
        base_model_relation="adapter" if adapter else None,
        datasets=datasets,
        metrics=sorted(metrics) or None,
    )
    draw_card_pictures(model, directory)
    template = importlib.resources.files("hf_sdt.model_cards") / "sdt_model_card.md"
    if adapter:
        gradient = f"by gradient over {config.selection_steps} steps"
        chosen = "at random" if config.grow_criterion == "random" else gradient
        schedule = f"blocks chosen {chosen}, drop/grow every {config.update_interval} steps ({config.distribution})"
    else:
        constant = config.schedule == "constant"
        final = "the density it plans" if config.density is None else f"{config.density:.4g}"  # before the 1st step
        densities = f"at {final}" if constant else f"{config.initial_density:.4g} -> {final}"
        budget = "" if config.compute_budget is None else f", planned for a compute budget of {config.compute_budget}"
        tail = f", dense again for the last {config.dense_tail:g} of the steps" if config.dense_tail else ""
        schedule = (
            f"{config.schedule} {densities}{budget}{tail}; drop/grow every {config.update_interval} steps "
            f"({config.prune_criterion} / {config.grow_criterion}, {config.distribution})"
        )
    card = ModelCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        model_name=(repo_id or type(model).__name__).split("/")[-1],
        repo_id=repo_id or os.path.abspath(directory),
        auto_class=auto_class_name(model),
        base_model=base_model,
        architecture=type(model).__name__,
        n_layers=len(summary["layers"]),
        density=f"{summary['density']:.4f}",
        block_size="x".join(str(side) for side in config.block_shape),
        schedule=schedule,
        flops_ratio=f"{summary['linear_flops_ratio']:.4f}",
        flops_saved="not measured" if flops_saved is None else f"{flops_saved:.1%}",
        train_flops="not measured" if train_flops_ratio is None else f"{train_flops_ratio:.1%}",
        wall_time="not measured" if training_seconds is None else f"{training_seconds:.0f} s",
        metrics={name: f"{value:.4g}" for name, value in metrics.items()},
        packed=packed,
        adapter=adapter,
        peft_format=peft_format,
    )
    card.save(os.path.join(directory, "README.md"))
    return card


# transformers' Auto classes by the model classes they build, most specific first (`AutoModel` builds the bare model).
AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
)


def auto_class_name(model: nn.Module) -> str:
    """The transformers Auto class that loads `model`'s class (its task head included), `AutoModel` otherwise.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> auto_class_name(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)))
        'AutoModelForCausalLM'
    """
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for auto_class, mapping in AUTO_CLASSES:
        classes = getattr(modeling_auto, mapping).values()
        if any(name == entry or name in entry for entry in classes if isinstance(entry, (str, tuple))):
            return auto_class
    return "AutoModel"


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
