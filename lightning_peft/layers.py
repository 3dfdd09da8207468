"""What an injected layer is: small protocols and the structural markers that say what trains.

Trainable parameters are found by walking modules, never by matching parameter names: every module
that owns trainable PEFT state carries the attribute :data:`TRAINABLE_ATTR`, either ``True`` (all of its
parameters, recursively: a LoRA ``lora_A``, a bottleneck adapter, a ``modules_to_save`` head) or a
frozenset of local parameter names (BitFit marks ``{"bias"}`` on a frozen ``Linear``). A module whose whole
subtree is tuner state even while frozen (K-Adapter's set of knowledge adapters, of which only one trains at
a time) carries :data:`STATE_ATTR`: checkpoints keep it and the base-model fingerprint leaves it out.

Tuners change a model in two ways. Wrappers replace a layer and keep it as ``base_layer`` (LoRA,
bottleneck adapters). Other tuner modules sit next to the base and reach into it with forward hooks
(prompt tuning, P-tuning, K-Adapter, AdapterDrop, prefix tuning, the unified view's parallel adapters):
those implement :class:`HookOwner`, so :func:`lightning_peft.unload` can take them out again.

Initialisation lives in ``reset_parameters()`` of the module that *directly* holds each tuner tensor. A
model built on the meta device (``Trainer.init_module(empty_init=True)`` under ``ModelParallelStrategy``,
``with torch.device("meta")``) gets its values from ``to_empty()`` followed by ``reset_parameters()``:
Lightning's ``_materialize_distributed_module`` calls it on every module holding tensors directly, parents
before children, and skips modules holding none; ``model.apply(lambda m: m.reset_parameters())`` visits
children first. Init done in a parent's ``__init__`` (``nn.init.zeros_(self.up.weight)``) would be lost,
either way: the child ``nn.Linear`` resets to Kaiming-uniform, and LoRA would no longer start as a no-op.
So the linear layers with a tuner's own init are small ``nn.Linear`` subclasses (:class:`ZeroInitLinear`,
:class:`NormalInitLinear`, :class:`IdentityInitLinear`: same state-dict names, still ``nn.Linear``) whose
``reset_parameters()`` gives that init, and tuner modules holding parameters themselves (LoRA's embedding
factors, PHM layers, ...) define ``reset_parameters()`` for those. Then every visiting order and every
subset of visited modules gives the tuner's init. The adapter modules above them (a LoRA layer, a
bottleneck or Compacter adapter, the unified view's branches, AdapterFusion, a K-Adapter layer) define
``reset_parameters()`` as well, re-initialising every tuner tensor under them (never a base layer), for
users who re-initialise an adapter by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "META_KEY",
    "STATE_ATTR",
    "TRAINABLE_ATTR",
    "Adapter",
    "BaseLayerWrapper",
    "HookOwner",
    "IdentityInitLinear",
    "Mergeable",
    "NormalInitLinear",
    "OwnsHooks",
    "Restorable",
    "ZeroInitLinear",
    "iter_trainable_parameters",
    "like",
    "mark",
    "mark_state",
    "remove_handles",
    "replace_module",
    "tuner_state_names",
    "unmark",
]

TRAINABLE_ATTR = "_lp_trainable"
#: The key under which lightning-peft stores its metadata (tuner config, base fingerprint) in the files it
#: writes: adapter-only checkpoints and named-adapter files.
META_KEY = "__lightning_peft__"
STATE_ATTR = "_lp_state"


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


@runtime_checkable
class HookOwner(Protocol):
    """A tuner module that acts on the model through hooks registered on *other* modules.

    It keeps the :class:`~torch.utils.hooks.RemovableHandle` of every hook it registers (usually in a
    list ``self._handles``) and removes them all in :meth:`remove_hooks`, which must be safe to call twice.
    :func:`lightning_peft.unload` finds these modules structurally (``isinstance(m, HookOwner)``), calls
    :meth:`remove_hooks`, then :meth:`Restorable.restore` when the module has one, and finally takes the
    module out of the model: a wrapper (one with ``base_layer``) is replaced by its base layer, any other
    module is deleted from its parent. Trained tensors of a non-wrapper owner cannot be folded into the
    base weights, so ``unload(merge_weights=True)`` refuses owners that hold parameters.
    """

    def remove_hooks(self) -> None: ...


@runtime_checkable
class Restorable(Protocol):
    """Optional companion of :class:`HookOwner`: a tuner module that changed the model in a way other
    than hooks (``config._attn_implementation``, plain attributes left on base modules) undoes it in
    :meth:`restore`, which :func:`lightning_peft.unload` calls right after ``remove_hooks()``."""

    def restore(self) -> None: ...


class OwnsHooks:
    """Mixin for tuner modules that act through hooks on other modules (:class:`HookOwner`): :meth:`keep`
    the handle of every hook registered, and :meth:`remove_hooks` takes them all off (safe to call twice).
    ``disabled`` is the :class:`Adapter` switch the hooks check."""

    disabled: bool = False

    def keep(self, handle: RemovableHandle) -> RemovableHandle:
        """Record ``handle`` so :meth:`remove_hooks` can take its hook off; returns it."""
        self.__dict__.setdefault("_handles", []).append(handle)
        return handle

    def remove_hooks(self) -> None:
        remove_handles(self.__dict__.setdefault("_handles", []))


def like(module: nn.Module, reference: nn.Module | Tensor) -> nn.Module:
    """``module`` moved to the device and dtype of ``reference`` (a tensor, or a module's first parameter):
    new tuner modules live where the base layer they join lives. A reference without parameters leaves
    ``module`` as it is."""
    ref = reference if isinstance(reference, Tensor) else next(reference.parameters(), None)
    return module if ref is None else module.to(device=ref.device, dtype=ref.dtype)


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove every hook in ``handles`` and empty the list (so a second call does nothing)."""
    for handle in handles:
        handle.remove()
    handles.clear()


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


def unmark(module: nn.Module, *, state: bool = True) -> nn.Module:
    """Undo :func:`mark` (and :func:`mark_state` with ``state``): ``module``'s own parameters are no longer
    tuner state. Its submodules keep their marks."""
    module.__dict__.pop(TRAINABLE_ATTR, None)
    if state:
        module.__dict__.pop(STATE_ATTR, None)
    return module


def mark_state(module: nn.Module) -> nn.Module:
    """Mark every parameter and buffer under ``module`` as tuner state, trainable or not: adapter-only
    checkpoints keep it, and it is no part of the base model's fingerprint."""
    setattr(module, STATE_ATTR, True)
    return module


def tuner_state_names(model: nn.Module) -> set[str]:
    """Names (relative to ``model``, under every alias) of the parameters and buffers of modules marked
    with :func:`mark_state`."""
    names: set[str] = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if getattr(module, STATE_ATTR, False) is True:
            prefix = f"{mod_name}." if mod_name else ""
            names |= {prefix + n for n, _ in module.named_parameters(remove_duplicate=False)}
            names |= {prefix + n for n, _ in module.named_buffers(remove_duplicate=False)}
    return names


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


# -- linear layers that keep a tuner's init through meta-device materialisation ----------------------------
# Each reset runs nn.Linear's own first, then overwrites it: building one draws the random numbers a plain
# nn.Linear draws (then those of its own init, if random), so a seeded LoRA still starts from the very
# lora_A of Hugging Face PEFT, which builds lora_B as a plain nn.Linear and zeroes it.


class ZeroInitLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias start at, and reset to, zero (LoRA's ``B``, an adapter's
    up-projection: what makes an untrained tuner the identity)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalInitLinear(nn.Linear):
    """``nn.Linear`` with weight ~ N(0, ``std``) and a zero bias, at construction and on reset."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        std: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.std = std  # set first: nn.Linear.__init__ calls reset_parameters, which reads it
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std:g}"


class IdentityInitLinear(nn.Linear):
    """Square ``nn.Linear`` starting at, and resetting to, the identity map (weight ``I``, bias zero)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.eye_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
