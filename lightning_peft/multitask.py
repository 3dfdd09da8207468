"""Multi-task inference with named adapters: one batch holding several tasks, one forward of the base.

AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers") measures
inference for several tasks at once: the samples of all tasks share one forward of the base model and at
every adapter placement each task's slice of the batch goes through its own adapter (AdapterHub calls
this ``Parallel`` composition). Compared with running the tasks one by one this saves the per-forward
overhead and uses larger matrix products. It composes with
:func:`lightning_peft.tuners.adapterdrop.drop_lowest` (adapters of the lowest ``n`` blocks off for every
task).

Example::

    add_adapter(model, "sst", BottleneckConfig(style="pfeiffer")); ...   # see lightning_peft.named
    with parallel_adapters(model, [("sst", 4), ("nli", 2), ("qa", 2)]):
        out = model(input_ids=ids)          # rows 0-3 use "sst", 4-5 "nli", 6-7 "qa"
    outs = run_parallel(model, {"sst": batch_a, "nli": batch_b})      # {task: output rows}
    outs = run_sequential(model, {"sst": batch_a, "nli": batch_b})    # the same, one forward per task
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.named import active_adapters, list_adapters, set_active_adapters, stacks

__all__ = ["parallel_adapters", "run_parallel", "run_sequential"]

Forward = Callable[[nn.Module, Mapping[str, Tensor]], Any]


class _BatchSplit:
    """Applies adapter ``i`` (or nothing, where task ``i`` has no adapter here) to row slice ``i``."""

    def __init__(self, adapters: list[nn.Module | None], sizes: list[int], where: str) -> None:
        self.adapters, self.sizes, self.where = adapters, sizes, where
        self.total = sum(sizes)

    def __call__(self, h: Tensor) -> Tensor:
        if h.shape[0] != self.total:
            raise ValueError(
                f"parallel_adapters: the batch at {self.where!r} has {h.shape[0]} rows but the task sizes "
                f"{self.sizes} add up to {self.total}"
            )
        chunks = h.split(self.sizes, dim=0)
        return torch.cat(
            [c if a is None else a(c) for a, c in zip(self.adapters, chunks, strict=True)], dim=0
        )


@contextlib.contextmanager
def parallel_adapters(model: nn.Module, tasks: Iterable[tuple[str, int]]) -> Iterator[None]:
    """Within the block, the first ``size_0`` rows of a batch go through adapter ``name_0`` at every
    placement, the next ``size_1`` through ``name_1``, and so on (one forward of the base for all).

    Raises:
        ValueError: unknown adapter names (the known ones are listed), a non-positive size, or a model
            with an AdapterFusion (its adapters are mixed, not split).
    """
    tasks = list(tasks)
    names = [n for n, _ in tasks]
    sizes = [int(s) for _, s in tasks]
    known = list_adapters(model)
    unknown = [n for n in names if n not in known]
    if unknown or not tasks:
        raise ValueError(
            f"parallel_adapters needs (adapter name, rows) pairs of known adapters; unknown: {unknown}; "
            f"this model has: {known}"
        )
    if any(s <= 0 for s in sizes):
        raise ValueError(f"parallel_adapters: every task needs at least one row, got sizes {sizes}")
    placements = stacks(model)
    if any(stack.fusion is not None for _, stack in placements):
        raise ValueError("parallel_adapters cannot split a model with AdapterFusion layers")
    saved = [(stack, stack.active_names) for _, stack in placements]
    try:
        for where, stack in placements:
            adapters = [stack.adapters[n] if n in stack.adapters else None for n in names]  # noqa: SIM401
            stack._active = [_BatchSplit(adapters, sizes, where)]
        yield
    finally:
        for stack, active in saved:
            stack.set_active(active)


def _tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot take the output tensor of {type(out).__name__}; pass forward=... returning one")


def _call(model: nn.Module, batch: Mapping[str, Tensor], forward: Forward | None) -> Tensor:
    return _tensor(forward(model, batch) if forward is not None else model(**batch))


def run_parallel(
    model: nn.Module, inputs: Mapping[str, Mapping[str, Tensor]], *, forward: Forward | None = None
) -> dict[str, Tensor]:
    """``{task: output}`` for ``{task: model kwargs}`` (task = adapter name), all tasks in one forward.

    The tasks' inputs are concatenated along the batch dimension (same keys and the same non-batch
    shapes, e.g. padded to one length); ``forward(model, batch)`` defaults to ``model(**batch)`` and the
    output tensor is ``logits``, ``last_hidden_state`` or the first element.
    """
    names = list(inputs)
    keys = list(inputs[names[0]])
    sizes = [int(next(iter(inputs[n].values())).shape[0]) for n in names]
    batch = {k: torch.cat([inputs[n][k] for n in names], dim=0) for k in keys}
    with parallel_adapters(model, zip(names, sizes, strict=True)):
        out = _call(model, batch, forward)
    return dict(zip(names, out.split(sizes, dim=0), strict=True))


def run_sequential(
    model: nn.Module, inputs: Mapping[str, Mapping[str, Tensor]], *, forward: Forward | None = None
) -> dict[str, Tensor]:
    """The reference for :func:`run_parallel`: one forward per task with only its adapter active."""
    before = active_adapters(model)
    try:
        out = {}
        for name, batch in inputs.items():
            set_active_adapters(model, name)
            out[name] = _call(model, batch, forward)
        return out
    finally:
        set_active_adapters(model, before or None)
