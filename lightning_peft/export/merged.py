"""Merged export: fold LoRA into the base weights and save a plain Hugging Face model.

The result loads with ``transformers.AutoModel.from_pretrained(folder)`` alone: no ``lora_`` keys, no
wrapper modules, the base dtype kept. The fold happens on a deep copy (through
:func:`lightning_peft.unload`), so the model passed in keeps its adapters, unmerged, and can go on training;
the copy costs one model's memory while it is saved.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from lightning_peft.api import get_config, unload
from lightning_peft.export.hf_peft import save_extras, split_trainable

__all__ = ["export_merged"]


def export_merged(
    model: nn.Module, out_dir: str | Path, *, module: str | None = None, safe_serialization: bool = True
) -> list[Path]:
    """Merge the tuner of ``model`` into a copy of its Hugging Face model and ``save_pretrained`` it.

    Args:
        model: the Hugging Face model with a mergeable tuner (LoRA; BitFit's trained biases are kept as
            they are), or an object holding it at ``module``.
        out_dir: folder for ``save_pretrained`` (created).
        module: dotted path of the Hugging Face model inside ``model`` (``"backbone"``).
        safe_serialization: write ``model.safetensors`` (default) rather than a pickle.

    Returns:
        The files written; ``extra_tensors.safetensors`` holds trainable tensors outside ``module`` (a
        LightningModule's own head), keyed by their names in ``model``.

    Raises:
        ValueError: no tuner, or one that cannot be merged (bottleneck adapters).
        TypeError: the model at ``module`` has no ``save_pretrained``.
    """
    if get_config(model) is None:
        raise ValueError(f"{type(model).__name__} has no tuner injected: nothing to merge")
    split = split_trainable(model, module)
    if not hasattr(split.root, "save_pretrained"):
        raise TypeError(
            f"{type(split.root).__name__} has no save_pretrained(): pass the Hugging Face model, or its "
            "path inside the LightningModule as module=..."
        )
    merged = unload(copy.deepcopy(split.root), merge_weights=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=safe_serialization)
    extra = save_extras(out, split.outside)
    return sorted(p for p in out.iterdir() if p.is_file() and p != extra) + ([extra] if extra else [])
