"""FSDP2 shards as windows of the whole tensor, so that SDT's block edits reach every shard.

Between steps, FSDP2 (`torch.distributed.fsdp.fully_shard`) holds each parameter, its gradient and its optimizer
states as DTensor shards. Indexed writes into a DTensor along a sharded dimension silently do nothing, and mixing it
with a plain tensor raises; so every SDT edit of a parameter goes through the local shard (`local_window`) at its
offset in the whole tensor. For a plain tensor (one process, DDP) the window is the tensor itself at offset 0, and
the same code runs.
"""

from __future__ import annotations

import torch


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 shard between steps)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_window(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The part of `tensor` this process holds, as a plain tensor that writes through, and its offset in the whole
    tensor along each dimension.

    Example:
        >>> local, offset = local_window(torch.zeros(4, 3))
        >>> local.shape, offset
        (torch.Size([4, 3]), (0, 0))
    """
    if not is_sharded(tensor):
        return tensor, (0,) * tensor.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"A shard of shape {tuple(local.shape)} where its placements say {tuple(shape)}.")
    return local, tuple(offset)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (gathered from every process for a DTensor: a collective, every rank must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def sum_over_shards(partial: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """For values computed by each process from its shard of `like` (zero where it holds nothing), their sum over
    the processes that share `like`'s shards: the whole result on every rank. `partial` itself when `like` is not
    sharded. A collective under FSDP2: every rank must call it."""
    if not is_sharded(like):
        return partial
    from torch.distributed.tensor import DTensor, Partial, Replicate

    placements = [Replicate() if isinstance(p, Replicate) else Partial() for p in like.placements]
    return DTensor.from_local(partial, like.device_mesh, placements, run_check=False).full_tensor()


@torch.no_grad()
def zero_at_(tensor: torch.Tensor, where: torch.Tensor) -> None:
    """Set `tensor` to zero at `where` (a bool mask of its leading dimensions, or an index along dimension 0), in
    whatever part of it this process holds.

    Example:
        >>> tensor = torch.ones(3, 2)
        >>> zero_at_(tensor, torch.tensor([0, 2]))
        >>> tensor[:, 0].tolist()
        [0.0, 1.0, 0.0]
    """
    where = where.to(tensor.device)
    if where.dtype != torch.bool:
        where = torch.zeros(tensor.shape[0], dtype=torch.bool, device=tensor.device).index_fill_(0, where, True)
    local, offset = local_window(tensor)
    held = tuple(slice(start, start + size) for start, size in zip(offset, local.shape, strict=True))
    local[where[held[: where.dim()]]] = 0


def any_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of `module` is an FSDP2 shard."""
    return any(is_sharded(parameter) for parameter in module.parameters())


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered into its whole tensor (a collective under FSDP2: every rank
    must call it)."""
    return {key: full_tensor(value) for key, value in module.state_dict().items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, present on every process) cut the way `like` is sharded, as a DTensor that
    `like.copy_` and `load_state_dict` accept; `full` itself when `like` is not sharded. No communication."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import DTensor

    _, offset = local_window(like)
    local_shape = like.to_local().shape
    held = tuple(slice(start, start + size) for start, size in zip(offset, local_shape, strict=True))
    local = full[held].to(device=like.device, dtype=like.dtype).contiguous()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip
