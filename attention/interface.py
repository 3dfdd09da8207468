"""The ``transformers`` attention interface entry of swapped attention (the ``"attention_interface"`` route of
:func:`lightning_peft.attention.swap_attention`).

One attention function (:func:`variant_attention`) is registered with ``transformers.AttentionInterface``
under :data:`INTERFACE_KEY`, together with a mask function (:func:`padding_mask_function`) under the same key
in ``transformers.AttentionMaskInterface``: without one, the model's mask builders see an unknown key and
silently pass no mask at all. The mask function hands the attention function the compact ``(B, Tk)``
key-padding mask instead of a dense ``(B, 1, Tq, Tk)`` one. Prefix tuning calls :func:`variant_attention`
too, with its prefix keys prepended.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "INTERFACE_KEY",
    "key_padding_from_mask",
    "padding_mask_function",
    "register_interface",
    "repeat_kv",
    "routes_through_interface",
    "variant_attention",
]

INTERFACE_KEY = "lightning_peft"
"""The name registered with ``AttentionInterface`` and ``AttentionMaskInterface``."""


# --------------------------------------------------------------------------------------------------- masks
def key_padding_from_mask(mask: Tensor | None, kv_length: int | None = None) -> Tensor | None:
    """Reduce any Hugging Face attention mask to a ``(B, Tk)`` bool key-padding mask (``None``: no padding).

    Accepts 2-D ``{0, 1}`` / bool masks, and 4-D boolean (``True`` = attend) or additive float
    (``0`` = attend, very negative = masked) masks of shape ``(B, 1, 1 or Tq, Tk)``; a key counts as real
    if any query may see it.
    """
    if mask is None:
        return None
    if mask.dim() == 4:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        real = allowed.any(dim=-2).any(dim=1)  # (B, Tk)
    elif mask.dim() == 2:
        real = mask.bool()
    else:
        raise ValueError(f"cannot read a key-padding mask from a mask of shape {tuple(mask.shape)}")
    if kv_length is not None and real.shape[1] != kv_length:
        raise ValueError(f"attention mask covers {real.shape[1]} keys but there are {kv_length}")
    return None if bool(real.all()) else real


def padding_mask_function(
    *,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """``AttentionMaskInterface`` entry: the compact ``(B, kv_length)`` key-padding mask, or ``None``."""
    name = getattr(mask_function, "__name__", "")
    if mask_function is not None and name not in ("causal_mask_function", "bidirectional_mask_function"):
        raise NotImplementedError(
            f"swapped attention ({INTERFACE_KEY!r}) takes only a key-padding mask, but the model asked "
            "for the "
            f"mask pattern {name or mask_function!r} (packed sequences, sliding or custom overlays); pass an "
            "explicit 2-D attention_mask instead of packing sequences"
        )
    q_offset, q_length = kwargs.get("q_offset"), kwargs.get("q_length")
    static = (
        isinstance(q_offset, int)
        and isinstance(q_length, int)
        and kv_offset + kv_length > q_offset + q_length
    )
    if name == "causal_mask_function" and static:
        # Causal keys after the queries: slots of a pre-allocated cache not written yet. The variants place
        # the queries at the last Tq keys, which here would be wrong (a windowed query sees empty slots).
        raise NotImplementedError(
            f"swapped attention ({INTERFACE_KEY!r}) cannot run on a pre-allocated (static) KV cache "
            f"({kv_length} key slots for {q_offset + q_length} tokens); use the default dynamic cache "
            "(generate(..., cache_implementation='dynamic') or no cache_implementation)"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask  # an already prepared 4-D mask: read by key_padding_from_mask
    mask = attention_mask.bool()
    if (missing := kv_offset + kv_length - mask.shape[1]) > 0:  # static caches: slots not yet written
        mask = nn.functional.pad(mask, (0, missing), value=False)
    mask = mask[:, kv_offset : kv_offset + kv_length]
    return None if bool(mask.all()) else mask


# --------------------------------------------------------------------------------------- attention function
def _scaling(module: nn.Module, head_dim: int, given: float | None) -> float:
    if given is not None:
        return given
    if hasattr(module, "scale_attn_weights"):  # GPT-2 on transformers 4.57 passes no scaling
        scale = head_dim**-0.5 if module.scale_attn_weights else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(module.layer_idx + 1)
        return scale
    return float(getattr(module, "scaling", head_dim**-0.5))


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """Grouped-query attention: ``(B, Hkv, T, D)`` -> ``(B, Hkv * groups, T, D)``."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def variant_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    num_prefix: int = 0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` entry: run the layer's ``attention_variant`` on ``(B, H, T, D)`` q/k/v.

    ``key``/``value`` hold ``num_prefix`` prefix-tuning keys (given by the prefix-tuning wrapper, which
    prepends them), then the KV cache's keys, then the queries' own: the queries are the last ``Tq`` tokens,
    and the ``Tk - Tq - num_prefix`` keys before them reach the variant as ``num_cached`` keys.

    Returns ``(B, Tq, H, D)`` and no attention weights, as the interface expects.
    """
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("swapped attention does not support head_mask")
    groups = int(getattr(module, "num_key_value_groups", 1))
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, Tk, D)
    padding = key_padding_from_mask(attention_mask, key.shape[2])
    scale = _scaling(module, query.shape[-1], scaling)
    variant = module._modules.get("attention_variant")
    if variant is None:  # an attention this swap left alone (cross-attention): dense softmax attention
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=None if padding is None else padding[:, None, None, :], scale=scale
        )
    else:
        num_cached = key.shape[2] - query.shape[2] - num_prefix  # keys of earlier tokens, from a KV cache
        if num_prefix < 0 or num_cached < 0:
            raise ValueError(
                f"swapped attention got {query.shape[2]} queries, {key.shape[2]} keys and "
                f"num_prefix={num_prefix}: the keys must be the prefix keys, then any cached keys, then one "
                "per query"
            )
        out = variant(
            query,
            key,
            value,
            key_padding_mask=padding,
            causal=bool(module.attention_variant_causal),
            scale=scale,
            num_prefix=num_prefix,
            num_cached=num_cached,
        )
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def register_interface() -> None:
    """Register :func:`variant_attention` and :func:`padding_mask_function` under :data:`INTERFACE_KEY`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(INTERFACE_KEY, variant_attention)
    AttentionMaskInterface.register(INTERFACE_KEY, padding_mask_function)


def routes_through_interface(module: nn.Module) -> bool:
    """Whether this module's modeling file dispatches attention through ``AttentionInterface``."""
    try:
        importlib.import_module("transformers.masking_utils").AttentionMaskInterface  # noqa: B018
    except (ImportError, AttributeError):
        return False
    return hasattr(sys.modules[type(module).__module__], "ALL_ATTENTION_FUNCTIONS")
