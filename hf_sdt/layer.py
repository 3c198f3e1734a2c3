"""`SDTLinear`: a linear layer whose weight is cut into blocks, of which only the active ones are used."""

from __future__ import annotations

import torch
from torch import nn

from .functional import build_layout, reference_linear, resolve_backend, sdt_linear
from .masks import block_grid, expand_block_mask, masked_fraction


class SDTLinear(nn.Module):
    """Block-sparse drop-in for `nn.Linear` and GPT-2's `Conv1D`.

    The parameters keep their original names, shapes and layouts (`weight` is (out, in) for `nn.Linear` and
    (in, out) for `Conv1D`), so state dicts stay loadable by vanilla transformers. The persistent bool buffer
    `sdt_mask` of shape (ceil(out / block_rows), ceil(in / block_cols)) marks the active blocks of the (out, in)
    view of the weight; weights outside active blocks are kept at exactly zero.

    Args:
        base_layer (`nn.Linear` or `Conv1D`): the layer to wrap; its parameters are reused, not copied.
        block_size (`tuple[int, int]`): block (rows, cols) in the (out, in) layout.
        mask (`torch.Tensor`): bool block mask.
        backend (`str`): `"auto"`, `"triton"`, `"torch"` or `"reference"`, see `SDTConfig.backend`.

    Example:
    >>> layer = SDTLinear(nn.Linear(8, 4), (2, 4), torch.tensor([[True, False], [False, True]]), "torch")
    >>> layer(torch.randn(3, 8)).shape
    torch.Size([3, 4])
    """

    def __init__(self, base_layer: nn.Module, block_size: tuple[int, int], mask: torch.Tensor, backend: str = "auto"):
        super().__init__()
        self.is_conv1d = not isinstance(base_layer, nn.Linear)
        if self.is_conv1d:  # transformers' Conv1D: weight (in, out)
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.out_features, self.in_features = base_layer.weight.shape
        self.block_size = tuple(block_size)
        self.backend = backend
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        # Kept out of the module tree (no duplicate state-dict keys); `unload` hands it back.
        self.__dict__["base_layer"] = base_layer
        expected = block_grid((self.out_features, self.in_features), self.block_size)
        if tuple(mask.shape) != expected:
            raise ValueError(f"Mask of shape {tuple(mask.shape)} does not fit this layer: expected {expected}.")
        self.register_buffer("sdt_mask", mask.to(device=self.weight.device, dtype=torch.bool).clone())
        self._layout = None
        self._layout_key: tuple = ()  # (backend, mask, version) the cached layout was built for
        self._known_active: tuple = ()  # ((mask, version), active block count) recorded by update_mask_
        # Set by the SDT controller around topology updates (see hf_sdt.trainer), not saved with the model:
        self.capture_dense_grad = False  # next backward also hands over the dense weight gradient
        self.track_input_norms = False  # forward accumulates squared input-feature norms (Wanda scores)
        self.dense_grad: torch.Tensor | None = None  # (out, in), fp32, summed over micro-batches
        self.input_sq_norm: torch.Tensor | None = None  # (in,), fp32
        self.apply_mask_()
        # A loaded checkpoint may hold values outside its mask; every backend ignores them, and zeroing them keeps
        # the weights equal to what the layer computes with.
        self.register_load_state_dict_post_hook(_apply_mask_after_load)

    @property
    def weight_out_in(self) -> torch.Tensor:
        """The weight as an (out, in) view, whatever the storage layout."""
        return self.weight.t() if self.is_conv1d else self.weight

    def storage_element_mask(self, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Element mask of `block_mask` (default: the layer's own mask) in the weight's storage layout, (in, out)
        for Conv1D; blocks beyond the edges are cut to the weight's shape."""
        block_mask = self.sdt_mask if block_mask is None else block_mask
        element_mask = expand_block_mask(block_mask, self.block_size, (self.out_features, self.in_features))
        return element_mask.t() if self.is_conv1d else element_mask

    @property
    def density(self) -> float:
        """Fraction of weight elements inside active blocks."""
        return masked_fraction(self.sdt_mask, self.block_size, (self.out_features, self.in_features))

    def layout(self, backend: str):
        """The index structure of the current mask for `backend` ("torch" or "triton"), rebuilt only when the mask
        changes (in place or replaced) or the backend does."""
        if self._layout_key[:1] != (backend,) or not _same_mask_state(self._layout_key[1:], self.sdt_mask):
            known_state, n_active = self._known_active or ((), None)
            if not _same_mask_state(known_state, self.sdt_mask):
                n_active = None  # changed outside update_mask_ (e.g. load_state_dict): count it again
            shape = (self.out_features, self.in_features)
            self._layout = build_layout(backend, self.sdt_mask, self.block_size, shape, n_active)
            self._layout_key = (backend, self.sdt_mask, self.sdt_mask._version)
        return self._layout

    @torch.no_grad()
    def update_mask_(self, mask: torch.Tensor, n_active: int) -> None:
        """Replace the block mask in place and zero the weights it no longer covers.

        `n_active` must be the number of active blocks of `mask`; passing it lets the Triton path rebuild its
        indices on the device without reading the mask back to the host.
        """
        self.sdt_mask.copy_(mask)
        self._known_active = ((self.sdt_mask, self.sdt_mask._version), n_active)
        self.apply_mask_()

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Set every weight outside the active blocks to exactly zero."""
        inactive = expand_block_mask(~self.sdt_mask, self.block_size, (self.out_features, self.in_features))
        self.weight_out_in.masked_fill_(inactive, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.track_input_norms and self.training:
            squares = x.detach().float().square().reshape(-1, self.in_features).sum(0)  # (in,)
            self.input_sq_norm = squares if self.input_sq_norm is None else self.input_sq_norm + squares
        if self.capture_dense_grad and torch.is_grad_enabled():
            return reference_linear(
                x, self.weight_out_in, self.bias, self.sdt_mask, self.block_size, self._accumulate_dense_grad
            )
        backend = resolve_backend(self.backend, x.device, self.block_size)
        layout = None if backend == "reference" else self.layout(backend)
        return sdt_linear(x, self.weight_out_in, self.bias, self.sdt_mask, self.block_size, backend, layout)

    def _accumulate_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach().float()
        self.dense_grad = grad if self.dense_grad is None else self.dense_grad + grad

    def unload(self) -> nn.Module:
        """The original layer class with this layer's current parameters (zeros included)."""
        base_layer = self.__dict__["base_layer"]
        base_layer.weight = self.weight
        base_layer.bias = self.bias
        return base_layer

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.is_conv1d else "Linear"
        return (
            f"{kind}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, active_blocks={int(self.sdt_mask.sum())}/{self.sdt_mask.numel()}, "
            f"backend={self.backend!r}"
        )


def _apply_mask_after_load(module: SDTLinear, incompatible_keys) -> None:
    module.apply_mask_()


def _same_mask_state(state: tuple, mask: torch.Tensor) -> bool:
    """Whether `state` = (mask, version) still describes `mask`; identity, not address, so that a new tensor at
    a reused address never matches."""
    return bool(state) and state[0] is mask and state[1] == mask._version
