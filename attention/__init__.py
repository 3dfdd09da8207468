"""Swappable long-sequence attention (installed as ``lightning_peft.attention``).

One tensor layout and call signature (see :mod:`lightning_peft.attention.base`), one file per variant,
registered by name; dense SDPA is the reference every variant is tested against.
"""

from lightning_peft.attention.base import (
    AttentionVariant,
    Capabilities,
    TokenMixer,
    available_attention,
    build_attention,
    get_attention,
    register_attention,
)

__all__ = [
    "AttentionVariant",
    "Capabilities",
    "TokenMixer",
    "available_attention",
    "build_attention",
    "get_attention",
    "register_attention",
]

# Adding a variant is adding one file: every module here registers itself on import.
import importlib as _importlib
import pkgutil as _pkgutil

for _mod in _pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name not in {"base"}:
        _importlib.import_module(f"{__name__}.{_mod.name}")

from lightning_peft.attention.swap import SwapReport, swap_attention, swapped  # noqa: E402

__all__ += ["SwapReport", "swap_attention", "swapped"]
