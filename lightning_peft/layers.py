"""What an injected layer is: small protocols and the structural marker that says what trains.

Trainable parameters are found by walking modules, never by matching parameter names: every module
that owns trainable PEFT state carries the attribute :data:`TRAINABLE_ATTR`, either ``True`` (all of its
parameters, recursively: a LoRA ``lora_A``, a bottleneck adapter, a ``modules_to_save`` head) or a
frozenset of local parameter names (BitFit marks ``{"bias"}`` on a frozen ``Linear``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = [
    "TRAINABLE_ATTR",
    "Adapter",
    "BaseLayerWrapper",
    "Mergeable",
    "iter_trainable_parameters",
    "mark",
    "replace_module",
]

TRAINABLE_ATTR = "_lp_trainable"


@runtime_checkable
class Adapter(Protocol):
    """Every injected layer: it can be switched off without being removed."""

    disabled: bool


@runtime_checkable
class Mergeable(Protocol):
    """LoRA-like layers whose update folds into the base weight exactly."""

    merged: bool

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


class BaseLayerWrapper(nn.Module):
    """A module that wraps the original one as ``base_layer`` and still shows its ``weight`` / ``bias``:
    model code reads them through the wrapper (transformers checks ``self.wo.weight.dtype``, for one)."""

    base_layer: nn.Module

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)


def mark(module: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Mark ``module`` as trainable PEFT state: all its parameters, or only the local ``names``."""
    if names is None:
        setattr(module, TRAINABLE_ATTR, True)
    else:
        current = getattr(module, TRAINABLE_ATTR, frozenset())
        if current is True:
            return module
        setattr(module, TRAINABLE_ATTR, frozenset(current) | frozenset(names))
    return module


def iter_trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yield ``(qualified_name, parameter)`` for every parameter a tuner marked trainable.

    Names are relative to ``model``, so the same walk gives the right keys whether ``model`` is the bare
    network, a LightningModule holding it, or a DDP wrapper. Shared parameters are yielded once.
    """
    seen: set[int] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        marker = getattr(module, TRAINABLE_ATTR, None)
        if marker is None:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if marker is True:
            params: Iterable[tuple[str, nn.Parameter]] = module.named_parameters()
        else:
            params = ((n, p) for n, p in module.named_parameters(recurse=False) if n in marker)
        for local, param in params:
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + local, param


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at dotted path ``name`` inside ``root`` (in place)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
