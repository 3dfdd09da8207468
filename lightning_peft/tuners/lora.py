"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight ``W`` (out x in) is adapted as ``W + s * B @ A`` with ``A`` (r x in), ``B`` (out x r),
``s = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA, Kalajdzievski 2023). ``B`` starts at zero, so an
untrained adapter changes nothing; ``A`` starts like ``nn.Linear`` (Kaiming-uniform) or Gaussian.

Supported base layers: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored in x out: handled by reading the
shape, no flag needed) and ``nn.Embedding`` (A, B stored as parameters, embedding lookup into A).
Parameter names match Hugging Face PEFT (``lora_A.weight``, ``lora_B.weight``, ``lora_embedding_A``,
``lora_embedding_B``) so weights move between the two libraries by renaming keys only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import BaseLayerWrapper, NormalInitLinear, ZeroInitLinear, mark, replace_module
from lightning_peft.layouts import layout_of
from lightning_peft.targeting import find_modules, linear_types

__all__ = ["LoRAConfig", "LoRAEmbedding", "LoRALinear"]


@register_tuner("lora")
@dataclass(kw_only=True)
class LoRAConfig(TunerConfig):
    """LoRA hyper-parameters.

    Attributes:
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter's input (0 disables it).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A like ``nn.Linear``) or ``"gaussian"`` (A ~ N(0, 1/r)); B is always zero.

    Example::

        LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool):
            raise ValueError(f"LoRAConfig.r must be an int, got {self.r!r}")
        check_positive("LoRAConfig", "r", self.r)
        check_positive("LoRAConfig", "alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        check_choice("LoRAConfig", "init", self.init, ["kaiming", "gaussian"])

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def apply(self, model: nn.Module) -> list[str]:
        targets = self.target_modules
        if targets is None:
            layout = layout_of(model)
            if layout is None:
                raise ValueError(
                    "LoRAConfig.target_modules is None and the model's family has no registered layout; "
                    "pass target_modules=[...] (e.g. ['query', 'value']) or 'all-linear', or register the "
                    "family with lightning_peft.layouts.register_layout"
                )
            targets = list(layout.lora_targets)
        types = (*linear_types(), nn.Embedding)
        names = find_modules(
            model,
            targets,
            exclude=self.exclude_modules,
            layers=self.layers,
            types=types,
            type_hint="nn.Linear, transformers Conv1D, nn.Embedding",
        )
        for name in names:
            base = model.get_submodule(name)
            kw: dict[str, Any] = {"r": self.r, "scaling": self.scaling, "init": self.init}
            layer = (
                LoRAEmbedding(base, **kw)
                if isinstance(base, nn.Embedding)
                else LoRALinear(base, dropout=self.dropout, **kw)
            )
            replace_module(model, name, layer)
        return names


class LoRALinear(BaseLayerWrapper):
    """``y = base(x) + s * B(A(dropout(x)))`` around a frozen ``nn.Linear`` or ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, *, r: int, scaling: float, dropout: float, init: str) -> None:
        super().__init__()
        weight = base_layer.weight
        # nn.Linear stores (out, in); GPT-2 Conv1D stores (in, out) ("fan_in_fan_out").
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        in_f, out_f = weight.shape if self.fan_in_fan_out else weight.shape[::-1]
        self.base_layer = base_layer
        kw = {"device": weight.device, "dtype": weight.dtype}
        # The init lives in each factor's own reset_parameters() (it survives meta-device materialisation,
        # see lightning_peft.layers): nn.Linear's is LoRA's Kaiming-uniform A (a = sqrt(5)).
        self.lora_A = mark(
            NormalInitLinear(in_f, r, bias=False, std=1.0 / r, **kw)
            if init == "gaussian"
            else nn.Linear(in_f, r, bias=False, **kw)
        )
        self.lora_B = mark(ZeroInitLinear(r, out_f, bias=False, **kw))
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.scaling = r, scaling
        self.merged = False
        self.disabled = False
        if init != "gaussian":
            # Drawn again after B, as Hugging Face PEFT does: a seeded run starts from PEFT's very A.
            self.lora_A.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise ``A`` and ``B`` (``B`` zero: the layer is the base layer again); the base layer
        is left as it is."""
        self.lora_A.reset_parameters()
        self.lora_B.reset_parameters()

    def delta_weight(self) -> Tensor:
        """``s * B @ A`` in the base weight's layout: (out, in), or (in, out) for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        lora_out = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        # One fused add-with-scale instead of a scaled copy plus a sum: one full-size temporary fewer.
        return torch.add(result, lora_out.to(result.dtype), alpha=self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (inference with zero added latency)."""
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the folded update again (exact up to one rounding of the weight's dtype)."""
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class LoRAEmbedding(BaseLayerWrapper):
    """LoRA on ``nn.Embedding``: ``E + s * (B @ A)^T`` with A (r x vocab) zero-initialised, B Gaussian."""

    def __init__(self, base_layer: nn.Embedding, *, r: int, scaling: float, init: str) -> None:
        super().__init__()
        del init  # the embedding update starts at zero through A; B takes a Gaussian as in PEFT
        w = base_layer.weight
        self.base_layer = base_layer
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, w.shape[0], device=w.device, dtype=w.dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(w.shape[1], r, device=w.device, dtype=w.dtype))
        mark(self, ["lora_embedding_A", "lora_embedding_B"])
        self.r, self.scaling = r, scaling
        self.merged = False
        self.disabled = False

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """``A`` zero, ``B`` ~ N(0, 1), as at construction; the base embedding is left as it is. This
        module holds both factors itself, so meta-device materialisation calls this for them."""
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def delta_weight(self) -> Tensor:
        """``s * (B @ A)^T``: (vocab, dim), the base embedding's layout."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if self.disabled or self.merged:
            return result
        b = self.base_layer
        after_a = F.embedding(
            x, self.lora_embedding_A.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse
        )  # (..., r)
        return torch.add(result, after_a @ self.lora_embedding_B.T, alpha=self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.add_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.sub_(self.delta_weight().to(self.base_layer.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
