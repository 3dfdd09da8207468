"""A compact fingerprint of a model's frozen base, to refuse adapters trained on a different base.

An adapter checkpoint holds only adapter weights; loading it onto another base model (another
checkpoint of the same architecture, a different model size) would "work" and silently produce
garbage. The fingerprint records, per frozen tensor, its shape, dtype and a checksum of a fixed strided
sample of its values (<= 256 elements, so it costs microseconds even for billion-parameter models).
Names are canonical (``.base_layer`` removed), so the fingerprint does not depend on the tuner.
A ``DTensor`` (an FSDP2 shard) is fingerprinted as the full tensor, so a sharded model and the same model
in one process agree; gathering it is a collective, which every rank reaches in the same order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_peft.layers import iter_trainable_parameters, tuner_state_names

__all__ = ["base_fingerprint", "check_base", "compare_fingerprints"]

_SAMPLE = 256


def _canonical(name: str) -> str:
    return name.replace(".base_layer.", ".").replace("base_layer.", "")


@torch.no_grad()
def _checksum(t: torch.Tensor) -> float | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    if _is_dtensor(t):
        t = t.full_tensor()  # type: ignore[attr-defined]
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step][:_SAMPLE].to(device="cpu", dtype=torch.float64)
    weights = torch.arange(1, sample.numel() + 1, dtype=torch.float64)
    return float((sample * weights).sum())


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def base_fingerprint(model: nn.Module) -> dict[str, list[Any]]:
    """``{canonical_name: [shape, dtype, checksum]}`` for every frozen (non-tuner) parameter."""
    trainable = {id(p) for _, p in iter_trainable_parameters(model)}
    state = tuner_state_names(model)  # frozen tuner state (K-Adapters added later) is no part of the base
    out: dict[str, list[Any]] = {}
    for name, p in model.named_parameters():
        if id(p) not in trainable and name not in state:
            out[_canonical(name)] = [list(p.shape), str(p.dtype).removeprefix("torch."), _checksum(p)]
    return out


def compare_fingerprints(
    saved: dict[str, list[Any]], current: dict[str, list[Any]], limit: int = 5
) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree).

    Checksums compare with a relative tolerance of 1e-6 (summation order differs across devices); a
    checksum of None (meta tensors) is not compared.
    """
    problems: list[str] = []

    def listing(title: str, names: list[str]) -> None:
        if names:
            more = f" ... ({len(names) - limit} more)" if len(names) > limit else ""
            problems.append(f"{title} ({len(names)}): {', '.join(names[:limit])}{more}")

    listing("base tensors in the checkpoint but not in this model", sorted(set(saved) - set(current)))
    listing("base tensors in this model but not in the checkpoint", sorted(set(current) - set(saved)))
    shape, value = [], []
    for name in sorted(set(saved) & set(current)):
        (s_shape, _, s_sum), (c_shape, _, c_sum) = saved[name], current[name]
        if list(s_shape) != list(c_shape):
            shape.append(f"{name} {tuple(s_shape)} vs {tuple(c_shape)}")
        elif (
            s_sum is not None
            and c_sum is not None
            and not math.isclose(s_sum, c_sum, rel_tol=1e-6, abs_tol=1e-9)
        ):
            value.append(name)
    listing("base tensors with a different shape (checkpoint vs this model)", shape)
    listing("base tensors with different values (another pretrained checkpoint?)", value)
    return problems


def check_base(model: nn.Module, meta: dict[str, Any] | None, *, where: str) -> None:
    """Refuse adapters trained on another base model (by the fingerprint in ``meta``)."""
    saved = (meta or {}).get("fingerprint")
    if not saved:
        return
    problems = compare_fingerprints(saved, base_fingerprint(model))
    if problems:
        raise ValueError(
            f"{where} was trained on a different base model:\n  " + "\n  ".join(problems) + "\nLoad the "
            "base model the adapters were trained on (and call this on the same module the PEFT callback "
            "was attached to)."
        )
