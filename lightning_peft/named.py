"""Named adapters: several bottleneck-style adapters on one base model, one task each.

Every placement (e.g. each FFN output projection) is wrapped once in an :class:`AdapterStack` holding a
``ModuleDict`` of adapters by name. Which adapters run is set model-wide:

    add_adapter(model, "sentiment", BottleneckConfig(style="pfeiffer"))
    add_adapter(model, "nli", CompacterPlusPlusConfig())
    train_adapter(model, "sentiment")          # active, the only trainable tensors; the base is frozen
    set_active_adapters(model, ["lang", "nli"])    # a set runs in order: h -> nli(lang(h))
    save_adapter(model, "sentiment", "adapters/")  # adapters/sentiment/{adapter_config.json, .safetensors}
    load_adapter(other, "adapters/", "sentiment")

A stack keeps its active adapters in a plain list, so a forward walks no dictionary (one adapter: one
call). A model with one unnamed adapter (``inject(model, BottleneckConfig())``) does not use this module:
its :class:`~lightning_peft.tuners.bottleneck.AdapterAfter` path is unchanged.

:func:`read_adapter` also reads the adapter-only checkpoint of a Lightning run with the ``PEFT`` callback
(stage 1 of AdapterFusion), so its adapter can be loaded here by path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.api import freeze_base
from lightning_peft.checkpoint import read_checkpoint, split_metadata
from lightning_peft.config import TunerConfig, config_from_dict
from lightning_peft.layers import META_KEY, Adapter, BaseLayerWrapper, mark, replace_module, unmark

__all__ = [
    "AdapterStack",
    "active_adapters",
    "adapter_state_dict",
    "add_adapter",
    "build_adapters",
    "deactivate_adapters",
    "delete_adapter",
    "list_adapters",
    "load_adapter",
    "load_adapter_tensors",
    "read_adapter",
    "save_adapter",
    "set_active_adapters",
    "stacks",
    "train_adapter",
]

#: Attribute on the model root: ``{name: TunerConfig}`` of its named adapters, in the order added.
NAMED_ATTR = "_lp_named_adapters"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
#: Metadata key of the PEFT callback's adapter-only checkpoints (callbacks/adapter_checkpoint.py).
LIGHTNING_META_KEY = META_KEY
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class AdapterStack(BaseLayerWrapper):
    """Runs ``base_layer``, then the active adapters (in order) or a fusion of them, on its output."""

    #: Named adapters share one placement by design: targeting lets more of them in (not a collision).
    shares_placement = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fusion: nn.Module | None = None
        self.disabled = False
        self._active: list[nn.Module] = []  # plain list: no dictionary walk per forward
        self.active_names: tuple[str, ...] = ()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_names = tuple(n for n in names if n in self.adapters)
        self._active = [self.adapters[n] for n in self.active_names]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if self.disabled or not self._active:
            return out
        h = out[0] if isinstance(out, tuple) else out
        if self.fusion is not None:
            h = self.fusion(h, self._active)
        else:
            for adapter in self._active:
                h = adapter(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h


# -- building adapters from a config ----------------------------------------------------------------
def build_adapters(config: TunerConfig, model: nn.Module) -> dict[str, nn.Module]:
    """Fresh adapters for ``config`` on ``model``: ``{placement module name: adapter}``.

    Supported: any config with a ``build_adapters(model)`` method (Bottleneck, Compacter, Compacter++).
    """
    if getattr(config, "train_layer_norms", False):
        raise ValueError("named adapters cannot train the base LayerNorms (they are shared by every adapter)")
    build = getattr(config, "build_adapters", None)
    if not callable(build):
        raise TypeError(
            "named adapters are bottleneck-style (BottleneckConfig, CompacterConfig, "
            "CompacterPlusPlusConfig); "
            f"got {type(config).__name__}"
        )
    return build(model)


# -- registry on the model root ----------------------------------------------------------------------
def _registry(model: nn.Module) -> dict[str, TunerConfig]:
    reg = model.__dict__.get(NAMED_ATTR)
    if reg is None:
        reg = {}
        object.__setattr__(model, NAMED_ATTR, reg)
    return reg


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    return list(model.__dict__.get(NAMED_ATTR, {}))


def stacks(model: nn.Module) -> list[tuple[str, AdapterStack]]:
    """``(module name, AdapterStack)`` of every placement, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterStack)]


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"unknown adapter name(s) {', '.join(map(repr, unknown))}; this model has: "
            f"{', '.join(map(repr, known)) or 'no named adapters (add_adapter first)'}"
        )


