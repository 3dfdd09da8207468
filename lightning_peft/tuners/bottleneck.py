"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP";
Pfeiffer et al. 2021, "AdapterFusion").

An adapter maps a sub-layer's output ``h`` (width d) to ``h + s * up(act(down(h)))`` with ``down: d -> m``,
``up: m -> d`` and ``m = d / reduction_factor``: ``2md + m + d`` parameters. ``up`` starts at zero, so an
untrained adapter is exactly the identity (``init="houlsby"`` uses the paper's near-identity
N(0, 1e-2) for both projections instead).

* ``style="houlsby"``: two adapters per block, after the attention output projection and after the FFN
  output projection (before the residual and LayerNorm); optionally the LayerNorms train too, as in the
  paper.
* ``style="pfeiffer"``: one adapter per block, after the FFN output projection.

Placement comes from :mod:`lightning_peft.layouts` for known Hugging Face models, or from
``target_modules`` for any other model (the adapter is applied to that module's output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import (
    BaseLayerWrapper,
    NormalInitLinear,
    ZeroInitLinear,
    like,
    mark,
    replace_module,
)
from lightning_peft.layouts import block_part_names
from lightning_peft.targeting import find_modules

__all__ = [
    "ACTIVATIONS",
    "STYLE_PARTS",
    "AdapterAfter",
    "BottleneckAdapter",
    "BottleneckConfig",
    "output_width",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
#: Where each style puts adapters (parts of :class:`lightning_peft.layouts.BlockLayout`).
STYLE_PARTS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention_output", "ffn_output"),
    "pfeiffer": ("ffn_output",),
}


def bottleneck_width(d: int, reduction_factor: float, owner: str, name: str) -> int:
    """``d // reduction_factor``, refused when it rounds to zero (a bottleneck of width 0)."""
    m = int(d // reduction_factor)
    if m < 1:
        raise ValueError(
            f"{owner}.reduction_factor={reduction_factor:g} on {name!r} ({d} features) gives a bottleneck of "
            f"width {d / reduction_factor:.3g} < 1; use reduction_factor <= {d} or set bottleneck_size"
        )
    return m


def style_placements(model: nn.Module, style: str, *, owner: str) -> list[str]:
    """Qualified names of the modules whose outputs get an adapter of ``style``, from the model's layout
    (:mod:`lightning_peft.layouts`), in model order."""
    return block_part_names(model, STYLE_PARTS[style], owner=owner)


@register_tuner("bottleneck")
@dataclass(kw_only=True)
class BottleneckConfig(TunerConfig):
    """Bottleneck adapter hyper-parameters.

    Attributes:
        style: ``"houlsby"`` (after attention and FFN) or ``"pfeiffer"`` (after the FFN only).
        reduction_factor: ``m = d // reduction_factor`` (ignored when ``bottleneck_size`` is set).
        bottleneck_size: explicit ``m``.
        activation: one of ``relu``, ``gelu``, ``swish``/``silu``, ``tanh``.
        scaling: multiplier ``s`` on the adapter branch.
        init: ``"identity"`` (up-projection zero: exact identity) or ``"houlsby"`` (both N(0, 1e-2)).
        train_layer_norms: also train the blocks' LayerNorms (Houlsby et al. do).
        layer_norm_modules: which norms ``train_layer_norms`` means, for models outside the family table.

    Example::

        BottleneckConfig(style="pfeiffer", reduction_factor=16, modules_to_save=["classifier"])
    """

    style: str = "houlsby"
    reduction_factor: float = 16.0
    bottleneck_size: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    init: str = "identity"
    train_layer_norms: bool = False
    layer_norm_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("BottleneckConfig", "style", self.style, list(STYLE_PARTS))
        check_choice("BottleneckConfig", "activation", self.activation, list(ACTIVATIONS))
        check_choice("BottleneckConfig", "init", self.init, ["identity", "houlsby"])
        check_positive("BottleneckConfig", "reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            check_positive("BottleneckConfig", "bottleneck_size", self.bottleneck_size)

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """``init="houlsby"`` is near-identity only: its up-projection starts small, not zero."""
        return self.init == "identity"

    def placements(self, model: nn.Module) -> list[str]:
        """Names of the modules whose outputs get an adapter (family parts or ``target_modules``)."""
        targets = self.target_modules
        if targets is None:
            targets = style_placements(model, self.style, owner=type(self).__name__)
        return find_modules(model, targets, exclude=self.exclude_modules, layers=self.layers)

    def build_adapters(self, model: nn.Module) -> dict[str, nn.Module]:
        """A fresh adapter per placement: ``{module name: adapter}`` (on the base layer's device/dtype)."""
        adapters: dict[str, nn.Module] = {}
        for name in self.placements(model):
            base = model.get_submodule(name)
            d = output_width(base, name)
            m = self.bottleneck_size or bottleneck_width(d, self.reduction_factor, type(self).__name__, name)
            adapter = BottleneckAdapter(
                d, m, activation=self.activation, scaling=self.scaling, init=self.init
            )
            adapters[name] = like(adapter, base)
        return adapters

    def apply(self, model: nn.Module) -> list[str]:
        adapters = self.build_adapters(model)
        for name, adapter in adapters.items():
            replace_module(model, name, AdapterAfter(model.get_submodule(name), adapter))
        names = list(adapters)
        if self.train_layer_norms:
            norms = self.layer_norm_modules
            if norms is None:
                owner = "BottleneckConfig.train_layer_norms"
                norms = block_part_names(model, ("attention_norm", "ffn_norm"), owner=owner)
            for name in find_modules(model, norms, what="layer_norm_modules", layers=self.layers):
                mark(model.get_submodule(name))
        return names


def output_width(module: nn.Module, name: str) -> int:
    """Output width of a Linear / GPT-2 Conv1D (or of a wrapper's ``base_layer``)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:  # transformers Conv1D: (in, out)
        return int(weight.shape[1])
    raise TypeError(
        f"cannot infer the output width of {name!r} ({type(module).__name__}); adapters go after a "
        "Linear/Conv1D projection: target one (e.g. the attention output or FFN output projection)"
    )


_output_width = output_width  # the name tuners/unified.py imports


class BottleneckAdapter(nn.Module):
    """``h + s * up(act(down(h)))``: (..., d) -> (..., d)."""

    def __init__(
        self, d: int, m: int, *, activation: str = "relu", scaling: float = 1.0, init: str = "identity"
    ) -> None:
        super().__init__()
        # Each projection's reset_parameters() gives its init, so it survives meta-device materialisation
        # (see lightning_peft.layers). "houlsby": near-identity, both N(0, 1e-2) with zero biases;
        # "identity": the up-projection zero.
        houlsby = init == "houlsby"
        self.down = NormalInitLinear(d, m, std=1e-2) if houlsby else nn.Linear(d, m)
        self.act = ACTIVATIONS[activation]()
        self.up = NormalInitLinear(m, d, std=1e-2) if houlsby else ZeroInitLinear(m, d)
        self.scaling = scaling
        mark(self)

    def reset_parameters(self) -> None:
        """Re-initialise both projections (the adapter is the identity again with ``init="identity"``)."""
        self.down.reset_parameters()
        self.up.reset_parameters()

    def forward(self, h: Tensor) -> Tensor:
        return h + self.up(self.act(self.down(h))) * self.scaling


class AdapterAfter(BaseLayerWrapper):
    """Runs ``base_layer`` then an adapter on its output (the first element when it returns a tuple)."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled:
            return out
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)
