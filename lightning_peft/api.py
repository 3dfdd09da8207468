"""Free functions over any ``nn.Module``: inject a tuner, freeze, summarise, save/load, merge, disable.

These are the whole plain-PyTorch API; the Lightning callback is a thin layer over them.

Example::

    from lightning_peft import LoRAConfig, inject, param_summary, trainable_state_dict

    inject(model, LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]))
    print(param_summary(model))          # trainable 294,912 / 109,777,152 (0.27%)
    torch.save(trainable_state_dict(model), "adapter.pt")
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_peft.config import TunerConfig
from lightning_peft.fingerprint import check_base
from lightning_peft.layers import (
    META_KEY,
    Adapter,
    HookOwner,
    Mergeable,
    Restorable,
    iter_trainable_parameters,
    mark,
    unmark,
)
from lightning_peft.targeting import find_modules

__all__ = [
    "CONFIG_ATTR",
    "ParamSummary",
    "as_config",
    "disable_adapters",
    "freeze_base",
    "get_config",
    "inject",
    "load_trainable_state_dict",
    "merge",
    "param_summary",
    "trainable_state_dict",
    "unload",
    "unmerge",
]

#: Attribute on the injected root module holding its :class:`TunerConfig`.
CONFIG_ATTR = "_lp_config"


def get_config(model: nn.Module) -> TunerConfig | None:
    """The tuner config injected into ``model`` or any of its submodules (None if none)."""
    for module in model.modules():
        config = getattr(module, CONFIG_ATTR, None)
        if config is not None:
            return config
    return None


def inject(model: nn.Module, config: TunerConfig | Sequence[TunerConfig]) -> list[str]:
    """Inject ``config``'s tuner into ``model`` in place, then freeze everything but the tuner.

    Targets are wrapped where they are (the original module stays reachable as ``base_layer``), modules
    in ``config.modules_to_save`` become fully trainable, and every other parameter is frozen.

    Args:
        config: one tuner config, or a list of them: several tuners on one model (a
            :class:`~lightning_peft.stack.TunerStack`), e.g. ``[LoRAConfig(...), BitFitConfig()]``. Two
            members that want to wrap the same module are refused, naming it; nothing stays injected then.

    Returns:
        The names of the modules the tuner(s) changed.

    Raises:
        ValueError: ``model`` already has a tuner, the config matches nothing (closest names listed), or
            two stacked tuners collide.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject() takes an nn.Module as its first argument, got {type(model).__name__}")
    config = as_config(config)
    existing = get_config(model)
    if existing is not None:
        raise ValueError(
            f"this model already has a {existing.method!r} tuner injected; a second inject() would wrap "
            "the adapters themselves. Inject several tuners at once with inject(model, [config_a, "
            "config_b]), or call lightning_peft.unload(model) first to remove it."
        )
    modes = {id(m): m.training for m in model.modules()}
    try:
        changed = config.apply(model)
        for member in config.members():
            if member.modules_to_save:
                # not a wrap: a module a tuner wrapped (its adapter with it) may be trained in full too
                saved = find_modules(
                    model, member.modules_to_save, what="modules_to_save", through_wrappers=True
                )
                for name in saved:
                    mark(model.get_submodule(name))
    except Exception:
        if len(config.members()) > 1:  # take out what the members before the failing one injected
            unload(model, merge_weights=False)
        raise
    _follow_mode(model, modes)
    setattr(model, CONFIG_ATTR, config)
    freeze_base(model)
    return changed


def _follow_mode(model: nn.Module, modes: dict[int, bool]) -> None:
    """New tuner modules take the train/eval mode of the module they joined (``modes``: the mode of every
    module before injection): a dropout added to a model in eval mode (every ``from_pretrained`` model)
    must not draw random masks until ``model.train()``."""

    def visit(module: nn.Module, training: bool) -> None:
        for child in module.children():
            if id(child) in modes:
                visit(child, modes[id(child)])
            else:
                child.training = training
                visit(child, training)

    visit(model, model.training)


