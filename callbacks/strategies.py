"""What the PEFT callback changes in Lightning's FSDP, FSDP2 and DeepSpeed strategies (see :mod:`.peft`).

* FSDP (``FSDPStrategy``): every module a tuner marks fully trainable becomes its own FSDP unit (added to
  the user's ``auto_wrap_policy``), so no FlatParameter mixes frozen and trainable tensors;
  ``use_orig_params=True`` is required, and adapter-only checkpoints need ``state_dict_type="full"``.
* FSDP2 (``ModelParallelStrategy``, the user's ``configure_model`` applies ``fully_shard``): FSDP2 shards
  every parameter on its own, so frozen and trainable tensors may share a unit. Adapters injected before
  ``configure_model`` are sharded with their blocks by the user's calls; adapters injected into a model that
  ``configure_model`` already sharded become units of their own (:func:`shard_new_adapters`). Checkpoints
  gather the adapters only (never the frozen base), and both checkpoint layouts of the strategy (one file,
  or a distributed-checkpoint folder) save and resume adapter-only (:func:`load_model_parallel_checkpoint`).
* DeepSpeed: the engine saves trainable parameters only (``exclude_frozen_parameters=True``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.callbacks.adapter_checkpoint import META_KEY, trainable_keys, validate_adapter_checkpoint
from lightning_peft.layers import TRAINABLE_ATTR

__all__ = [
    "DEEPSPEED_ADAPTER_KEY",
    "adapter_wrap_policy",
    "check_no_tensor_parallel",
    "is_deepspeed",
    "is_fully_sharded",
    "is_model_parallel",
    "load_model_parallel_checkpoint",
    "metadata_into_state_dict",
    "prepare_checkpoint_for_save",
    "prepare_strategy",
    "shard_new_adapters",
]

#: Client-state key of DeepSpeed checkpoints holding the gathered adapter-only state dict.
DEEPSPEED_ADAPTER_KEY = "lightning_peft_adapter_state_dict"


def is_deepspeed(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" or any(
        c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__
    )


def is_model_parallel(strategy: Any) -> bool:
    """``ModelParallelStrategy``: the user's ``configure_model`` applies FSDP2 (``fully_shard``)."""
    try:
        from lightning.pytorch.strategies import ModelParallelStrategy
    except ImportError:  # pragma: no cover - ships with every supported Lightning
        return False
    return isinstance(strategy, ModelParallelStrategy)


def saves_distributed_checkpoints(strategy: Any) -> bool:
    """``ModelParallelStrategy(save_distributed_checkpoint=True)`` (its default): a folder of shards."""
    return is_model_parallel(strategy) and bool(strategy._save_distributed_checkpoint)


def prepare_strategy(strategy: Any, adapter_only: bool) -> None:
    """Strategy settings PEFT needs, applied in ``setup`` (before the strategy wraps the model)."""
    if is_deepspeed(strategy):
        if adapter_only:
            strategy.exclude_frozen_parameters = True
        return
    try:
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:  # pragma: no cover - FSDP ships with every supported Lightning
        return
    if not isinstance(strategy, FSDPStrategy):
        return
    if strategy.kwargs.get("use_orig_params") is False:
        raise ValueError(
            "PEFT under FSDP needs FSDPStrategy(use_orig_params=True) (Lightning's default): with flat "
            "parameters the adapters cannot be found, trained or saved apart from the frozen base"
        )
    if adapter_only and getattr(strategy, "_state_dict_type", "full") == "sharded":
        # Lightning loads FSDP sharded checkpoints into a template of the whole model's keys, so a folder
        # holding adapters only cannot be resumed; a full state dict gathers the adapters into one file.
        raise ValueError(
            'PEFT adapter-only checkpoints under FSDPStrategy need state_dict_type="full" (sharded '
            "checkpoints are restored against every key of the model, which an adapter-only checkpoint "
            'lacks): use FSDPStrategy(state_dict_type="full"), or PEFT(adapter_only_checkpoints=False)'
        )
    if not getattr(strategy.kwargs.get("auto_wrap_policy"), "_lp_adapter_units", False):
        strategy.kwargs["auto_wrap_policy"] = adapter_wrap_policy(strategy.kwargs.get("auto_wrap_policy"))


def _is_adapter_unit(module: torch.nn.Module) -> bool:
    return getattr(module, TRAINABLE_ATTR, None) is True


def adapter_wrap_policy(user_policy: Any = None) -> Any:
    """An FSDP ``auto_wrap_policy``: the user's units plus every fully trainable tuner module."""
    from torch.distributed.fsdp.wrap import (
        CustomPolicy,
        ModuleWrapPolicy,
        _or_policy,
        lambda_auto_wrap_policy,
    )

    if user_policy is None:
        policy: Any = CustomPolicy(_is_adapter_unit)
    elif isinstance(user_policy, ModuleWrapPolicy):
        classes = tuple(user_policy._module_classes)
        policy = CustomPolicy(lambda m: _is_adapter_unit(m) or isinstance(m, classes))
    elif isinstance(user_policy, CustomPolicy):
        user_fn = user_policy._lambda_fn
        policy = CustomPolicy(lambda m: user_fn(m) or _is_adapter_unit(m))
    else:  # a legacy callable policy(module, recurse, nonwrapped_numel)
        ours = functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_adapter_unit)
        policy = functools.partial(_or_policy, policies=[user_policy, ours])
    policy._lp_adapter_units = True
    return policy


