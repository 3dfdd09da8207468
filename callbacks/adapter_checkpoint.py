"""Adapter-only checkpoints at the state-dict level.

Lightning builds every checkpoint's ``"state_dict"`` through
``trainer.strategy.lightning_module_state_dict()``
(all ``ModelCheckpoint`` modes, ``save_weights_only=True`` included, and ``trainer.save_checkpoint``), so
trimming there covers them all, while ``pl_module.state_dict()`` itself stays complete for the user.

A trimmed state dict holds the tuner's tensors plus one entry :data:`META_KEY` with the tuner config and
the base-model fingerprint. Loading goes through two hooks on the LightningModule:

* a pre-hook pops the metadata, refuses a different tuner config or base model (naming what differs),
  and refuses a checkpoint that lacks adapter weights the model has (strict for adapter keys);
* before that check, knowledge adapters recorded in the metadata but missing from the model (K-Adapters
  added with ``add_kadapter`` after ``inject``, which the tuner config does not describe) are added, so the
  callback alone restores every one of them;
* a post-hook forgives missing *frozen base* keys only (they come from the pretrained model), so
  Lightning's ``strict_loading`` still catches everything else.

Sharded strategies: FSDP inserts ``_fsdp_wrapped_module.`` (and activation checkpointing
``_checkpoint_wrapped_module.``) into module paths while its state dicts use clean names, so keys are
compared without those fragments, and FSDP's load calls the hooks with a non-empty prefix. DeepSpeed ZeRO-3
keeps only a shard of every parameter on each rank: :func:`gathered_trainable_state_dict` gathers the
trainable parameters alone (never the frozen base) so the saved adapter tensors are complete. FSDP2
(``fully_shard``) parameters are ``DTensor`` shards: :func:`full_trainable_state_dict` gathers the tuner's
tensors alone the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_peft.api import get_config
from lightning_peft.config import config_from_dict
from lightning_peft.fingerprint import compare_fingerprints
from lightning_peft.layers import META_KEY, TRAINABLE_ATTR, iter_trainable_parameters, tuner_state_names

__all__ = [
    "META_KEY",
    "AdapterCheckpointError",
    "clean_key",
    "full_trainable_state_dict",
    "gathered_trainable_state_dict",
    "install_load_hooks",
    "trainable_keys",
    "trim_state_dict",
    "validate_adapter_checkpoint",
]

_HOOKS_ATTR = "_lp_load_hooks"
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class AdapterCheckpointError(RuntimeError):
    """A checkpoint does not fit the model it is loaded into (config, base model or adapter keys)."""


def clean_key(name: str) -> str:
    """``name`` without the path fragments FSDP, activation checkpointing and torch.compile insert."""
    for fragment in _WRAPPER_FRAGMENTS:
        name = name.replace(fragment, "")
    return name


def trainable_keys(module: nn.Module) -> set[str]:
    """State-dict keys of the tuner: marked parameters under every name, buffers of marked modules, and
    everything under modules marked as tuner state (frozen knowledge adapters: trained, not base)."""
    ids = {id(p) for _, p in iter_trainable_parameters(module)}
    keys = {n for n, p in module.named_parameters(remove_duplicate=False) if id(p) in ids}
    for name, sub in module.named_modules():
        if getattr(sub, TRAINABLE_ATTR, None) is True:
            prefix = f"{name}." if name else ""
            keys |= {prefix + b for b, _ in sub.named_buffers() if not b.startswith("_lp_")}
    keys |= {k for k in tuner_state_names(module) if not k.rpartition(".")[2].startswith("_lp_")}
    return {clean_key(k) for k in keys}


def gathered_trainable_state_dict(module: nn.Module) -> dict[str, Any]:
    """The tuner's tensors with DeepSpeed ZeRO-3 shards gathered (a collective: call it on every rank).

    Only trainable parameters are gathered, so the cost is the adapters' size, never the base model's.
    """
    import deepspeed  # only reached under DeepSpeedStrategy

    named = list(iter_trainable_parameters(module))
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {clean_key(n): p.detach().to("cpu", copy=True) for n, p in named}


def full_trainable_state_dict(module: nn.Module) -> dict[str, Any]:
    """The tuner's tensors as full CPU tensors, FSDP2 ``DTensor`` shards gathered (a collective: call it on
    every rank; ranks walk the same module tree in the same order).

    Only the tuner's parameters and buffers are gathered, never the frozen base, so saving an adapter-only
    checkpoint costs the adapters' size rather than a gather of the whole model.
    """
    from torch.distributed.tensor import DTensor

    keep = trainable_keys(module)
    gathered: dict[int, Any] = {}  # tied tensors are gathered once and stored under every name
    out: dict[str, Any] = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        key = clean_key(name)
        if key not in keep:
            continue
        if id(tensor) not in gathered:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            gathered[id(tensor)] = full.detach().to("cpu", copy=True)
        out[key] = gathered[id(tensor)]
    return out


def make_meta(module: nn.Module, fingerprint: dict[str, Any]) -> dict[str, Any]:
    config = get_config(module)
    meta = {"version": 1, "config": config.to_dict() if config else None, "fingerprint": fingerprint}
    # What the config alone does not describe (K-Adapters added after inject()): one record per member
    # that has one, so a fresh model can be given the same modules before the weights load.
    if config is not None:
        records = [member.checkpoint_record(module) for member in config.members()]
        if any(r is not None for r in records):
            meta["records"] = records
    return meta


def restore_records(module: nn.Module, meta: dict[str, Any]) -> None:
    """Rebuild what :func:`make_meta` recorded (before the checkpoint's tensors load)."""
    config = get_config(module)
    records = meta.get("records")
    if records is None and meta.get("kadapters"):  # written before records were per member
        records = (
            [meta["kadapters"] if m.method == "kadapter" else None for m in config.members()]
            if config
            else None
        )
    if not records or config is None:
        return
    for member, record in zip(config.members(), records, strict=False):
        if record is not None:
            try:
                member.restore_record(module, record)
            except ValueError as err:
                raise AdapterCheckpointError(
                    f"cannot restore the checkpoint's {member.method} modules: {err}"
                ) from None


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
        # prefix is "" when the module itself loads, "_fsdp_wrapped_module." under an FSDP root.
        if prefix + META_KEY not in state_dict:
            return
        meta = state_dict.pop(prefix + META_KEY)
        # The modules must exist before their weights load: this hook runs on the root before
        # load_state_dict recurses into the children, so modules added here are filled too.
        restore_records(module, meta)
        keys = {clean_key(k[len(prefix) :]) for k in state_dict if k.startswith(prefix)}
        validate_adapter_checkpoint(module, keys, meta, fingerprint())

    def post_hook(mod: nn.Module, incompatible: Any) -> None:
        # Names from the module tree (no state_dict() call: under FSDP that would be a collective).
        names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
        frozen = {clean_key(n) for n in names} - trainable_keys(module)
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if not _endswith_any(clean_key(k), frozen)
        ]

    handles = (
        module.register_load_state_dict_pre_hook(pre_hook),
        module.register_load_state_dict_post_hook(post_hook),
    )
    object.__setattr__(module, _HOOKS_ATTR, handles)


def _endswith_any(key: str, names: set[str]) -> bool:
    # Missing keys are relative to the module load_state_dict was called on (the FSDP root or the
    # LightningModule): strip leading path components until one is a known name.
    parts = key.split(".")
    return any(".".join(parts[i:]) in names for i in range(len(parts)))


def validate_adapter_checkpoint(
    module: nn.Module, keys: set[str], meta: dict[str, Any], current_fp: dict
) -> None:
    """Refuse a checkpoint (its tensor ``keys`` and metadata) made with another tuner config or base model,
    or lacking adapter tensors ``module`` has."""
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
    missing = sorted(trainable_keys(module) - keys)
    if missing:
        more = f" ... ({len(missing) - 8} more)" if len(missing) > 8 else ""
        raise AdapterCheckpointError(
            f"the checkpoint lacks {len(missing)} adapter tensor(s) this model has: "
            f"{', '.join(missing[:8])}{more}"
        )
