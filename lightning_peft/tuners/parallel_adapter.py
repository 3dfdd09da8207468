"""The modules of the unified view's non-sequential points (He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning"): a bottleneck branch with optional gate, sequential insertion of a
branch, and the parallel / multi-head parallel adapters that add a branch of the sub-layer's *input* to
its output. Where they go is decided by :mod:`lightning_peft.tuners.unified`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.layers import BaseLayerWrapper, OwnsHooks, ZeroInitLinear, mark
from lightning_peft.tuners.bottleneck import ACTIVATIONS

__all__ = ["GatedBranch", "MultiHeadBranch", "MultiHeadParallelAdapter", "ParallelAdapter", "Residual"]


class GatedBranch(nn.Module):
    """``Δh(x) = s * σ(gate(x)) * up(act(down(x)))`` (``σ`` only for the gated composition); ``up`` starts
    at zero so the branch starts at exactly zero."""

    def __init__(self, d: int, m: int, *, activation: str, scale: float, gated: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.act = ACTIVATIONS[activation]()
        self.up = ZeroInitLinear(m, d)  # zero in its own reset_parameters(): kept through materialisation
        self.gate = nn.Linear(d, 1) if gated else None
        self.scale = scale
        mark(self)

    def reset_parameters(self) -> None:
        """Re-initialise the branch (``up`` zero: the branch adds exactly zero again)."""
        for linear in (self.down, self.up, self.gate):
            if linear is not None:
                linear.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        out = self.up(self.act(self.down(x))) * self.scale
        return out if self.gate is None else out * torch.sigmoid(self.gate(x))


class Residual(nn.Module):
    """Sequential insertion of a branch: ``h + Δh(h)``."""

    def __init__(self, branch: GatedBranch) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, h: Tensor) -> Tensor:
        return h + self.branch(h)


class ParallelAdapter(OwnsHooks, BaseLayerWrapper):
    """Wraps a sub-layer's output projection ``base_layer``: its result plus ``Δh(x)`` of the sub-layer's
    input ``x``, which :meth:`capture` (a forward pre-hook on the sub-layer's first projection) records."""

    def __init__(self, base_layer: nn.Module, branch: GatedBranch) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = branch
        self.disabled = False
        self._x: Tensor | None = None

    def remove_hooks(self) -> None:
        """Take the capture hook off the input projection (:class:`~lightning_peft.layers.HookOwner`)."""
        super().remove_hooks()
        self._x = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on the sub-layer's first projection (the query projection, the FFN's input
        projection): record its input ``x`` ``(B, T, d)``, the sub-layer input that the branch reads, for
        the :meth:`forward` of this wrapper (the sub-layer's output projection), which runs later in the
        same block and consumes it."""
        self._x = args[0] if args else next(iter(kwargs.values()))

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.base_layer(*args, **kwargs)
        x, self._x = self._x, None
        if self.disabled:
            return out
        if x is None:
            raise RuntimeError(
                "ParallelAdapter: the sub-layer input was not captured (was its input projection run?)"
            )
        return out + self.adapter(x).to(out.dtype)


class MultiHeadBranch(nn.Module):
    """Per-head bottlenecks: ``(..., d) -> (..., H * head_dim)``, head ``i``'s slice being
    ``s * σ(gate(x)_i) * (act(x A_i^T + a_i) U_i + u_i)`` (``σ`` only when gated); ``U`` starts at zero."""

    def __init__(
        self, d: int, heads: int, head_dim: int, m: int, *, activation: str, scale: float, gated: bool
    ) -> None:
        super().__init__()
        self.heads, self.head_dim, self.m = heads, head_dim, m
        self.down = nn.Linear(d, heads * m)  # rows i*m .. (i+1)*m - 1: head i's down projection A_i
        self.act = ACTIVATIONS[activation]()
        self.up_weight = nn.Parameter(torch.zeros(heads, m, head_dim))  # U_i
        self.up_bias = nn.Parameter(torch.zeros(heads, head_dim))  # u_i
        self.gate = nn.Linear(d, heads) if gated else None
        self.scale = scale
        mark(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise the branch: ``U`` and ``u`` zero (the branch adds exactly zero), the down and gate
        projections as ``nn.Linear``. This module holds ``U`` and ``u`` itself, so meta-device
        materialisation calls this for them."""
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.up_bias)
        for linear in (self.down, self.gate):
            if linear is not None:
                linear.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        z = self.act(self.down(x)).unflatten(-1, (self.heads, self.m))  # (..., H, m)
        out = torch.einsum("...hm,hmk->...hk", z, self.up_weight) + self.up_bias  # (..., H, head_dim)
        out = out * self.scale
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x))[..., None]
        return out.flatten(-2)  # heads side by side, as the output projection reads them

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, m={self.m}"


class MultiHeadParallelAdapter(ParallelAdapter):
    """Wraps the attention output projection: ``base_layer(heads + Δh(x))``, ``x`` the attention
    sub-layer input recorded by :meth:`capture`."""

    def forward(self, heads: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        x, self._x = self._x, None
        if not self.disabled:
            if x is None:
                raise RuntimeError(
                    "MultiHeadParallelAdapter: the attention input was not captured (was its query "
                    "projection run?)"
                )
            heads = heads + self.adapter(x).to(heads.dtype)
        return self.base_layer(heads, *args, **kwargs)
