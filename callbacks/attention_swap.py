"""The ``AttentionSwap`` callback: run a Hugging Face model inside a LightningModule with another attention.

It calls :func:`lightning_peft.attention.swap.swap_attention` in ``setup``, before ``configure_optimizers``
and before DDP/FSDP wrap the model, so a variant's own parameters (Linformer projections, Synthesizer logits)
are seen by the optimizer and the reducer. When the module builds its model in ``configure_model`` (so the
target does not exist yet at ``setup``), the swap runs right after ``configure_model`` instead. Put it
*before* a :class:`~lightning_peft.callbacks.PEFT` callback in ``callbacks=[...]``: callbacks run their
``setup`` in list order, and the tuner should see the swapped model.

Checkpoints record the variant and its options (``on_save_checkpoint``; Lightning skips that hook for
``save_weights_only=True`` checkpoints). Resuming from a checkpoint made with another variant, or with none,
is refused with a message naming both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_peft.attention.base import get_attention
from lightning_peft.attention.swap import SwapReport, swap_attention, swapped
from lightning_peft.callbacks.patching import Patches

__all__ = ["AttentionSwap"]

CHECKPOINT_KEY = "lightning_peft_attention"
"""Top-level checkpoint key holding ``{"variant": name, "options": {...}}``."""


class AttentionSwap(Callback):
    """Swap the attention of a model held by the LightningModule before training starts.

    Args:
        name: a registered attention variant (``"sliding_window"``, ``"reformer"``, ``"fnet"``, ...).
        target: where the Hugging Face model is: a dotted attribute path on the LightningModule
            (default ``"model"``; ``""`` means the LightningModule itself) or a callable
            ``pl_module -> nn.Module``.
        strict: refuse (``True``) or only warn about (``False``) a checkpoint made with another variant.
        options: the variant's options as one dict (what YAML recipes and LightningCLI use).
        **kwargs: the variant's options as keywords (``window=128``, ``bucket_size=64``, ...), merged
            with ``options``.

    Example::

        from lightning_peft.callbacks import AttentionSwap, PEFT

        trainer = L.Trainer(callbacks=[
            AttentionSwap("sliding_window", target="model", window=256),
            PEFT(LoRAConfig(r=8, alpha=16, target_modules=["query", "value"])),
        ])
        trainer.fit(module)   # module.model (a BertForSequenceClassification) now runs windowed attention

    In a LightningCLI recipe::

        trainer:
          callbacks:
            - class_path: lightning_peft.callbacks.AttentionSwap
              init_args: {name: sliding_window, target: backbone, options: {window: 32}}
    """

    def __init__(
        self,
        name: str,
        target: str | Callable[[L.LightningModule], nn.Module] = "model",
        *,
        strict: bool = True,
        options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        get_attention(name)  # fail at construction on an unknown name, listing the known ones
        self.name = name
        self.target = target
        self.strict = strict
        if overlap := set(options or {}) & set(kwargs):
            raise ValueError(
                f"AttentionSwap: option(s) {sorted(overlap)} given both in options= and as keywords"
            )
        self.options = {**(options or {}), **kwargs}
        self.report: SwapReport | None = None
        self._patches = Patches()

    @property
    def record(self) -> dict[str, Any]:
        """What goes into checkpoints: the variant name and its options."""
        return {"variant": self.name, "options": dict(self.options)}

    def _resolve(self, pl_module: L.LightningModule) -> nn.Module | None:
        if callable(self.target):
            try:
                return self.target(pl_module)
            except AttributeError:  # not built yet (configure_model)
                return None
        module: Any = pl_module
        for part in filter(None, self.target.split(".")):
            module = getattr(module, part, None)
            if module is None:
                return None
        return module

    def _swap(self, pl_module: L.LightningModule) -> None:
        model = self._resolve(pl_module)
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"AttentionSwap: target {self.target!r} of {type(pl_module).__name__} is not an nn.Module "
                f"(got {type(model).__name__}); pass the attribute path of the Hugging Face model"
            )
        already = swapped(model)
        self.report = swap_attention(model, self.name, **self.options)  # same variant again: a no-op
        if already is None:
            rank_zero_info(f"AttentionSwap: {self.report}")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._resolve(pl_module) is None and is_overridden("configure_model", pl_module):
            self._swap_after_configure_model(pl_module)
            return
        self._swap(pl_module)

    def _swap_after_configure_model(self, pl_module: L.LightningModule) -> None:
        def swap_around(configure_model: Any) -> Any:
            def configure_model_then_swap() -> None:
                configure_model()
                self._swap(pl_module)

            return configure_model_then_swap

        self._patches.wrap(pl_module, "configure_model", swap_around)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._patches.restore()

    @override
    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = self.record

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved == self.record:
            return
        made_with = (
            "the model's own attention (no AttentionSwap record)"
            if saved is None
            else f"attention {saved['variant']!r} with options {saved['options']}"
        )
        message = (
            f"AttentionSwap: this checkpoint was made with {made_with}, but this run swaps in "
            f"{self.name!r} with options {self.options}. To resume it, {_matching(saved)}; or pass "
            "strict=False to load it anyway."
        )
        if self.strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)


def _matching(saved: dict[str, Any] | None) -> str:
    """How to configure a run that matches a checkpoint record (for error messages)."""
    if saved is None:
        return "drop the AttentionSwap callback"
    options = "".join(f", {k}={v!r}" for k, v in saved["options"].items())
    return f"use AttentionSwap({saved['variant']!r}{options})"
