"""AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers").

Bottleneck adapters (Houlsby by default) without adapters in the lowest ``n`` transformer blocks:

* specialized (``robust=False``): the lowest ``drop_layers`` blocks get no adapter at all, for training
  and inference;
* robust (``robust=True``): every block gets an adapter; each training forward draws
  ``n ~ U{0..max_drop}`` from a generator seeded by ``(seed, step)`` (the step counter is a buffer saved
  in adapter-only checkpoints, so a resumed run draws the same ``n`` as an uninterrupted one). At
  inference any ``n`` applies: :func:`set_adapter_drop` (or the :func:`drop_lowest` context manager,
  which works on any model with adapters, named ones included).

Real speed: nothing below the lowest block with an active adapter needs gradients, so the hidden state
entering that block is detached (a forward pre-hook); the backward pass stops there instead of running
through the whole encoder. Dropped adapters have no effect and get no gradient.

The controller keeps the handles of its block hooks (:class:`~lightning_peft.layers.HookOwner`), so
:func:`lightning_peft.unload` (``merge_weights=False``) removes them with the adapters.

With ``robust=True`` some trainable adapters are unused in a batch: under DDP set
``find_unused_parameters=True``, and do not use the ``PEFT`` callback's ``check_gradients``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.config import register_tuner
from lightning_peft.layers import Adapter, OwnsHooks, mark
from lightning_peft.layouts import find_stacks, layout_of
from lightning_peft.targeting import block_index, find_modules
from lightning_peft.tuners.bottleneck import BottleneckConfig, style_placements

__all__ = ["AdapterDropConfig", "AdapterDropController", "adapted_blocks", "drop_lowest", "set_adapter_drop"]

CONTROLLER_NAME = "adapter_drop"


def _block_names(model: nn.Module) -> list[str]:
    """Every block of every stack, from the model's layout; for a model without one, the path prefixes up to
    the first index of the injected wrappers' names (``encoder.layer.3``)."""
    if layout_of(model) is not None:
        return [name for stack in find_stacks(model) for name in stack.block_names()]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Adapter) and hasattr(module, "base_layer") and block_index(name) is not None:
            parts = name.split(".")
            names.append(".".join(parts[: next(i for i, p in enumerate(parts) if p.isdigit()) + 1]))
    return list(dict.fromkeys(names))


def adapted_blocks(model: nn.Module) -> list[tuple[int, str, list[nn.Module]]]:
    """``(depth, block module name, adapter wrappers in it)`` for every block holding an adapter, lowest
    depth first. An encoder-decoder has a block of each depth in each stack (``encoder.block.0`` and
    ``decoder.block.0``, both depth 0): dropping the lowest ``n`` drops them in every stack."""
    entries = []
    for order, block in enumerate(_block_names(model)):
        wrappers = [
            m
            for n, m in model.named_modules()
            if n.startswith(block + ".") and isinstance(m, Adapter) and hasattr(m, "base_layer")
        ]
        if wrappers:
            entries.append((int(block.rpartition(".")[2]), order, block, wrappers))
    return [(depth, block, wrappers) for depth, _, block, wrappers in sorted(entries, key=lambda e: e[:2])]


def adapted_depths(blocks: list[tuple[int, str, list[nn.Module]]]) -> list[int]:
    """The distinct depths of ``adapted_blocks`` (what ``n`` counts)."""
    return sorted({depth for depth, _, _ in blocks})


def _check_n(n: int, blocks: list[Any], what: str) -> None:
    depths = adapted_depths(blocks)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > len(depths):
        indices = f"{depths[0]}..{depths[-1]}" if depths else "none"
        raise ValueError(
            f"{what}={n!r}: cannot drop more layers than the model has adapted blocks ({len(depths)}, "
            f"indices {indices}); choose 0..{len(depths)}"
        )


