"""Markers and small protocols of lightning_peft.layers."""

from __future__ import annotations

import torch
from torch import nn

from lightning_peft.layers import (
    STATE_ATTR,
    TRAINABLE_ATTR,
    OwnsHooks,
    iter_trainable_parameters,
    like,
    mark,
    mark_state,
    tuner_state_names,
    unmark,
)


def test_mark_whole_modules_or_named_parameters_and_unmark() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    mark(model[0])
    mark(model[1], ["bias"])
    assert [n for n, _ in iter_trainable_parameters(model)] == ["0.weight", "0.bias", "1.bias"]
    mark_state(model[1])
    assert tuner_state_names(model) == {"1.weight", "1.bias"}
    unmark(model[0])
    unmark(model[1])
    assert TRAINABLE_ATTR not in vars(model[0]) and STATE_ATTR not in vars(model[1])
    assert list(iter_trainable_parameters(model)) == []


def test_shared_parameters_are_yielded_once() -> None:
    shared = nn.Linear(2, 2)
    model = nn.ModuleDict({"a": shared, "b": shared})
    mark(shared)
    assert len(list(iter_trainable_parameters(model))) == 2  # weight and bias, once each


class _Counter(OwnsHooks, nn.Module):
    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.calls = 0
        self.keep(target.register_forward_hook(self.count))

    def count(self, *_: object) -> None:
        self.calls += 1


def test_owns_hooks_removes_every_handle_and_is_safe_twice() -> None:
    target = nn.Linear(2, 2)
    counter = _Counter(target)
    target(torch.zeros(1, 2))
    counter.remove_hooks()
    counter.remove_hooks()
    target(torch.zeros(1, 2))
    assert counter.calls == 1 and not counter.disabled


def test_like_moves_to_the_reference_dtype_and_leaves_parameterless_references_alone() -> None:
    reference = nn.Linear(2, 2).to(torch.float64)
    assert like(nn.Linear(2, 2), reference).weight.dtype == torch.float64
    assert like(nn.Linear(2, 2), torch.zeros(1, dtype=torch.bfloat16)).weight.dtype == torch.bfloat16
    assert like(nn.Linear(2, 2), nn.ReLU()).weight.dtype == torch.float32
