"""The unified view of parameter-efficient tuning (He et al. 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning").

Adapters, prefix tuning and LoRA all add a modification ``Δh`` to some hidden representation ``h``. They
differ along four axes, which :class:`DesignPoint` names:

* ``form``: the function computing ``Δh``: ``"bottleneck"`` (``up(act(down(x)))``), ``"lowrank"``
  (``B A x``, LoRA) or ``"prefix"`` (attention over ``l`` learned keys/values);
* ``at``: the modified representation: ``"attention"`` (the attention sub-layer's output, or its q/v
  projections for the low-rank form), ``"attention_heads"`` (each head's output: prefix tuning) or ``"ffn"``;
* ``insertion``: ``"sequential"`` (``Δh`` computed from ``h`` itself: ``h + Δh(h)``) or ``"parallel"``
  (computed from the sub-layer's input ``x``: ``h + Δh(x)``);
* ``composition``: ``"add"``, ``"scaled_add"`` (``h + s Δh``) or ``"gated_add"`` (``h + σ(g(x)) Δh``, a
  learned per-token gate).

The named methods are presets (:data:`PRESETS`): ``adapter``/``houlsby`` and ``pfeiffer`` (sequential
bottlenecks: the very modules of :class:`~lightning_peft.tuners.bottleneck.BottleneckConfig`), ``lora``
(parallel low-rank at attention, scaled), ``prefix`` (prefix at attention heads, gated by the softmax),
``parallel`` / ``scaled_parallel`` (parallel bottleneck at the FFN, reduction 2, ``s = 1`` / ``4``) and
``mam`` (prefix ``l = 30`` at attention + scaled parallel bottleneck 512, ``s = 4``, at the FFN). A new
point needs no code, e.g. a gated parallel adapter at attention::

    UnifiedConfig(points=[{"form": "bottleneck", "at": "attention", "insertion": "parallel",
                           "composition": "gated_add", "bottleneck_size": 16}])

Parallel insertion reads the sub-layer input with a forward pre-hook on the sub-layer's first projection
(BERT ``attention.self.query`` / ``intermediate.dense``, GPT-2 ``c_attn`` / ``c_fc``, Llama ``q_proj`` /
``gate_proj``) and adds ``Δh(x)`` to its output projection's result; the wrapper keeps that hook's handle
(:class:`~lightning_peft.layers.HookOwner`), so :func:`lightning_peft.unload` removes it with the wrapper.

The multi-head parallel adapter (``form="bottleneck", at="attention_heads", insertion="parallel"``)
modifies each head's attention output as prefix tuning does: head ``i`` gets
``Δh_i(x) = up_i(act(down_i(x)))`` (``d -> m -> head_dim``, ``m`` per head) of the attention sub-layer's
input ``x``, added to that head's output before the output projection: ``W_o [h_1 + Δh_1; ...; h_H + Δh_H]``
(:class:`MultiHeadParallelAdapter` wraps the output projection and adds to its input). All heads' down
projections are one ``Linear(d, H m)``; the up projections are an ``(H, m, head_dim)`` tensor (a
block-diagonal ``H m -> H head_dim`` map) starting at zero; ``gated_add`` learns one gate per head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import like, replace_module
from lightning_peft.layouts import block_part_names, find_stacks, resolve_path
from lightning_peft.targeting import find_modules
from lightning_peft.tuners.bottleneck import (
    ACTIVATIONS,
    AdapterAfter,
    BottleneckAdapter,
    _output_width,
    bottleneck_width,
)
from lightning_peft.tuners.lora import LoRAConfig
from lightning_peft.tuners.parallel_adapter import (
    GatedBranch,
    MultiHeadBranch,
    MultiHeadParallelAdapter,
    ParallelAdapter,
    Residual,
)
from lightning_peft.tuners.prefix import inject_prefix

__all__ = [
    "PRESETS",
    "DesignPoint",
    "GatedBranch",
    "MultiHeadBranch",
    "MultiHeadParallelAdapter",
    "ParallelAdapter",
    "UnifiedConfig",
]

FORMS = ("bottleneck", "lowrank", "prefix")
REPRESENTATIONS = ("attention", "attention_heads", "ffn")
INSERTIONS = ("sequential", "parallel")
COMPOSITIONS = ("add", "scaled_add", "gated_add")


def _sub_layer_inputs(model: nn.Module, site: str) -> dict[str, str]:
    """``{block name: module}`` of the first projection reading each block's ``site`` sub-layer input (the
    query projection, or the FFN's input projection): a parallel branch reads the same ``x``. Blocks are
    keyed by path, so an encoder-decoder's encoder and decoder blocks stay apart."""
    out: dict[str, str] = {}
    for stack in find_stacks(model, owner="UnifiedConfig"):
        layout = stack.layout.block
        rel = f"{layout.attention}.{layout.query}" if site == "attention" else layout.ffn_input
        for block_name, block in zip(stack.block_names(), stack.blocks, strict=True):
            found = resolve_path(block, rel)
            if found is not None:
                out[block_name] = f"{block_name}.{found}"
    return out


