"""Compacter and Compacter++ (Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter
Layers").

A Compacter is a bottleneck adapter ``h + s * up(act(down(h)))`` whose projections are PHM layers
(parameterized hypercomplex multiplication): the weight of a ``k -> d`` projection is a sum of ``n``
Kronecker products

    W = sum_i A_i ⊗ B_i,     A_i: (n, n) "slow" rule,   B_i: (k/n, d/n) "fast" weight,

and ``y = x @ W + b``. Compacter shares the slow weights ``A`` across every adapter layer of the model
(one ``(n, n, n)`` tensor) and makes the fast weights low rank: ``B_i = s_i t_i^T`` with
``s_i: (k/n, r)``, ``t_i: (r, d/n)`` (rank ``r = 1``).

* ``CompacterConfig`` (``style="houlsby"``): two adapters per block, after the attention output and after
  the FFN output projection.
* ``CompacterPlusPlusConfig`` (``style="pfeiffer"``): one adapter per block, after the FFN output.

With the defaults (reduction factor 32, ``n = 4``, rank 1, shared rule, biases, as AdapterHub's
``compacter`` / ``compacter++``) a BERT-base model gets 57,088 / 28,576 trainable parameters. The
bottleneck ``m = d / reduction_factor`` is rounded up to a multiple of ``n`` (unchanged for BERT-base,
``m = 24``). The up-projection's fast weights ``t`` and bias start at zero, so an untrained Compacter is
exactly the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import mark, replace_module
from lightning_peft.targeting import find_modules
from lightning_peft.tuners.bottleneck import (
    ACTIVATIONS,
    STYLE_PARTS,
    AdapterAfter,
    bottleneck_width,
    output_width,
    style_placements,
)

__all__ = [
    "CompacterAdapter",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "PHMLinear",
    "SharedRule",
    "kron_sum",
]


def kron_sum(rule: Tensor, fast: Tensor) -> Tensor:
    """``sum_i rule[i] ⊗ fast[i]``: rule (n, n, n), fast (n, p, q) -> (n * p, n * q)."""
    n, p, q = fast.shape
    # W[a * p + i, b * q + j] = sum_k rule[k, a, b] * fast[k, i, j]
    return torch.einsum("kab,kij->aibj", rule, fast).reshape(n * p, n * q)


class SharedRule:
    """The slow weights ``A`` (n, n, n) that several PHM layers share (Compacter's ``shared_phm_rule``).

    A plain object, not a module: the tensor is registered in every layer as its ``phm_rule``, so the
    state-dict keys are those of an unshared rule. It lets a layer re-tie after ``to_empty()`` from the
    meta device, which gives every module a new tensor of its own and so breaks the sharing: the first
    layer reset afterwards makes its tensor the group's, the others take that one
    (:meth:`PHMLinear.reset_parameters`).
    """

    def __init__(self, param: nn.Parameter) -> None:
        self.param = param


class PHMLinear(nn.Module):
    """A ``k -> d`` linear map whose weight is a sum of Kronecker products (see the module docstring).

    Args:
        in_features, out_features: ``k`` and ``d``, both multiples of ``n``.
        n: number of Kronecker products (``phm_dim``).
        rule: the slow weights ``A`` (n, n, n) shared with other layers (a :class:`SharedRule`, which also
            keeps them shared through meta-device materialisation, or the tensor itself); ``None`` gives
            this layer its own.
        rank: rank of the fast weights (``None``: full ``(k/n, d/n)`` matrices).
        bias: add a bias of size ``d``.
        zero_init: start with the fast weights' right factor (and the bias) at zero: the map is then 0.
        init_range: standard deviation of the initial slow weights (of this layer's own rule).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        n: int,
        rule: SharedRule | nn.Parameter | None = None,
        rank: int | None = 1,
        bias: bool = True,
        zero_init: bool = False,
        init_range: float = 1e-4,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features % n or out_features % n:
            raise ValueError(
                f"PHMLinear: in ({in_features}) and out ({out_features}) must be multiples of n={n}"
            )
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        self.zero_init, self.init_range = zero_init, init_range
        p, q = in_features // n, out_features // n
        kw = {"device": device, "dtype": dtype}
        if isinstance(rule, nn.Parameter):
            rule = SharedRule(rule)
        self._shared = rule  # a plain attribute: the tensor itself is registered just below
        self.phm_rule = rule.param if rule is not None else new_rule(n, init_range, **kw)
        if rank is None:
            self.fast = nn.Parameter(torch.empty(n, p, q, **kw))
            self.s = self.t = None
        else:
            self.fast = None
            self.s = nn.Parameter(torch.empty(n, p, rank, **kw))  # (n, k/n, r)
            self.t = nn.Parameter(torch.empty(n, rank, q, **kw))  # (n, r, d/n)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._init_fast()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise this layer's tensors as at construction: the rule (re-tied to the other layers
        sharing it, see :class:`SharedRule`), the fast weights and the bias. Meta-device materialisation
        calls this: the layer holds its tensors itself."""
        shared = self._shared
        if shared is not None and shared.param is not self.phm_rule:
            group = shared.param
            if group.is_meta or group.device != self.phm_rule.device:
                shared.param = self.phm_rule  # left behind by to_empty(): this layer's becomes the group's
            else:  # another layer sharing the rule was reset first: take its tensor
                self.phm_rule = shared.param
        nn.init.normal_(self.phm_rule, std=self.init_range)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._init_fast()

    def _init_fast(self) -> None:
        if self.phm_rule.is_meta:
            return
        # Glorot-uniform on each factor (the fan of the full map is k x d); the right factor of a
        # zero-initialised layer is zero, so its product W is zero.
        bound = math.sqrt(6.0 / (self.in_features + self.out_features))
        with torch.no_grad():
            left, right = (self.fast, None) if self.fast is not None else (self.s, self.t)
            assert left is not None
            if right is None:  # full fast weights: zero them, or initialise them
                right, left = left, None
            if left is not None:
                left.uniform_(-bound, bound)
            if self.zero_init:
                right.zero_()
            else:
                right.uniform_(-bound, bound)

    def fast_weights(self) -> Tensor:
        """``B`` (n, k/n, d/n): the low-rank products ``s_i t_i^T`` or the full matrices."""
        if self.fast is not None:
            return self.fast
        assert self.s is not None and self.t is not None
        return self.s @ self.t

    def weight(self) -> Tensor:
        """The full ``(k, d)`` weight ``sum_i A_i ⊗ B_i``."""
        return kron_sum(self.phm_rule, self.fast_weights())

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight()  # (..., k) @ (k, d) -> (..., d)
        return y if self.bias is None else y + self.bias


def new_rule(n: int, init_range: float = 1e-4, **kw: object) -> nn.Parameter:
    """A fresh slow-weight tensor ``A`` (n, n, n), normal with std ``init_range``."""
    rule = nn.Parameter(torch.empty(n, n, n, **kw))  # type: ignore[arg-type]
    if not rule.is_meta:
        nn.init.normal_(rule, std=init_range)
    return rule


class CompacterAdapter(nn.Module):
    """``h + s * up(act(down(h)))`` with PHM ``down: d -> m`` and ``up: m -> d``.

    Both use the slow weights ``rule`` when given (shared with other adapters); ``None`` gives each PHM
    layer its own.
    """

    def __init__(
        self,
        d: int,
        m: int,
        *,
        n: int,
        rule: SharedRule | nn.Parameter | None,
        rank: int | None = 1,
        bias: bool = True,
        activation: str = "gelu",
        scaling: float = 1.0,
        init_range: float = 1e-4,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"n": n, "rule": rule, "rank": rank, "bias": bias, "init_range": init_range}
        kw |= {"device": device, "dtype": dtype}
        self.down = PHMLinear(d, m, **kw)
        self.act = ACTIVATIONS[activation]()
        self.up = PHMLinear(m, d, zero_init=True, **kw)
        self.scaling = scaling
        mark(self)

    def reset_parameters(self) -> None:
        """Re-initialise both PHM layers (the up-projection is zero again: the identity)."""
        self.down.reset_parameters()
        self.up.reset_parameters()

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h))) * self.scaling


@register_tuner("compacter")
@dataclass(kw_only=True)
class CompacterConfig(TunerConfig):
    """Compacter hyper-parameters (defaults: AdapterHub's ``compacter``).

    Attributes:
        style: ``"houlsby"`` (after attention and FFN; Compacter) or ``"pfeiffer"`` (FFN only; Compacter++).
        reduction_factor: ``m = d / reduction_factor``, rounded up to a multiple of ``phm_dim``.
        bottleneck_size: explicit ``m`` (a multiple of ``phm_dim``).
        phm_dim: ``n``, the number of Kronecker products; divides ``d`` and ``m``.
        phm_rank: rank of the fast weights ``B_i = s_i t_i^T``; ``None`` for full matrices.
        shared_phm_rule: one slow-weight tensor ``A`` for every adapter layer (else one per PHM layer).
        phm_bias: PHM layers have biases.
        activation: one of ``relu``, ``gelu``, ``swish``/``silu``, ``tanh``.
        scaling: multiplier on the adapter branch.
        phm_init_range: standard deviation of the initial slow weights.

    Example::

        CompacterConfig(modules_to_save=["classifier"])            # 57,088 parameters on BERT-base
    """

    style: str = "houlsby"
    reduction_factor: float = 32.0
    bottleneck_size: int | None = None
    phm_dim: int = 4
    phm_rank: int | None = 1
    shared_phm_rule: bool = True
    phm_bias: bool = True
    activation: str = "gelu"
    scaling: float = 1.0
    phm_init_range: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "style", self.style, list(STYLE_PARTS))
        check_choice(owner, "activation", self.activation, list(ACTIVATIONS))
        check_positive(owner, "reduction_factor", self.reduction_factor)
        check_positive(owner, "phm_dim", self.phm_dim)
        check_positive(owner, "phm_init_range", self.phm_init_range)
        if self.phm_rank is not None:
            check_positive(owner, "phm_rank", self.phm_rank)
        if self.bottleneck_size is not None:
            check_positive(owner, "bottleneck_size", self.bottleneck_size)
            if self.bottleneck_size % self.phm_dim:
                raise ValueError(
                    f"{owner}.bottleneck_size={self.bottleneck_size} must be a multiple of "
                    f"phm_dim={self.phm_dim}"
                )

    def placements(self, model: nn.Module) -> list[str]:
        """Module names whose outputs get an adapter."""
        targets = self.target_modules
        if targets is None:
            targets = style_placements(model, self.style, owner=type(self).__name__)
        return find_modules(model, targets, exclude=self.exclude_modules, layers=self.layers)

    def build_adapters(self, model: nn.Module) -> dict[str, nn.Module]:
        """A fresh adapter per placement (placement name -> adapter), all sharing one rule if asked."""
        names = self.placements(model)
        adapters: dict[str, nn.Module] = {}
        shared: SharedRule | None = None
        for name in names:
            base = model.get_submodule(name)
            d = output_width(base, name)
            if d % self.phm_dim:
                raise ValueError(f"{name!r} has width {d}, not a multiple of phm_dim={self.phm_dim}")
            m = self.bottleneck_size or self.phm_dim * math.ceil(
                bottleneck_width(d, self.reduction_factor, type(self).__name__, name) / self.phm_dim
            )
            ref = next(base.parameters(), None)
            kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
            if self.shared_phm_rule and shared is None:
                shared = SharedRule(new_rule(self.phm_dim, self.phm_init_range, **kw))
            adapters[name] = CompacterAdapter(
                d,
                m,
                n=self.phm_dim,
                rule=shared if self.shared_phm_rule else None,
                rank=self.phm_rank,
                bias=self.phm_bias,
                activation=self.activation,
                scaling=self.scaling,
                init_range=self.phm_init_range,
                **kw,
            )
        return adapters

    def apply(self, model: nn.Module) -> list[str]:
        adapters = self.build_adapters(model)
        for name, adapter in adapters.items():
            replace_module(model, name, AdapterAfter(model.get_submodule(name), adapter))
        return list(adapters)


@register_tuner("compacter++")
@dataclass(kw_only=True)
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter++: one Compacter per block, after the FFN output (28,576 parameters on BERT-base)."""

    style: str = "pfeiffer"