def add_adapter(model: nn.Module, name: str, config: TunerConfig) -> list[str]:
    """Add adapter ``name`` built from ``config`` (not yet active). Returns its placement names."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r} must be an identifier (letters, digits, '_', '-'; no dots)")
    if name in list_adapters(model):
        raise ValueError(f"an adapter named {name!r} already exists; delete_adapter(model, {name!r}) first")
    adapters = build_adapters(config, model)
    for placement in adapters:
        module = model.get_submodule(placement)
        if isinstance(module, Adapter) and not isinstance(module, AdapterStack):
            raise ValueError(
                f"{placement!r} already holds a single-adapter tuner ({type(module).__name__}); named "
                "adapters need a model without inject()-ed adapters (lightning_peft.unload(model) first)"
            )
    for placement, adapter in adapters.items():
        module = model.get_submodule(placement)
        if not isinstance(module, AdapterStack):
            module = AdapterStack(module)
            replace_module(model, placement, module)
        module.adapters[name] = adapter
        module.set_active(module.active_names)
    _registry(model)[name] = config
    return list(adapters)


def set_active_adapters(model: nn.Module, names: str | Sequence[str] | None) -> None:
    """Activate one adapter, a sequence (run in that order at each placement), or none (``None``)."""
    wanted = [] if names is None else [names] if isinstance(names, str) else list(names)
    _check_known(model, wanted)
    for _, stack in stacks(model):
        stack.set_active(wanted)
    object.__setattr__(model, "_lp_active_adapters", tuple(wanted))


def deactivate_adapters(model: nn.Module) -> None:
    """No adapter runs: the model behaves as its base."""
    set_active_adapters(model, None)


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("_lp_active_adapters", ()))


def train_adapter(model: nn.Module, name: str) -> None:
    """Activate ``name`` alone and make its tensors the only trainable ones (every other adapter and the
    base frozen)."""
    _check_known(model, [name])
    set_active_adapters(model, name)
    for _, stack in stacks(model):
        for adapter_name, adapter in stack.adapters.items():
            if adapter_name == name:
                mark(adapter)
            else:
                unmark(adapter, state=False)
    freeze_base(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove ``name`` everywhere; placements left without adapters get their base layer back."""
    _check_known(model, [name])
    for placement, stack in stacks(model):
        if name in stack.adapters:
            del stack.adapters[name]
            stack.set_active(stack.active_names)
        if not len(stack.adapters):
            replace_module(model, placement, stack.base_layer)
    del _registry(model)[name]
    object.__setattr__(model, "_lp_active_adapters", tuple(n for n in active_adapters(model) if n != name))


# -- tensors, save and load --------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Tensors of adapter ``name`` keyed ``<placement>.adapter.<parameter>`` (the single-adapter layout)."""
    _check_known(model, [name])
    out: dict[str, Tensor] = {}
    for placement, stack in stacks(model):
        if name in stack.adapters:
            for local, p in stack.adapters[name].named_parameters(remove_duplicate=False):
                out[f"{placement}.adapter.{local}"] = p.detach()
    return out


def save_adapter(model: nn.Module, name: str, directory: str | Path) -> Path:
    """Write ``directory/name/adapter_config.json`` and ``adapter.safetensors``; returns that folder."""
    from safetensors.torch import save_file

    tensors = {k: v.clone().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    folder = Path(directory) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({"name": name, "config": _registry(model)[name].to_dict()}))
    save_file(tensors, str(folder / WEIGHTS_FILE))
    return folder


