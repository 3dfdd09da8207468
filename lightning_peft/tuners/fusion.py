"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning"), stage 2: knowledge composition.

Stage 1 trains ``N`` task adapters independently (``BottleneckConfig`` / Compacter with the ``PEFT``
callback, or :func:`lightning_peft.named.train_adapter`). Stage 2 freezes the base model and all ``N``
adapters and learns, at every placement, to mix them. With ``h`` the sub-layer output (the query) and
``δ_j = adapter_j(h) - h`` adapter ``j``'s contribution (its output without the residual):

    q = Q h,   k_j = K δ_j,   v_j = V δ_j,
    a = softmax_j(q · k_j / T),          output = h + sum_j a_j v_j

``Q``, ``K`` start small and random and ``V`` at the identity (no bias), so a fusion that puts all its
weight on one adapter returns exactly that adapter's output. Only ``Q``, ``K``, ``V`` train.

The mean attention of each placement over the adapters is recorded in training and evaluation
(:func:`fusion_weights`) and drawn as a heat map with :func:`plot_fusion_weights`.

Example (stage 2 with the stage-1 checkpoints of two Lightning runs)::

    PEFT(FusionConfig(adapters={"sst": "runs/sst/last.ckpt", "nli": "runs/nli/last.ckpt"},
                      modules_to_save=["classifier"]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_positive, register_tuner
from lightning_peft.layers import IdentityInitLinear, NormalInitLinear, like, mark, unmark
from lightning_peft.named import (
    add_adapter,
    list_adapters,
    load_adapter_tensors,
    read_adapter,
    set_active_adapters,
    stacks,
)
from lightning_peft.tuners.compacter import output_width

__all__ = ["AdapterFusion", "FusionConfig", "add_fusion", "fusion_weights", "plot_fusion_weights"]


class AdapterFusion(nn.Module):
    """Attention over the outputs of ``len(names)`` adapters at one placement of width ``d``."""

    def __init__(self, d: int, names: Sequence[str], *, temperature: float = 1.0) -> None:
        super().__init__()
        self.names = list(names)
        self.temperature = temperature
        # Each projection's reset_parameters() gives its init, so it survives meta-device materialisation
        # (see lightning_peft.layers).
        self.query = NormalInitLinear(d, d, std=0.02)
        self.key = NormalInitLinear(d, d, std=0.02)
        self.value = IdentityInitLinear(d, d, bias=False)
        # Running attention statistics for inspection (not state: "_lp_" keeps them out of checkpoints).
        self.register_buffer("_lp_weight_sum", torch.zeros(len(self.names)), persistent=False)
        self.register_buffer("_lp_weight_count", torch.zeros(()), persistent=False)
        mark(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise ``Q``, ``K`` (N(0, 0.02), zero bias) and ``V`` (identity) and clear the attention
        statistics. This module holds those buffers itself, so meta-device materialisation calls this."""
        for linear in (self.query, self.key, self.value):
            linear.reset_parameters()
        self._lp_weight_sum.zero_()
        self._lp_weight_count.zero_()

    def attention(self, h: Tensor, deltas: Tensor) -> Tensor:
        """Softmax weights (..., N) of the adapters; ``h`` (..., d), ``deltas`` (..., N, d)."""
        q = self.query(h).unsqueeze(-1)  # (..., d, 1)
        scores = (self.key(deltas) @ q).squeeze(-1)  # (..., N)
        return torch.softmax(scores / self.temperature, dim=-1)

    def forward(self, h: Tensor, adapters: Sequence[nn.Module]) -> Tensor:
        deltas = torch.stack([adapter(h) - h for adapter in adapters], dim=-2)  # (B, T, N, d)
        probs = self.attention(h, deltas)  # (B, T, N)
        with torch.no_grad():
            flat = probs.detach().reshape(-1, probs.shape[-1])
            self._lp_weight_sum += flat.sum(0).to(self._lp_weight_sum.dtype)
            self._lp_weight_count += flat.shape[0]
        mixed = (probs.unsqueeze(-1) * self.value(deltas)).sum(-2)  # (B, T, d)
        return h + mixed


def add_fusion(model: nn.Module, names: Sequence[str], *, temperature: float = 1.0) -> list[str]:
    """Fuse named adapters ``names`` at every placement: freeze them (and the base), add trainable fusion
    modules, activate them. Returns the placements.

    Raises:
        ValueError: fewer than one name, unknown names (the known ones are listed), or adapters that do
            not sit at the same placements with the same output width.
    """
    names = list(names)
    if not names:
        raise ValueError("AdapterFusion needs at least one adapter name")
    set_active_adapters(model, names)  # also refuses unknown names, listing the known ones
    placements = [(p, s) for p, s in stacks(model) if any(n in s.adapters for n in names)]
    for placement, stack in placements:
        absent = [n for n in names if n not in stack.adapters]
        if absent:
            present = [n for n in names if n in stack.adapters]
            raise ValueError(
                f"cannot fuse adapters of different shapes: {', '.join(map(repr, present))} sit at "
                f"{placement!r} but {', '.join(map(repr, absent))} do not. Fused adapters must have the same "
                "placements (same style and target_modules)"
            )
        d = output_width(stack, placement)
        for n in names:
            out = stack.adapters[n](torch.zeros(1, d, device=stack.weight.device, dtype=stack.weight.dtype))
            if out.shape[-1] != d:
                raise ValueError(
                    f"cannot fuse adapters of different shapes: {n!r} at {placement!r} maps width {d} to "
                    f"{out.shape[-1]}"
                )
    for _, stack in stacks(model):
        for adapter in stack.adapters.values():
            unmark(adapter, state=False)
    for placement, stack in placements:
        fusion = AdapterFusion(output_width(stack, placement), names, temperature=temperature)
        stack.fusion = like(fusion, stack.weight)
        stack.set_active(names)
    return [p for p, _ in placements]


def fusion_weights(model: nn.Module, *, reset: bool = False) -> dict[str, dict[str, float]]:
    """``{placement: {adapter: mean attention weight}}`` over every token seen since the last reset."""
    out: dict[str, dict[str, float]] = {}
    for placement, stack in stacks(model):
        fusion = stack.fusion
        if isinstance(fusion, AdapterFusion):
            mean = fusion._lp_weight_sum / fusion._lp_weight_count.clamp(min=1)
            out[placement] = dict(zip(fusion.names, mean.tolist(), strict=True))
            if reset:
                fusion._lp_weight_sum.zero_()
                fusion._lp_weight_count.zero_()
    if not out:
        raise ValueError("this model has no AdapterFusion layers (inject a FusionConfig or call add_fusion)")
    return out


def plot_fusion_weights(weights: dict[str, dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Heat map (placements x adapters) of :func:`fusion_weights`, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(weights)
    cols = list(next(iter(weights.values())))
    grid = [[weights[r][c] for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.0 + 0.4 * len(rows)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), [r.removesuffix(".dense") for r in rows], fontsize=7)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=7)
    ax.set_title(title or "AdapterFusion: mean attention per layer")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@register_tuner("fusion")
@dataclass(kw_only=True)
class FusionConfig(TunerConfig):
    """AdapterFusion stage 2.

    Attributes:
        adapters: ``{name: path}`` of stage-1 adapters to load (a :func:`lightning_peft.named.save_adapter`
            folder or an adapter-only ``.ckpt`` of a ``PEFT`` run), or a list of names of adapters already
            on the model, or ``None``: every named adapter already on the model.
        temperature: softmax temperature ``T``.

    ``target_modules``, ``exclude_modules`` and ``layers`` are ignored: the fusion sits wherever the
    adapters are.
    """

    #: The untrained fusion already applies the (trained) stage-1 adapters: it is not the base model.
    identity_at_init: ClassVar[bool] = False
    #: Stage 2 fuses adapters that stage 1 trained: the contract tests add two before injecting.
    needs_trained_adapters: ClassVar[bool] = True

    adapters: dict[str, str] | list[str] | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("FusionConfig", "temperature", self.temperature)
        if isinstance(self.adapters, dict):
            self.adapters = {str(k): str(v) for k, v in self.adapters.items()}
        elif self.adapters is not None:
            self.adapters = [str(n) for n in self.adapters]
            if not self.adapters:
                raise ValueError("FusionConfig.adapters is empty; give {name: path}, names, or None")

    def apply(self, model: nn.Module) -> list[str]:
        if isinstance(self.adapters, dict):
            if any(p.is_meta for p in model.parameters()):
                # Tensors copied into meta parameters are dropped, and materialisation would reset the
                # stage-1 adapters to their untrained init: fusing them would silently learn nothing.
                raise ValueError(
                    "FusionConfig(adapters={name: path}) loads the stage-1 adapters at injection, but the "
                    "model is on the meta device, where they cannot hold values. Add them by name instead "
                    "(lightning_peft.named.add_adapter, then FusionConfig(adapters=[names])) and load their "
                    "tensors with lightning_peft.named.load_adapter_tensors after the model is materialised"
                )
            for name, path in self.adapters.items():
                config, tensors = read_adapter(path)
                add_adapter(model, name, config)
                load_adapter_tensors(model, name, tensors)
            names = list(self.adapters)
        else:
            names = list(self.adapters) if self.adapters is not None else list_adapters(model)
            if not names:
                raise ValueError(
                    "FusionConfig found no adapters to fuse: give adapters={name: path} of stage-1 adapters, "
                    "or add them with lightning_peft.named.add_adapter / load_adapter first"
                )
        return add_fusion(model, names, temperature=self.temperature)