def _block_of(name: str, blocks: dict[str, str]) -> str:
    """The block (a key of ``blocks``) that module ``name`` sits in."""
    return max((b for b in blocks if name.startswith(b + ".")), key=len)


@dataclass(kw_only=True)
class DesignPoint:
    """One modification: where it goes and how it combines (see the module docstring).

    Attributes:
        form: ``"bottleneck"``, ``"lowrank"`` or ``"prefix"``.
        at: ``"attention"``, ``"attention_heads"`` or ``"ffn"``.
        insertion: ``"sequential"`` or ``"parallel"``.
        composition: ``"add"``, ``"scaled_add"`` or ``"gated_add"``.
        bottleneck_size: bottleneck width (per head at ``attention_heads``), LoRA rank or prefix length
            (``None``: from ``reduction_factor`` for bottlenecks, 8 for LoRA, 20 for prefixes).
        reduction_factor: bottleneck width ``d // reduction_factor`` when ``bottleneck_size`` is None
            (at ``attention_heads``: that width split evenly over the heads, at least 1 per head).
        scale: ``s`` of ``scaled_add``.
        activation: the bottleneck's non-linearity.
        prefix_projection_size: the prefix MLP's hidden width (``None``: plain prefixes).
    """

    form: str
    at: str
    insertion: str
    composition: str = "add"
    bottleneck_size: int | None = None
    reduction_factor: float = 16.0
    scale: float = 1.0
    activation: str = "relu"
    prefix_projection_size: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("form", FORMS), ("at", REPRESENTATIONS), ("insertion", INSERTIONS)):
            check_choice("DesignPoint", name, getattr(self, name), list(allowed))
        check_choice("DesignPoint", "composition", self.composition, list(COMPOSITIONS))
        check_choice("DesignPoint", "activation", self.activation, list(ACTIVATIONS))
        check_positive("DesignPoint", "reduction_factor", self.reduction_factor)
        check_positive("DesignPoint", "scale", self.scale)
        if self.bottleneck_size is not None:
            check_positive("DesignPoint", "bottleneck_size", self.bottleneck_size)
        if self.composition != "scaled_add" and self.scale != 1.0:
            raise ValueError(f"DesignPoint.scale={self.scale} needs composition='scaled_add'")
        wanted = {
            "prefix": ("attention_heads", "parallel", "gated_add"),
            "lowrank": (None, "parallel", "scaled_add"),
        }.get(self.form)
        if wanted is not None:
            at, insertion, composition = wanted
            if (at and self.at != at) or self.insertion != insertion or self.composition != composition:
                raise ValueError(
                    f"DesignPoint form={self.form!r} is defined at={at or 'attention/ffn'!r}, "
                    f"insertion={insertion!r}, composition={composition!r} (He et al. 2022, table 1); got "
                    f"at={self.at!r}, insertion={self.insertion!r}, composition={self.composition!r}"
                )
        if self.form == "lowrank" and self.at == "attention_heads":
            raise ValueError("DesignPoint form='lowrank' modifies 'attention' (q/v) or 'ffn' projections")
        if self.form == "bottleneck" and self.at == "attention_heads" and self.insertion != "parallel":
            raise ValueError(
                "DesignPoint form='bottleneck' at='attention_heads' is the multi-head parallel adapter: "
                "it reads the attention sub-layer input, so insertion must be 'parallel', got "
                f"{self.insertion!r}"
            )


