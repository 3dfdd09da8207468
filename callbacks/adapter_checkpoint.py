"""Adapter-only checkpoints at the state-dict level.

Lightning builds every checkpoint's ``"state_dict"`` through
``trainer.strategy.lightning_module_state_dict()``
(all ``ModelCheckpoint`` modes, ``save_weights_only=True`` included, and ``trainer.save_checkpoint``), so
trimming there covers them all, while ``pl_module.state_dict()`` itself stays complete for the user.

A trimmed state dict holds the tuner's tensors plus one entry :data:`META_KEY` with the tuner config and
the base-model fingerprint. Loading goes through two hooks on the LightningModule:

* a pre-hook pops the metadata, refuses a different tuner config or base model (naming what differs),
  and refuses a checkpoint that lacks adapter weights the model has (strict for adapter keys);
* a post-hook forgives missing *frozen base* keys only (they come from the pretrained model), so
  Lightning's ``strict_loading`` still catches everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_peft.api import get_config
from lightning_peft.config import config_from_dict
from lightning_peft.fingerprint import compare_fingerprints
from lightning_peft.layers import TRAINABLE_ATTR, iter_trainable_parameters

__all__ = ["META_KEY", "AdapterCheckpointError", "install_load_hooks", "trainable_keys", "trim_state_dict"]

META_KEY = "__lightning_peft__"
_HOOKS_ATTR = "_lp_load_hooks"


class AdapterCheckpointError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into (config, base model or adapter keys)."""


def trainable_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the tuner: marked parameters under every name, and buffers of marked modules."""
    ids = {id(p) for _, p in iter_trainable_parameters(module)}
    keys = {n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids}
    for name, sub in module.named_modules():
        if getattr(sub, TRAINABLE_ATTR, None) is True:
            prefix = f"{name}." if name else ""
            keys |= {prefix + b for b, _ in sub.named_buffers() if not b.startswith("_lp_")}
    return keys


def make_meta(module: nn.Module, fingerprint: dict[str, Any]) -> dict[str, Any]:
    config = get_config(module)
    return {"version": 1, "config": config.to_dict() if config else None, "fingerprint": fingerprint}


def trim_state_dict(state_dict: dict[str, Any], module: nn.Module, meta: dict[str, Any]) -> dict[str, Any]:
    """Keep only the tuner's entries of ``state_dict`` and add the metadata entry."""
    keep = trainable_keys(module)
    out = {k: v for k, v in state_dict.items() if k in keep}
    out[META_KEY] = meta
    return out


def install_load_hooks(module: nn.Module, fingerprint: Callable[[], dict[str, Any]]) -> None:
    """Make ``module.load_state_dict`` accept adapter-only checkpoints safely (idempotent).

    ``fingerprint`` returns the base fingerprint of ``module`` computed before any weights were restored.
    """
    if getattr(module, _HOOKS_ATTR, None):
        return

    def pre_hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if prefix or META_KEY not in state_dict:
            return
        meta = state_dict.pop(META_KEY)
        _validate(module, state_dict, meta, fingerprint())

    def post_hook(mod: nn.Module, incompatible: Any) -> None:
        frozen = set(dict(module.state_dict(keep_vars=True))) - trainable_keys(module)
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in frozen]

    handles = (
        module.register_load_state_dict_pre_hook(pre_hook),
        module.register_load_state_dict_post_hook(post_hook),
    )
    object.__setattr__(module, _HOOKS_ATTR, handles)


def _validate(module: nn.Module, state_dict: dict[str, Any], meta: dict[str, Any], current_fp: dict) -> None:
    saved_cfg = meta.get("config")
    config = get_config(module)
    if saved_cfg is not None:
        if config is None:
            raise AdapterCheckpointError(
                f"this checkpoint holds {saved_cfg['method']!r} adapter weights but the model has no tuner; "
                "add lightning_peft.callbacks.PEFT with the same config (or call inject()) before loading"
            )
        diff = config_from_dict(saved_cfg).diff(config)
        if diff:
            raise AdapterCheckpointError(
                "the checkpoint was trained with a different tuner config (checkpoint vs this run):\n  "
                + "\n  ".join(diff)
            )
    problems = compare_fingerprints(meta.get("fingerprint") or {}, current_fp)
    if problems:
        raise AdapterCheckpointError(
            "the checkpoint's adapters were trained on a different base model:\n  "
            + "\n  ".join(problems)
            + "\nLoad the base model the adapters were trained on."
        )
    missing = sorted(trainable_keys(module) - set(state_dict))
    if missing:
        more = f" ... ({len(missing) - 8} more)" if len(missing) > 8 else ""
        raise AdapterCheckpointError(
            f"the checkpoint lacks {len(missing)} adapter tensor(s) this model has: "
            f"{', '.join(missing[:8])}{more}"
        )
