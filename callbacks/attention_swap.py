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

Leaving the callback out when loading such a checkpoint (evaluating with ``PEFT`` alone) would run the trained
weights on the model's own attention: outputs change without a word. The ``PEFT`` callback therefore calls
:func:`check_checkpoint_attention` when it loads a checkpoint: a recorded variant that the model's attention
does not run is refused, naming the variant, its options and the ``AttentionSwap`` callback to add. Variants
with parameters (Linformer, Synthesizer, Mixer) already fail earlier, in the state-dict load, on their
unexpected keys; :func:`explain_load_error` adds to that error which variant the checkpoint needs.
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
from lightning_peft.layouts import find_hf_model

__all__ = ["AttentionSwap", "check_checkpoint_attention", "explain_load_error"]

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


def _call(saved: dict[str, Any], target: str | None) -> str:
    """``AttentionSwap('name', target=..., option=...)`` for a checkpoint record."""
    where = f", target={target!r}" if target is not None else ""
    options = "".join(f", {k}={v!r}" for k, v in saved["options"].items())
    return f"AttentionSwap({saved['variant']!r}{where}{options})"


def _swaps_in(pl_module: nn.Module) -> list[SwapReport]:
    """The swap reports of the Hugging Face models inside ``pl_module`` (empty: no attention swapped)."""
    return [r for m in pl_module.modules() if (r := swapped(m)) is not None]


def _hf_path(pl_module: nn.Module) -> str | None:
    try:
        return find_hf_model(pl_module)[0]
    except (TypeError, ValueError):
        return None


def check_checkpoint_attention(
    trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
) -> None:
    """Refuse a checkpoint trained with a swapped attention when the model's attention does not run it.

    Called by the ``PEFT`` callback on load. With an :class:`AttentionSwap` callback in the Trainer that
    callback compares the records itself; without one, the checkpoint's record (written by ``AttentionSwap``
    at save time) must match what the model runs: a model swapped by hand with the same variant and options
    passes, a model on its own attention or on another variant is refused.

    Raises:
        ValueError: naming the checkpoint's variant and options, what the model runs, and the callback to add.
    """
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None or any(isinstance(cb, AttentionSwap) for cb in trainer.callbacks):
        return
    reports = _swaps_in(pl_module)
    if reports and all(r.variant == saved["variant"] and r.options == saved["options"] for r in reports):
        return
    runs = (
        "its own attention (not swapped)"
        if not reports
        else "attention " + ", ".join(sorted({f"{r.variant!r} with options {r.options}" for r in reports}))
    )
    target = _hf_path(pl_module)
    raise ValueError(
        f"this checkpoint was trained with attention {saved['variant']!r} with options {saved['options']}, "
        f"but {type(pl_module).__name__}'s model runs {runs}: the trained weights would run on another "
        "attention and its outputs change. Add the callback that swaps it, before PEFT: "
        f"Trainer(callbacks=[{_call(saved, target)}, PEFT(...)]) (or call swap_attention(model, "
        f"{saved['variant']!r}, ...) on a fresh model before loading). To evaluate these weights on another "
        f"attention on purpose, delete checkpoint[{CHECKPOINT_KEY!r}] from the file."
    )


def explain_load_error(trainer: L.Trainer, exception: BaseException) -> None:
    """Add to a state-dict load error over a swapped variant's tensors which variant the checkpoint needs.

    A variant with parameters (Linformer's projections, ...) leaves ``...attention_variant.*`` keys in the
    checkpoint; loaded into a model that was not swapped (or swapped to another variant) they are unexpected
    keys, an error raised inside the load, before any callback sees the checkpoint. This adds a note naming
    the recorded variant and the callback to add (the error itself is unchanged).
    """
    lines = str(exception).splitlines() if isinstance(exception, RuntimeError) else []
    if not any("Unexpected key(s)" in line and ".attention_variant." in line for line in lines):
        return
    connector = getattr(trainer, "_checkpoint_connector", None)
    checkpoint = getattr(connector, "_loaded_checkpoint", None) or {}
    saved = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    pl_module = trainer.lightning_module
    if saved is None:
        needs = "a swapped attention (its variant is not recorded: it was saved without AttentionSwap)"
        fix = "swap the same variant in before loading (AttentionSwap or swap_attention)"
    else:
        needs = f"attention {saved['variant']!r} with options {saved['options']}"
        fix = (
            f"add {_call(saved, _hf_path(pl_module) if pl_module is not None else None)} to the Trainer's "
            "callbacks, before PEFT"
        )
    exception.add_note(
        f"lightning-peft: the '.attention_variant.' keys are the parameters of a swapped attention: this "
        f"checkpoint needs {needs}, which the model does not run; {fix}."
    )