# -- FSDP2 (fully_shard) under ModelParallelStrategy ------------------------------------------------------
def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` or one of its submodules."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def check_no_tensor_parallel(module: nn.Module) -> None:
    """Refuse tensor-parallel parameters: adapters would be replicated next to column / row shards."""
    from torch.distributed.tensor import DTensor

    for name, p in module.named_parameters():
        names = (p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()
        if "tensor_parallel" in names and not p.placements[names.index("tensor_parallel")].is_replicate():
            raise NotImplementedError(
                f"PEFT does not support tensor parallelism ({name} is sharded over the 'tensor_parallel' "
                "mesh dimension): adapters would not match the sharded layers. Apply only fully_shard in "
                "configure_model, with ModelParallelStrategy(data_parallel_size=<devices>, "
                "tensor_parallel_size=1)"
            )


def shard_new_adapters(module: nn.Module) -> int:
    """Make every tuner module that holds unsharded parameters an FSDP2 unit; returns how many units.

    Needed when the tuner was injected into a model ``configure_model`` had already sharded: the new
    adapters belong to no FSDP unit, so each rank would keep and train its own replica (gradients never
    reduced, ranks diverging). The adapters below one FSDP module form one unit (one all-gather per block)
    with that module's mesh, mixed precision and offload policies.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    groups: dict[int, tuple[FSDPModule | None, list[nn.Module]]] = {}

    def walk(sub: nn.Module, owner: FSDPModule | None) -> None:
        owner = sub if isinstance(sub, FSDPModule) else owner
        if _is_adapter_unit(sub) and any(not isinstance(p, DTensor) for p in sub.parameters()):
            groups.setdefault(id(owner), (owner, []))[1].append(sub)
            return
        for child in sub.children():
            walk(child, owner)

    walk(module, None)
    fallback = _param_group(module)
    for owner, adapters in groups.values():
        group = _param_group(owner) if owner is not None else None
        group = group or fallback
        if group is None:
            raise RuntimeError("found no fully_shard-ed parameters to take the FSDP2 mesh from")
        fully_shard(
            adapters,
            mesh=group.mesh_info.mesh,
            mp_policy=group.mp_policy,
            offload_policy=group.offload_policy,
        )
    return len(groups)


def _param_group(module: nn.Module) -> Any:
    """The FSDP2 parameter group of ``module`` or, failing that, of the first sharded submodule.

    Private torch API (``FSDPModule._get_fsdp_state()``): public FSDP2 exposes no mesh or policy getters.
    """
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            group = sub._get_fsdp_state()._fsdp_param_group
            if group is not None:
                return group
    return None


def prepare_checkpoint_for_save(strategy: Any, checkpoint: dict[str, Any]) -> None:
    """Adjust a trimmed checkpoint to what ``strategy.save_checkpoint`` writes, in place."""
    if is_deepspeed(strategy) and "state_dict" in checkpoint:
        # DeepSpeed drops "state_dict" from what it writes; keep the adapter-only one.
        checkpoint[DEEPSPEED_ADAPTER_KEY] = checkpoint["state_dict"]
    elif META_KEY in checkpoint.get("state_dict", {}):
        # state_dict stays name -> tensor (safetensors, numel(), Lightning's own loading); our metadata sits
        # at the top level (for distributed checkpoints: the folder's meta.pt, with the loop states).
        checkpoint[META_KEY] = checkpoint["state_dict"].pop(META_KEY)


def metadata_into_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Hand a loaded checkpoint's top-level metadata to the load hooks, which read it from the
    ``state_dict`` they are given (in place; checkpoints written before the move have it there already)."""
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and META_KEY in checkpoint and META_KEY not in state:
        state[META_KEY] = checkpoint[META_KEY]
    return checkpoint


def load_model_parallel_checkpoint(
    strategy: Any,
    load: Callable[..., dict[str, Any]],
    path: Any,
    fingerprint: Callable[[], dict[str, Any]],
    weights_only: bool | None = None,
) -> dict[str, Any]:
    """``ModelParallelStrategy.load_checkpoint`` for adapter-only checkpoints (``load`` is the original).

    Lightning restores into a template of every key of the model (a distributed checkpoint) or with its
    ``strict_loading`` over every parameter (a single file), which an adapter-only checkpoint fails. Here the
    tuner config, base model and adapter keys are checked like the load hooks do, then only the adapters
    (and the optimizer states, which only hold adapters) are restored. Other checkpoints go to ``load``.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    path = Path(strategy.broadcast(path))
    module = strategy.lightning_module
    if path.is_dir():
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        if META_KEY not in metadata:
            return load(path, weights_only=weights_only)
        _load_distributed_adapters(strategy, path, metadata[META_KEY], fingerprint)
        return metadata
    checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
    state = checkpoint.get("state_dict", {})
    meta = checkpoint.get(META_KEY, state.get(META_KEY))
    if meta is None:
        return load(path, weights_only=weights_only)
    validate_adapter_checkpoint(module, set(state) - {META_KEY}, meta, fingerprint())
    del checkpoint, state
    # The checks above are strict for adapters; frozen base keys are legitimately absent.
    strict = module.strict_loading
    module.strict_loading = False
    try:
        return metadata_into_state_dict(load(path, weights_only=weights_only))
    finally:
        module.strict_loading = strict


def _load_distributed_adapters(
    strategy: Any, path: Path, meta: dict[str, Any], fingerprint: Callable[[], dict[str, Any]]
) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    module = strategy.lightning_module
    prefix = "state_dict."
    stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = {k[len(prefix) :] for k in stored if k.startswith(prefix)}
    validate_adapter_checkpoint(module, saved, meta, fingerprint())
    keep = trainable_keys(module)
    # Sharded (local) state dicts are views of this rank's shards: no communication, no frozen-base copy.
    adapters = {k: v for k, v in get_model_state_dict(module).items() if k in keep}
    dcp.load({"state_dict": adapters}, checkpoint_id=path)
    set_model_state_dict(module, adapters, options=_options(strict=False))
    for idx, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{idx}"
        state = {key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(state, checkpoint_id=path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key])


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)