PRESETS: dict[str, list[dict[str, Any]]] = {
    "houlsby": [
        {"form": "bottleneck", "at": "attention", "insertion": "sequential"},
        {"form": "bottleneck", "at": "ffn", "insertion": "sequential"},
    ],
    "pfeiffer": [{"form": "bottleneck", "at": "ffn", "insertion": "sequential"}],
    "lora": [{"form": "lowrank", "at": "attention", "insertion": "parallel", "composition": "scaled_add"}],
    "prefix": [
        {"form": "prefix", "at": "attention_heads", "insertion": "parallel", "composition": "gated_add"}
    ],
    "parallel": [{"form": "bottleneck", "at": "ffn", "insertion": "parallel", "reduction_factor": 2.0}],
    "scaled_parallel": [
        {
            "form": "bottleneck",
            "at": "ffn",
            "insertion": "parallel",
            "reduction_factor": 2.0,
            "composition": "scaled_add",
            "scale": 4.0,
        },
    ],
    "mam": [
        {
            "form": "prefix",
            "at": "attention_heads",
            "insertion": "parallel",
            "composition": "gated_add",
            "bottleneck_size": 30,
        },
        {
            "form": "bottleneck",
            "at": "ffn",
            "insertion": "parallel",
            "bottleneck_size": 512,
            "composition": "scaled_add",
            "scale": 4.0,
        },
    ],
}
PRESETS["adapter"] = PRESETS["houlsby"]


def _input_width(module: nn.Module, name: str) -> int:
    module = getattr(module, "base_layer", module)  # the projection itself when already wrapped
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2:  # transformers Conv1D: (in, out)
        return int(weight.shape[0])
    raise TypeError(f"cannot infer the input width of {name!r} ({type(module).__name__})")


def _num_heads(model: nn.Module) -> int:
    for module in model.modules():
        heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
        if isinstance(heads, int):
            return heads
    raise ValueError("UnifiedConfig: at='attention_heads' needs a model whose config has num_attention_heads")


def _bottleneck(model: nn.Module, point: DesignPoint, layers: list[int] | None) -> list[str]:
    part = "ffn_output" if point.at == "ffn" else "attention_output"
    sinks = find_modules(model, block_part_names(model, part, owner="UnifiedConfig"), layers=layers)
    sources: dict[str, str] = {}
    if point.insertion == "parallel":
        sources = _sub_layer_inputs(model, "ffn" if point.at == "ffn" else "attention")
    for name in sinks:
        base = model.get_submodule(name)
        if point.at == "attention_heads":
            _multi_head(model, point, name, sources[_block_of(name, sources)])
            continue
        d = _output_width(base, name)
        m = point.bottleneck_size or bottleneck_width(d, point.reduction_factor, "DesignPoint", name)
        scale = point.scale if point.composition == "scaled_add" else 1.0
        if point.insertion == "sequential" and point.composition != "gated_add":
            # Exactly BottleneckConfig's module: the adapter/houlsby/pfeiffer presets are that method.
            adapter: nn.Module = BottleneckAdapter(d, m, activation=point.activation, scaling=scale)
            replace_module(model, name, AdapterAfter(base, like(adapter, base)))
            continue
        branch = GatedBranch(
            d, m, activation=point.activation, scale=scale, gated=point.composition == "gated_add"
        )
        like(branch, base)
        if point.insertion == "sequential":
            replace_module(model, name, AdapterAfter(base, Residual(branch)))
            continue
        wrapper = ParallelAdapter(base, branch)
        replace_module(model, name, wrapper)
        source = model.get_submodule(sources[_block_of(name, sources)])
        wrapper.keep(source.register_forward_pre_hook(wrapper.capture, with_kwargs=True))
    return sinks