@contextlib.contextmanager
def drop_lowest(model: nn.Module, n: int) -> Iterator[None]:
    """Within the block, adapters of the lowest ``n`` adapted blocks are off (any adapter model)."""
    blocks = adapted_blocks(model)
    _check_n(n, blocks, "drop_lowest(n)")
    dropped = set(adapted_depths(blocks)[:n])
    switched = [w for depth, _, ws in blocks if depth in dropped for w in ws if not w.disabled]
    try:
        for w in switched:
            w.disabled = True
        yield
    finally:
        for w in switched:
            w.disabled = False


def _detach_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args and isinstance(args[0], Tensor):
        return (args[0].detach(), *args[1:]), kwargs
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
    return args, kwargs


class AdapterDropController(OwnsHooks, nn.Module):
    """Decides per forward which adapted blocks run their adapters and where the backward stops."""

    def __init__(self, model: nn.Module, *, robust: bool, max_drop: int, seed: int) -> None:
        super().__init__()
        self.robust, self.max_drop, self.seed = robust, max_drop, seed
        self.eval_drop = 0
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved: resumable draws
        self.last_drop = 0
        # Plain attributes (not submodules): the blocks and wrappers belong to the model. Entries are
        # (rank of the block's depth among adapted depths, block name, wrappers); hooks key by position.
        blocks = adapted_blocks(model)
        rank = {depth: r for r, depth in enumerate(adapted_depths(blocks))}
        self._blocks = [(rank[depth], block, wrappers) for depth, block, wrappers in blocks]
        self._saved: dict[int, list[bool]] = {}
        self._cut = 0
        # Partials of bound methods (not closures): a deep copy of the model rebinds them to the copied
        # controller, where a closure would keep driving the original one.
        for i, (_, block, _) in enumerate(self._blocks):
            module = model.get_submodule(block)
            self.keep(
                module.register_forward_pre_hook(functools.partial(self._pre_hook, i), with_kwargs=True)
            )
            self.keep(module.register_forward_hook(functools.partial(self._post_hook, i)))
        mark(self)  # its step counter is tuner state (no parameters)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to step 0. Meta-device materialisation calls this (the module holds the ``step`` buffer,
        which ``to_empty()`` leaves as uninitialised memory)."""
        self.step.zero_()

    def _draw(self) -> int:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        self.step += 1
        return int(torch.randint(0, self.max_drop + 1, (1,), generator=g))

    def _pre_hook(self, i: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if i == 0 and self.robust:  # the first adapted block of the forward draws for every stack
            self._cut = self.last_drop = self._draw() if module.training else self.eval_drop
        rank, _, wrappers = self._blocks[i]
        if rank < self._cut:
            # Switch this block's adapters off for this call only (restored by the post-hook), so the
            # drop never fights other users of ``disabled`` such as disable_adapters().
            self._saved[i] = [w.disabled for w in wrappers]
            for w in wrappers:
                w.disabled = True
        elif rank == self._cut:  # the lowest block with active adapters: nothing below needs gradients
            return _detach_hidden(args, kwargs)
        return None

    def _post_hook(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        saved = self._saved.pop(i, None)
        if saved is not None:
            for w, flag in zip(self._blocks[i][2], saved, strict=True):
                w.disabled = flag


def set_adapter_drop(model: nn.Module, n: int) -> None:
    """Inference with a robust AdapterDrop model: drop the adapters of the lowest ``n`` blocks."""
    controller = next((m for m in model.modules() if isinstance(m, AdapterDropController)), None)
    if controller is None or not controller.robust:
        raise ValueError(
            "set_adapter_drop needs a model injected with AdapterDropConfig(robust=True); a specialized "
            "model has its drop fixed, and any adapter model can use the drop_lowest(model, n) context"
        )
    _check_n(n, controller._blocks, "set_adapter_drop(n)")
    controller.eval_drop = n


def _check_saved_below_cut(model: nn.Module, config: AdapterDropConfig, found: list[str], cut: int) -> None:
    """Refuse (specialized) or warn about (robust) ``modules_to_save`` modules that run before block ``cut``.

    The hidden state entering the lowest block with active adapters is detached, so a fully trained module
    computed before it (an embedding, a lower block's layer) gets no gradient at all (specialized) or only
    in the batches whose draw cuts below it (robust). Order is the model's module registration order,
    which follows the forward in transformers' models (embeddings, then blocks, then heads).
    """
    if not config.modules_to_save:
        return
    block = next(n.split(f".{cut}.")[0] + f".{cut}" for n in found if block_index(n) == cut)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    saved = find_modules(model, config.modules_to_save, what="modules_to_save", through_wrappers=True)
    below = [s for s in saved if order[s] < order[block] and not block.startswith(s + ".")]
    if not below:
        return
    what = (
        f"AdapterDropConfig: modules_to_save {below} run before {block!r}, where AdapterDrop detaches the "
        "hidden state (nothing below the lowest active adapter gets a gradient)"
    )
    if not config.robust:
        raise ValueError(
            f"{what}, so they would never train; drop fewer layers (drop_layers) or train them with a "
            "plain BottleneckConfig"
        )
    warnings.warn(
        f"{what}: they only train in batches whose drawn n leaves their block adapted", stacklevel=3
    )


@register_tuner("adapterdrop")
@dataclass(kw_only=True)
class AdapterDropConfig(BottleneckConfig):
    """Bottleneck adapters with AdapterDrop (every :class:`BottleneckConfig` field applies).

    Attributes:
        drop_layers: specialized: the number of lowest blocks without adapters.
        robust: draw the number of dropped blocks per training batch instead (adapters everywhere).
        max_drop: robust: the largest ``n`` drawn (default: all adapted blocks but one).
        seed: robust: seed of the draws.

    Example::

        AdapterDropConfig(style="houlsby", drop_layers=5, modules_to_save=["classifier"])
    """

    drop_layers: int = 1
    robust: bool = False
    max_drop: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("drop_layers", "seed") + (("max_drop",) if self.max_drop is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"AdapterDropConfig.{name} must be an int >= 0, got {value!r}")
        if self.layers is not None:
            raise ValueError("AdapterDropConfig: give drop_layers (the lowest blocks to drop), not layers")

    def apply(self, model: nn.Module) -> list[str]:
        targets = self.target_modules
        if targets is None:
            targets = style_placements(model, self.style, owner="AdapterDropConfig")
        found = find_modules(model, targets, exclude=self.exclude_modules)
        blocks = sorted({i for i in map(block_index, found) if i is not None})
        kept = blocks
        if not self.robust:
            if self.drop_layers >= len(blocks):
                raise ValueError(
                    f"AdapterDropConfig.drop_layers={self.drop_layers}: cannot drop more layers than the "
                    f"model has ({len(blocks)} adapted blocks, {blocks[0]}..{blocks[-1]}); at most "
                    f"{len(blocks) - 1} leaves an adapter to train"
                )
            kept = blocks[self.drop_layers :]
        max_drop = len(blocks) - 1 if self.max_drop is None else self.max_drop
        if self.robust and max_drop >= len(blocks):
            raise ValueError(
                f"AdapterDropConfig.max_drop={max_drop}: cannot drop more layers than the model has "
                f"({len(blocks)} adapted blocks); at most {len(blocks) - 1}"
            )
        highest_cut = blocks[max_drop] if self.robust else kept[0]  # the highest block the input is cut at
        _check_saved_below_cut(model, self, found, highest_cut)
        base_fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(BottleneckConfig)}
        names = BottleneckConfig(**{**base_fields, "target_modules": targets, "layers": kept}).apply(model)
        controller = AdapterDropController(model, robust=self.robust, max_drop=max_drop, seed=self.seed)
        model.add_module(CONTROLLER_NAME, controller)
        return names
