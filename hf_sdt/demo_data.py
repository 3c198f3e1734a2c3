"""The public-domain text shipped with hf_sdt, as a byte-level language-modelling dataset (no tokenizer needed)."""

from __future__ import annotations

import importlib.resources

import torch

NOVEL = "pride_and_prejudice.txt"
EXCERPT_BYTES = 65536


def novel_excerpt() -> bytes:
    """The first 64 KiB of Jane Austen's *Pride and Prejudice*, shipped in `hf_sdt/data/`.

    Example:
        >>> novel_excerpt()[:19]
        b'PRIDE AND PREJUDICE'
    """
    return (importlib.resources.files("hf_sdt.data") / NOVEL).read_bytes()[:EXCERPT_BYTES]


class ByteChunks(torch.utils.data.Dataset):
    """Consecutive chunks of `length` bytes as `{"input_ids", "labels"}` for causal LM training (vocabulary 256).

    Example:
        >>> ByteChunks(length=64)[0]["input_ids"].shape
        torch.Size([64])
    """

    def __init__(self, data: bytes | None = None, length: int = 64):
        ids = torch.tensor(list(novel_excerpt() if data is None else data), dtype=torch.long)
        self.chunks = ids[: len(ids) // length * length].view(-1, length)  # (N, length)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[index], "labels": self.chunks[index]}