def as_config(config: TunerConfig | Sequence[TunerConfig]) -> TunerConfig:
    """One config for ``inject``: a config as is, a list as a :class:`~lightning_peft.stack.TunerStack`
    (a one-element list as its element)."""
    from lightning_peft.stack import TunerStack

    if isinstance(config, TunerConfig):
        return config
    if isinstance(config, (list, tuple)):
        if len(config) == 1 and isinstance(config[0], TunerConfig):
            return config[0]
        return TunerStack(configs=list(config))
    raise TypeError(
        f"inject() takes a TunerConfig (e.g. LoRAConfig(...)) or a list of them, got {type(config).__name__}"
    )


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` except those a tuner marked trainable (``inject`` calls it;
    call it again after changing what is marked, as ``train_adapter`` does)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in iter_trainable_parameters(model):
        p.requires_grad_(True)


#: The former name of :func:`freeze_base`, kept for existing code.
mark_trainable = freeze_base


@dataclass(frozen=True)
class ParamSummary:
    """Parameter counts of a model with a tuner (shared parameters counted once)."""

    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def as_dict(self) -> dict[str, float]:
        return {"trainable": self.trainable, "total": self.total, "percent": self.percent}

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"


def param_summary(model: nn.Module) -> ParamSummary:
    """Trainable (tuner-marked) and total parameter counts of ``model``."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trainable = sum(p.numel() for _, p in iter_trainable_parameters(model))
    return ParamSummary(trainable=trainable, total=total)


def trainable_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    """The tuner's parameters (and ``modules_to_save``), keyed by their names in ``model``."""
    return OrderedDict((name, p.detach()) for name, p in iter_trainable_parameters(model))


def load_trainable_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True
) -> None:
    """Load tensors saved by :func:`trainable_state_dict` into ``model`` (which must have the same tuner).

    ``state_dict`` may also be a whole checkpoint of the ``PEFT`` callback (``torch.load(path)``): its
    stored base-model fingerprint is checked against ``model`` first. A plain name -> tensor mapping carries
    no fingerprint, so nothing tells a same-shaped base with other weights apart there; use
    :func:`lightning_peft.load_checkpoint` with the checkpoint file for that check.

    Args:
        strict: refuse missing and unexpected keys (recommended; the message lists them).

    Raises:
        ValueError: no tuner in ``model``, key mismatch (with ``strict``) or a shape mismatch.
    """
    if isinstance(state_dict, (str, bytes)) or hasattr(state_dict, "__fspath__"):
        raise TypeError(
            f"load_trainable_state_dict takes a state dict (name -> tensor), got the path {state_dict!r}; "
            "for a checkpoint file use lightning_peft.load_checkpoint(model, path)"
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"load_trainable_state_dict takes a mapping of tensors, got {type(state_dict).__name__}"
        )
    meta = state_dict.get(META_KEY)
    if isinstance(state_dict.get("state_dict"), Mapping):  # a whole checkpoint of the PEFT callback
        meta = meta or state_dict["state_dict"].get(META_KEY)
        state_dict = state_dict["state_dict"]
    if meta is not None:  # our own save format: check the base model it was trained on first
        check_base(model, meta, where="these adapter weights")
    state_dict = {k: v for k, v in state_dict.items() if k != META_KEY}
    params = dict(iter_trainable_parameters(model))
    if not params:
        raise ValueError(
            "this model has no tuner injected, so there is nothing to load adapter weights into; call "
            "lightning_peft.inject(model, config) with the config the weights were trained with first"
        )
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if strict and (missing or unexpected):
        report = _key_report("adapter weights do not match the model's tuner", missing, unexpected)
        raise ValueError(report + _prefix_hint(missing, unexpected))
    with torch.no_grad():
        for name, value in state_dict.items():
            if name not in params:
                continue
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"shape mismatch for {name!r}: saved {tuple(value.shape)}, model {tuple(target.shape)} "
                    "(different r, bottleneck size or base model?)"
                )
            target.copy_(value)


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """Say so when the two key sets differ by a leading path (``backbone.``): the weights were saved from
    the LightningModule and are loaded into its backbone, or the other way round."""
    if not missing or not unexpected:
        return ""
    for a, b, into in ((unexpected, missing, "this model"), (missing, unexpected, "the saved weights")):
        head = a[0][: len(a[0]) - len(b[0])] if a[0].endswith(b[0]) else ""
        if head and all(k.startswith(head) for k in a) and {k[len(head) :] for k in a} == set(b):
            return (
                f"\nThe saved keys and this model's differ by the prefix {head!r} only ({into} lacks it): "
                "load into the module the weights were saved from (the LightningModule vs its backbone), "
                "or strip/add the prefix."
            )
    return ""


def _key_report(title: str, missing: list[str], unexpected: list[str], limit: int = 8) -> str:
    def show(keys: list[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    lines = [title + ":"]
    if missing:
        lines.append(f"  missing from the saved weights ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  not in this model ({len(unexpected)}): {show(unexpected)}")
    return "\n".join(lines)


def _mergeable(model: nn.Module) -> list[Mergeable]:
    layers = [m for m in model.modules() if isinstance(m, Mergeable)]
    if not layers:
        adapters = [type(m).__name__ for m in model.modules() if isinstance(m, Adapter)]
        what = f"its adapters ({', '.join(sorted(set(adapters)))}) are not" if adapters else "it has no tuner"
        raise ValueError(f"nothing to merge in {type(model).__name__}: {what} mergeable (only LoRA-like are)")
    return layers


def merge(model: nn.Module) -> None:
    """Fold every mergeable adapter (LoRA) into its base weight: inference then costs nothing extra."""
    for layer in _mergeable(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    for layer in _mergeable(model):
        layer.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` behaves as the base model (adapters off, merged ones unmerged,
    BitFit biases back to their original values); everything is restored on exit.

    ``modules_to_save`` modules are trained in place and stay as trained.
    """
    config = get_config(model)
    adapters = [m for m in model.modules() if isinstance(m, Adapter) and not m.disabled]
    remerge = [m for m in adapters if isinstance(m, Mergeable) and m.merged]
    with config.disabled(model) if config is not None else contextlib.nullcontext():
        try:
            for m in remerge:
                m.unmerge()
            for m in adapters:
                m.disabled = True
            yield
        finally:
            for m in adapters:
                m.disabled = False
            for m in remerge:
                m.merge()


def unload(model: nn.Module, *, merge_weights: bool = True) -> nn.Module:
    """Remove the tuner and leave the plain base model, which loads without this package.

    * Wrapped layers (LoRA, bottleneck adapters, the unified view's parallel adapters) are replaced by
      their ``base_layer``, LoRA merged into it first when ``merge_weights``.
    * Tuner modules acting through hooks (:class:`~lightning_peft.layers.HookOwner`: prompt tuning,
      P-tuning, K-Adapter, AdapterDrop's controller, prefix tuning) get ``remove_hooks()``, then
      ``restore()`` where they have one (e.g. the attention implementation they switched), and are
      deleted from their parent; wrappers that own hooks get ``remove_hooks()`` too.
    * Markers and the stored config go, and every tuner's :meth:`~lightning_peft.config.TunerConfig.remove`
      runs (BitFit forgets its saved original biases; its trained biases stay).

    Afterwards the model has the base's modules, parameters, buffers and hooks, and computes what the base
    computes (with LoRA merged: the tuned function).

    ``merge_weights=True`` means "keep what was learned in the weights": a tuner whose trained tensors
    cannot be folded into base weights (bottleneck adapters, virtual tokens, prefixes, knowledge adapters)
    is refused, as with :func:`merge`, rather than silently dropped. ``merge_weights=False`` drops every
    tuner. Nothing is changed when it raises.

    Raises:
        ValueError: ``merge_weights`` with a non-mergeable tuner, or a tuner module that cannot be taken
            out (it sits outside the base layers it changes but does not implement ``remove_hooks()``).
    """
    named = list(model.named_modules())
    wrapped = [(n, m) for n, m in named if isinstance(m, Adapter) and hasattr(m, "base_layer")]
    owners = [(n, m) for n, m in named if isinstance(m, HookOwner)]
    attached = [(n, m) for n, m in owners if n and not hasattr(m, "base_layer")]
    _check_unloadable(named, wrapped, attached, merge_weights)
    for _, owner in owners:
        owner.remove_hooks()
        if isinstance(owner, Restorable):
            owner.restore()
    parents = dict(named)
    for name, _ in attached:  # before wrappers move: their paths are still the recorded ones
        parent_name, _, child = name.rpartition(".")
        delattr(parents[parent_name], child)
    for name, module in wrapped:
        if merge_weights and isinstance(module, Mergeable):  # every wrapper is, once checked above
            module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base_layer)
    config = get_config(model)
    if config is not None:
        config.remove(model)
    for module in model.modules():
        unmark(module)
        module.__dict__.pop(CONFIG_ATTR, None)
    return model


def _check_unloadable(
    named: list[tuple[str, nn.Module]],
    wrapped: list[tuple[str, nn.Module]],
    attached: list[tuple[str, nn.Module]],
    merge_weights: bool,
) -> None:
    """Raise before :func:`unload` changes anything if it could not finish."""
    # An Adapter (it has ``disabled``) that neither wraps a base layer nor owns its hooks would stay
    # behind, still changing outputs through hooks unload cannot see.
    stuck = [
        f"{n!r} ({type(m).__name__})"
        for n, m in named
        if isinstance(m, Adapter) and not hasattr(m, "base_layer") and not isinstance(m, HookOwner)
    ]
    if stuck:
        raise ValueError(
            f"cannot unload {', '.join(stuck)}: a tuner module outside the base layers must implement "
            "remove_hooks() (lightning_peft.layers.HookOwner) so its hooks can be taken off"
        )
    if not merge_weights:
        return
    refused = [f"{n!r} ({type(m).__name__})" for n, m in wrapped if not isinstance(m, Mergeable)]
    refused += [f"{n!r} ({type(m).__name__})" for n, m in attached if next(m.parameters(), None) is not None]
    if refused:
        raise ValueError(
            f"{', '.join(refused)} cannot be merged into the base weights; use merge_weights=False to drop "
            "the tuner and keep the base model as it was"
        )
