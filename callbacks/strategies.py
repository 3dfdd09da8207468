"""What the PEFT callback changes in Lightning's FSDP and DeepSpeed strategies (see :mod:`.peft`).

* FSDP: every module a tuner marks fully trainable becomes its own FSDP unit (added to the user's
  ``auto_wrap_policy``), so no FlatParameter mixes frozen and trainable tensors; ``use_orig_params=True``
  is required.
* DeepSpeed: the engine saves trainable parameters only (``exclude_frozen_parameters=True``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lightning_peft.layers import TRAINABLE_ATTR

__all__ = ["DEEPSPEED_ADAPTER_KEY", "adapter_wrap_policy", "is_deepspeed", "prepare_strategy"]

#: Client-state key of DeepSpeed checkpoints holding the gathered adapter-only state dict.
DEEPSPEED_ADAPTER_KEY = "lightning_peft_adapter_state_dict"


def is_deepspeed(strategy: Any) -> bool:
    return type(strategy).__name__ == "DeepSpeedStrategy" or any(
        c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__
    )


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
