"""Adapter-only checkpoints back into a model for inference, without a Trainer.

``MyModule.load_from_checkpoint("adapter_only.ckpt")`` cannot work on its own: the file holds the tuner's
tensors only, and the module it builds has no tuner to put them in. :func:`load_checkpoint` is the one way:

    module = MyModule(...)                               # the base model, as for training
    lightning_peft.load_checkpoint(module, "last.ckpt")  # injects the stored config, loads, checks the base
    module.eval()

It reads the checkpoint written by the ``PEFT`` callback (or a file of
:func:`~lightning_peft.trainable_state_dict`), injects the tuner config stored in it unless the model
already carries one (which must then be equal), loads the adapter tensors strictly, and compares the stored
base-model fingerprint with the model, so adapters are never silently put on another base model.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.api import get_config, inject, load_trainable_state_dict
from lightning_peft.config import config_from_dict
from lightning_peft.fingerprint import check_base
from lightning_peft.layers import META_KEY

__all__ = ["load_checkpoint", "read_checkpoint", "split_metadata"]


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load`` a checkpoint safely (``weights_only``), with errors that name the file and the cause
    (missing, empty, truncated, not a checkpoint) instead of raw ``EOFError`` / ``OSError``."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {str(file)!r} does not exist")
    if file.stat().st_size == 0:
        raise ValueError(f"checkpoint {str(file)!r} is empty (0 bytes): it was not written to the end")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(file))
        except Exception as err:
            raise ValueError(f"{str(file)!r} is not a readable safetensors file ({err})") from None
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as err:
        truncated = zipfile.is_zipfile(file) is False and _starts_like_a_checkpoint(file)
        what = "is truncated (cut off while being written)" if truncated else "is not a PyTorch checkpoint"
        raise ValueError(f"checkpoint {str(file)!r} {what}: {type(err).__name__}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {str(file)!r} holds a {type(data).__name__}, not a dict of tensors")
    return data


def _starts_like_a_checkpoint(file: Path) -> bool:
    with file.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive


def split_metadata(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """``(adapter tensors, our metadata or None)`` from a Lightning checkpoint, its ``state_dict``, or a
    plain name -> tensor mapping."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's state_dict is a {type(state).__name__}, not a mapping")
    meta = checkpoint.get(META_KEY) or state.get(META_KEY)
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"the state dict holds non-tensor entries {bad[:3]}: not an adapter state dict")
    return tensors, meta if isinstance(meta, dict) else None


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Put the adapters of an adapter-only checkpoint into ``model`` (the module the ``PEFT`` callback was
    attached to, built as for training) and return it.

    Raises:
        ValueError: unreadable file (named, with the cause), no tuner config stored and none injected, a
            different tuner config, a different base model, or missing/unexpected adapter tensors.
    """
    checkpoint = read_checkpoint(path)
    tensors, meta = split_metadata(checkpoint)
    saved = (meta or {}).get("config")
    current = get_config(model)
    if current is None:
        if saved is None:
            raise ValueError(
                f"{str(path)!r} carries no tuner config (not written by the PEFT callback) and the model has "
                "no tuner: call lightning_peft.inject(model, config) with the training config first"
            )
        inject(model, config_from_dict(saved))
    elif saved is not None and (diff := config_from_dict(saved).diff(current)):
        raise ValueError(f"{str(path)!r} was trained with another tuner config:\n  " + "\n  ".join(diff))
    check_base(model, meta, where=repr(str(path)))
    load_trainable_state_dict(model, tensors, strict=strict)
    return model
