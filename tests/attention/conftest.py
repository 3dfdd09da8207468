"""Shared fixtures for the attention tests: seeded random q/k/v in the contract layout (B, H, T, D)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

QKV = tuple[Tensor, Tensor, Tensor]


def make_qkv(
    batch: int = 2,
    heads: int = 2,
    length: int = 24,
    dim: int = 8,
    *,
    num_prefix: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    requires_grad: bool = False,
) -> QKV:
    """Random ``q (B, H, T, D)`` and ``k, v (B, H, T + num_prefix, D)`` from a private generator."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, heads, length + num_prefix, dim, generator=g)
    v = torch.randn(batch, heads, length + num_prefix, dim, generator=g)
    return tuple(x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v))  # type: ignore[return-value]


@pytest.fixture
def qkv_factory() -> Callable[..., QKV]:
    return make_qkv


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture
def largest_tensor() -> type[LargestTensor]:
    return LargestTensor