def _saved_names(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if (p / CONFIG_FILE).is_file())


def load_adapter(
    model: nn.Module, directory: str | Path, name: str, *, as_name: str | None = None
) -> list[str]:
    """Add adapter ``name`` saved by :func:`save_adapter` under ``directory`` (as ``as_name`` if given).

    Raises:
        ValueError: no adapter ``name`` there (the saved names are listed), or its tensors do not fit.
    """
    directory = Path(directory)
    if not (directory / name / CONFIG_FILE).is_file():
        known = _saved_names(directory)
        raise ValueError(
            f"no adapter named {name!r} in {str(directory)!r}; saved adapters there: "
            f"{', '.join(map(repr, known)) or 'none'}"
        )
    config, tensors = read_adapter(directory / name)
    new_name = as_name or name
    placements = add_adapter(model, new_name, config)
    try:
        load_adapter_tensors(model, new_name, tensors)
    except ValueError:
        delete_adapter(model, new_name)
        raise
    return placements


def read_adapter(path: str | Path) -> tuple[TunerConfig, dict[str, Tensor]]:
    """The config and tensors of a saved adapter: a :func:`save_adapter` folder, or an adapter-only
    checkpoint (``.ckpt``) written by a Lightning run with the ``PEFT`` callback."""
    path = Path(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{str(path)!r} holds no {CONFIG_FILE}; saved adapters: {_saved_names(path)}"
            )
        from safetensors.torch import load_file

        meta = json.loads((path / CONFIG_FILE).read_text())
        return config_from_dict(meta["config"]), load_file(str(path / WEIGHTS_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"no saved adapter at {str(path)!r} (a save_adapter folder or a .ckpt file)")
    ckpt = read_checkpoint(path)
    state, meta = split_metadata(ckpt)
    if not meta or not meta.get("config"):
        raise ValueError(
            f"{str(path)!r} is not an adapter-only checkpoint of the PEFT callback "
            f"(no {LIGHTNING_META_KEY!r} entry)"
        )
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor) and ".adapter." in k}
    return config_from_dict(meta["config"]), tensors


def load_adapter_tensors(model: nn.Module, name: str, tensors: Mapping[str, Tensor]) -> None:
    """Copy saved tensors (keys ``[<prefix>.]<placement>.adapter.<parameter>``) into adapter ``name``.

    Keys may carry a leading prefix (``backbone.`` when saved from a LightningModule). Strict: every
    tensor of the adapter must be found, with its shape.
    """
    targets: dict[str, Tensor] = {}
    for placement, stack in stacks(model):
        if name in stack.adapters:
            for local, p in stack.adapters[name].named_parameters(remove_duplicate=False):
                targets[f"{placement}.adapter.{local}"] = p
    found: dict[str, Tensor] = {}
    for key, value in tensors.items():
        head, sep, local = key.rpartition(".adapter.")
        if not sep:
            continue
        parts = head.split(".")
        for i in range(len(parts)):  # strip a leading prefix until a placement of this model matches
            candidate = ".".join(parts[i:]) + ".adapter." + local
            if candidate in targets:
                found[candidate] = value
                break
    missing = sorted(set(targets) - set(found))
    if missing:
        raise ValueError(
            f"the saved adapter lacks {len(missing)} tensor(s) adapter {name!r} has on this model, e.g. "
            f"{', '.join(missing[:4])} (saved for a different model or placement?)"
        )
    with torch.no_grad():
        for key, param in targets.items():
            value = found[key]
            if value.shape != param.shape:
                raise ValueError(
                    f"shape mismatch for adapter {name!r} at {key!r}: saved {tuple(value.shape)}, this model "
                    f"{tuple(param.shape)} (trained on a base of another width, or another bottleneck size?)"
                )
            param.copy_(value)