def _multi_head(model: nn.Module, point: DesignPoint, name: str, source: str) -> None:
    base = model.get_submodule(name)
    d, width, heads = _output_width(base, name), _input_width(base, name), _num_heads(model)
    if width % heads:
        raise ValueError(f"UnifiedConfig: {name!r} reads {width} features, not a multiple of {heads} heads")
    m = point.bottleneck_size or max(1, int(d // point.reduction_factor) // heads)
    scale = point.scale if point.composition == "scaled_add" else 1.0
    branch = MultiHeadBranch(
        d,
        heads,
        width // heads,
        m,
        activation=point.activation,
        scale=scale,
        gated=point.composition == "gated_add",
    )
    wrapper = MultiHeadParallelAdapter(base, like(branch, base))
    replace_module(model, name, wrapper)
    hook = model.get_submodule(source).register_forward_pre_hook(wrapper.capture, with_kwargs=True)
    wrapper.keep(hook)


@register_tuner("unified")
@dataclass(kw_only=True)
class UnifiedConfig(TunerConfig):
    """A point (or several) of the unified design space.

    Attributes:
        preset: a named method (``adapter``, ``houlsby``, ``pfeiffer``, ``lora``, ``prefix``, ``parallel``,
            ``scaled_parallel``, ``mam``); ``None`` with no ``points`` means ``"parallel"``.
        points: your own design points (dicts of :class:`DesignPoint` fields) instead of a preset.

    ``layers`` restricts bottleneck and low-rank points to those blocks.

    Example::

        UnifiedConfig(preset="mam")
        UnifiedConfig(points=[{"form": "bottleneck", "at": "attention", "insertion": "parallel",
                               "composition": "gated_add"}])
    """

    preset: str | None = None
    points: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise ValueError(
                "UnifiedConfig.target_modules must be None: each design point names its place (at=...)"
            )
        if self.preset is not None and self.points is not None:
            raise ValueError(
                f"UnifiedConfig: preset={self.preset!r} and points=[...] conflict; give one (a preset is a "
                "fixed list of points: PRESETS[name])"
            )
        if self.preset is None and self.points is None:
            raise ValueError(
                f"UnifiedConfig needs preset=... (one of {', '.join(map(repr, PRESETS))}) or points=[...]"
            )
        if self.preset is not None:
            check_choice("UnifiedConfig", "preset", self.preset, list(PRESETS))
        if self.points is not None and not self.points:
            raise ValueError("UnifiedConfig.points is empty; give at least one design point")
        points = self.design_points()
        places = [(p.form, p.at, p.insertion) for p in points if p.form != "lowrank"]
        dupes = sorted({p for p in places if places.count(p) > 1})
        if dupes or sum(p.form == "lowrank" for p in points) > 1:
            raise ValueError(
                f"UnifiedConfig: conflicting design points modify the same place twice {dupes or 'lowrank'}; "
                "combine presets by listing distinct points"
            )

    def design_points(self) -> list[DesignPoint]:
        """The validated points of this config (a preset's, or ``points``)."""
        raw = self.points if self.points is not None else PRESETS[self.preset]
        out = []
        for item in raw:
            names = {f.name for f in dataclasses.fields(DesignPoint)}
            unknown = sorted(set(item) - names)
            if unknown:
                raise ValueError(f"UnifiedConfig.points: unknown field(s) {unknown}; valid: {sorted(names)}")
            out.append(DesignPoint(**item))
        return out

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        """Prefix points change outputs when untrained; every other point starts at exactly zero."""
        return not any(p.form == "prefix" for p in self.design_points())

    def apply(self, model: nn.Module) -> list[str]:
        changed: list[str] = []
        for point in self.design_points():
            if point.form == "prefix":
                n = point.bottleneck_size or 20
                changed.append(inject_prefix(model, n, point.prefix_projection_size, owner="UnifiedConfig"))
            elif point.form == "lowrank":
                r = point.bottleneck_size or 8
                targets = (
                    None
                    if point.at == "attention"
                    else block_part_names(model, "ffn_projections", owner="UnifiedConfig")
                )
                lora = LoRAConfig(r=r, alpha=point.scale * r, target_modules=targets, layers=self.layers)
                changed += lora.apply(model)
            else:
                changed += _bottleneck(model, point, self.layers)
        return changed
