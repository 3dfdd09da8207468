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

__all__ = ["CheckpointFileError", "load_checkpoint", "read_checkpoint", "split_metadata"]


class CheckpointFileError(ValueError):
    """A file given as a checkpoint is missing, empty, truncated, damaged or not a checkpoint at all."""


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive
# torch's legacy (pre-zip) format starts with a pickled magic number
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def read_checkpoint(path: str | Path, *, weights_only: bool = True, trust_hint: str = "") -> dict[str, Any]:
    """Load a ``torch.save`` checkpoint on the CPU, with errors that name the file and the cause.

    Args:
        path: The checkpoint file.
        weights_only: Refuse to unpickle anything beyond tensors and plain data (``torch.load``'s safe mode).
        trust_hint: How the caller's user allows unsafe loading (e.g. ``"add --trust-checkpoint"``); said
            only when the file is a sound checkpoint that safe mode refuses.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointFileError: The file is missing, empty, truncated (a write cut short), not a checkpoint, or
            holds objects that ``weights_only`` refuses.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointFileError(f"{path} is not a readable safetensors file ({err})") from None
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} does not exist" + (" (it is a folder)" * path.is_dir()))
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(
            f"checkpoint {path} is empty (0 bytes): a write that never finished, or not a checkpoint"
        )
    with path.open("rb") as f:
        head = f.read(32)
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"checkpoint {path} is truncated ({size:,} bytes, the end of its archive is missing): the write "
            "was cut short (killed, disk full?); use an earlier checkpoint"
        )
    if not head.startswith(_ZIP_MAGIC) and _LEGACY_MAGIC not in head:
        raise CheckpointFileError(
            f"{path} is not a PyTorch checkpoint (it starts with bytes {head[:4].hex(' ')}, not a torch.save "
            "archive)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        if head.startswith(_ZIP_MAGIC) and _damaged_archive(path):
            raise CheckpointFileError(
                f"checkpoint {path} is damaged (its data fails the archive's checksum): the file changed "
                "after it was written; use an earlier checkpoint"
            ) from None
        if weights_only and "weights only load failed" in str(err).lower():
            raise CheckpointFileError(
                f"checkpoint {path} holds objects beyond tensors and plain data, which safe loading refuses"
                + (f"; if you trust the file, {trust_hint}" if trust_hint else "")
            ) from None
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointFileError(
            f"checkpoint {path} is damaged or not a PyTorch checkpoint ({type(err).__name__}: {first_line})"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointFileError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict (a Lightning .ckpt is a dict "
            "with 'state_dict')"
        )
    return checkpoint


def _damaged_archive(path: Path) -> bool:
    """Whether the pickles of a zip checkpoint fail their CRC check or cannot be read (a damaged file, as
    opposed to an intact one whose objects safe loading refuses). Tensor data is not read."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith(".pkl"):
                    archive.read(name)
    except (zipfile.BadZipFile, UnicodeDecodeError, OSError, EOFError, ValueError):
        return True
    return False


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
