"""The compute receipt: the FLOPs of every training step of a whole model, beside those of the same step of the
dense model.

What is counted (two FLOPs per multiply-add, as `torch.utils.flop_counter.FlopCounterMode` counts), per forward of
a module in training mode:

- every linear layer (`nn.Linear`, GPT-2's `Conv1D`), targeted or not, the output layer included: the forward
  2 T in out for T tokens, then in backward dX (when its input needs a gradient) and dW (when its weight trains),
  the same again each;
- every SDT layer as its products really run (`SDTLayer.training_flops`: blocked, dense fallback, Triton, updates
  mode's compact gradient), against the dense layer it replaced, trained (forward, dX, dW);
- the attention products of every attention module (Q K^T and A V: 4 B Tq Tk H d forward, twice that backward;
  full Tq x Tk, as the eager products and PyTorch's SDPA formulas count, causal or not);
- what the controller adds: the dense weight gradients of the steps that collect statistics (`add`).

Elementwise work (norms, activations, softmax, the loss) and embedding lookups are not counted, as FlopCounterMode
does not count them. The dense step is the same model with every SDT layer replaced by the layer it wraps, trained;
the other modules count the same in both. Under torch.compile the hooks cannot count (a compiled graph does not run
Python), and a step with no eager forward is counted as the calls of the last eager step, priced with the current
topology.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .layer import SDTLayer
from .targets import LINEAR_LIKE

_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads")
_HEAD_DIMS = ("head_dim", "attention_head_size", "key_value_proj_dim")
_KEY_VALUE_STATES = ("key_value_states", "encoder_hidden_states")


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """FLOPs of one product of a dense linear layer on `tokens` tokens (the forward, dX or dW).

    Example:
        >>> linear_flops(10, 4, 3)
        240
    """
    return 2 * tokens * in_features * out_features


def attention_flops(batch: int, query_length: int, key_length: int, width: int) -> int:
    """Forward FLOPs of an attention module's two products, Q K^T and A V, for `width` = heads x head size.

    Example:
        >>> attention_flops(batch=2, query_length=8, key_length=8, width=64)
        32768
    """
    return 2 * 2 * batch * query_length * key_length * width


def attention_width(module: nn.Module) -> int | None:
    """Heads x head size of an attention module (transformers' attribute names), None when it has none of them.

    Example:
        >>> from transformers import GPT2Config
        >>> from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
        >>> attention_width(GPT2Attention(GPT2Config(n_embd=64, n_head=4)))
        64
    """
    config = getattr(module, "config", None)
    heads = next((getattr(module, name) for name in _HEAD_COUNTS if isinstance(getattr(module, name, None), int)),
                 getattr(config, "num_attention_heads", None))  # fmt: skip
    head_dim = next(
        (getattr(module, name) for name in _HEAD_DIMS if isinstance(getattr(module, name, None), int)), None
    )
    return heads * head_dim if isinstance(heads, int) and head_dim else None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The innermost modules whose class name ends in "Attention" (`BertSelfAttention`, not `BertAttention`).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> list(attention_modules(BertModel(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2))))
        ['encoder.layer.0.attention.self']
    """

    def is_attention(module: nn.Module) -> bool:
        return type(module).__name__.endswith("Attention")

    return {
        name: module
        for name, module in model.named_modules()
        if is_attention(module) and not any(is_attention(child) for child in module.modules() if child is not module)
    }


class ComputeMeter:
    """Counts the training FLOPs of each step of `model` and of the same step of the dense model, through forward
    hooks (see the module docstring for what is counted).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
        >>> meter = ComputeMeter(model)
        >>> meter.begin_step()
        >>> tokens = torch.zeros(1, 8, dtype=torch.long)
        >>> model(input_ids=tokens, labels=tokens).loss.backward()
        >>> actual, dense = meter.end_step()
        >>> actual == dense > 0
        True
    """

    def __init__(self, model: nn.Module):
        self._actual = self._dense = self._dense_targeted = 0
        self._calls: list[tuple] = []  # this step's (module, kind, sizes): what a compiled step repeats
        self._last_calls: list[tuple] = []
        self._hooks = []
        uncounted = set()
        for module in model.modules():
            if isinstance(module, (SDTLayer, *LINEAR_LIKE)):
                self._hooks.append(module.register_forward_hook(self._linear_hook))
        for module in attention_modules(model).values():
            width = attention_width(module)
            if width is None:
                uncounted.add(type(module).__name__)
                continue
            self._hooks.append(module.register_forward_hook(self._attention_hook(width), with_kwargs=True))
        if uncounted:
            warnings.warn(
                f"SDT compute receipt: the attention products of {sorted(uncounted)} are not counted (no head count "
                f"or head size among the attributes {_HEAD_COUNTS} / {_HEAD_DIMS}).",
                stacklevel=3,
            )

    def begin_step(self) -> None:
        """Start counting a training step."""
        self._actual = self._dense = self._dense_targeted = 0
        self._calls = []

    def targeted_share(self) -> float | None:
        """The share of the SDT layers (as dense layers) in the dense FLOPs of the step so far; None before any
        counted forward."""
        return self.targeted_dense_flops() / self._dense if self._dense else None

    def targeted_dense_flops(self) -> int:
        """The FLOPs of the step so far of the dense layers the SDT layers replaced."""
        return self._dense_targeted

    def sdt_layer_calls(self) -> list[tuple[SDTLayer, int, bool, bool]]:
        """The step's forwards of SDT layers so far, as (layer, tokens, dX needed, backward follows)."""
        return [(module, tokens, need_x, backward) for module, kind, tokens, _, _, need_x, backward in
                (call for call in self._calls if call[1] == "linear") if isinstance(module, SDTLayer)]  # fmt: skip

    def add(self, flops: int) -> None:
        """Add work that only this run does (the dense model would not): e.g. a dense weight gradient taken for
        statistics."""
        self._actual += flops

    def end_step(self) -> tuple[int, int]:
        """(this run's FLOPs, the dense model's) of the step since `begin_step`; a step no hook saw (compiled) is
        counted as the calls of the last step they saw."""
        if self._calls:
            self._last_calls = self._calls
        else:
            for call in self._last_calls:
                self._price(*call)
        return self._actual, self._dense

    def remove(self) -> None:
        """Detach the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _linear_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.compiler.is_compiling() or not module.training:
            return
        x = inputs[0]
        backward = output.requires_grad
        self._record(module, "linear", x.numel() // x.shape[-1], x.shape[-1], output.shape[-1],
                     backward and x.requires_grad, backward)  # fmt: skip

    def _attention_hook(self, width: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if torch.compiler.is_compiling() or not module.training:
                return
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, Tq, C)
            key_value = next((kwargs[name] for name in _KEY_VALUE_STATES if kwargs.get(name) is not None), hidden)
            query_length = hidden.shape[-2]
            batch = hidden.numel() // (query_length * hidden.shape[-1])
            output = output[0] if isinstance(output, tuple) else output
            forward = attention_flops(batch, query_length, key_value.shape[-2], width)
            self._record(module, "attention", forward, output.requires_grad)

        return hook

    def _record(self, module: nn.Module, *call) -> None:
        self._calls.append((module, *call))
        self._price(module, *call)

    def _price(self, module: nn.Module, kind: str, *sizes) -> None:
        if kind == "attention":
            forward, backward = sizes
            self._actual += forward * (1 + 2 * backward)
            self._dense += forward * (1 + 2 * backward)
            return
        tokens, in_features, out_features, need_x, backward = sizes
        if isinstance(module, SDTLayer):
            dense = module.dense_training_flops(tokens, need_x, backward)
            self._actual += module.training_flops(tokens, need_x, backward)
            self._dense += dense
            self._dense_targeted += dense
            return
        product = linear_flops(tokens, in_features, out_features)
        need_w = backward and module.weight.requires_grad
        self._actual += product * (1 + need_x + need_w)
        self._dense += product * (1 + need_x + need_w)
