"""Gradient checkpointing with a frozen embedding trains the adapters, whatever the order of set-up.

Reentrant ``torch.utils.checkpoint`` drops the gradient of a checkpointed block whose inputs do not require
grad, so with a frozen embedding no adapter inside a checkpointed layer trains (transformers #23170). A
forward hook on the input embeddings of every Hugging Face model marks the embedding output as requiring
grad at forward time, only while that model trains with checkpointing on (details in :mod:`.peft`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["guard_gradient_checkpointing"]

_GC_GUARD_ATTR = "_lp_gc_guard"


def guard_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Hook the input embeddings of every Hugging Face model in ``model`` so checkpointed layers see an
    input that requires grad while that model trains with checkpointing on (idempotent)."""
    for hf_model in model.modules():
        if not (
            hasattr(hf_model, "get_input_embeddings") and hasattr(hf_model, "supports_gradient_checkpointing")
        ):
            continue
        try:
            embeddings = hf_model.get_input_embeddings()
        except NotImplementedError:
            continue
        if isinstance(embeddings, torch.nn.Module) and not getattr(embeddings, _GC_GUARD_ATTR, False):
            embeddings.register_forward_hook(functools.partial(_input_requires_grad, hf_model))
            setattr(embeddings, _GC_GUARD_ATTR, True)


def _checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _input_requires_grad(hf_model: torch.nn.Module, module: Any, args: Any, output: Any) -> None:
    if (
        isinstance(output, torch.Tensor)
        and not output.requires_grad
        and torch.is_grad_enabled()
        and hf_model.training
        and output.is_floating_point()
        and _checkpointing(hf_model)
    ):
        output.requires_grad_(True)
