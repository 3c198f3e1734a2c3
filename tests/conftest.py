import os
from urllib.parse import urlparse

import pytest
import torch
from hub_server import serve

from hf_sdt.masks import block_grid


def make_block_mask(kind: str, shape: tuple[int, int], block: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Block masks that exercise the edge cases: random, full (density 1), one block, empty block-lines."""
    grid = block_grid(shape, block)
    generator = torch.Generator().manual_seed(seed)
    if kind == "full":
        return torch.ones(grid, dtype=torch.bool)
    if kind == "single":
        mask = torch.zeros(grid, dtype=torch.bool)
        mask[grid[0] - 1, grid[1] - 1] = True  # the partial corner block when the shape is odd
        return mask
    mask = torch.rand(grid, generator=generator) < 0.5
    if kind == "empty_lines":
        mask[0, :] = False
        mask[:, -1] = False
        mask[-1, 0] = True
    return mask


@pytest.fixture
def force_blocked_path(monkeypatch):
    """The blocked path itself is under test: no call may fall back to the dense GEMM."""
    from hf_sdt.functional import dispatch

    monkeypatch.setattr(dispatch, "blocked_path_pays", lambda layout, tokens, block: True)


@pytest.fixture
def block_mask_factory():
    return make_block_mask


@pytest.fixture(scope="session")
def hub_server():
    """A local Hub (see hub_server.py) at the HF_ENDPOINT the root conftest set; yields its in-memory state."""
    server, state = serve(urlparse(os.environ["HF_ENDPOINT"]).port)
    yield state
    server.shutdown()
