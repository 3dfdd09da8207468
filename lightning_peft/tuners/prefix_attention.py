"""The attention function of prefix tuning (:mod:`lightning_peft.tuners.prefix`), registered with
``transformers.AttentionInterface`` under :data:`PREFIX_KEY`: it prepends layer ``i``'s prefix keys and values
to the ``(B, H, T, D)`` states it receives (after the KV cache update), extends the padding mask and, for T5,
the relative position bias over them, and runs dense SDPA or a swapped attention variant with ``num_prefix``
keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.attention.interface import (
    key_padding_from_mask,
    padding_mask_function,
    repeat_kv,
    variant_attention,
)

if TYPE_CHECKING:
    from lightning_peft.tuners.prefix import PrefixEncoder

__all__ = [
    "LAYER_ATTR",
    "PREFIX_KEY",
    "Site",
    "prefix_attention",
    "prefix_position_bias",
    "register_prefix_attention",
]

PREFIX_KEY = "lightning_peft_prefix"
LAYER_ATTR = "_lp_prefix"
"""Attribute of a prefixed attention module holding its :class:`Site`."""


@dataclass(frozen=True)
class Site:
    """What a prefixed attention module needs, kept in its ``__dict__`` (not a submodule: the parameters
    live on the Hugging Face root). ``bias_owner``: the attention module holding the stack's relative
    position bias table (T5), whose buckets the prefix keys are scored with."""

    encoder: PrefixEncoder
    index: int
    causal: bool
    bias_owner: nn.Module | None = None


def prefix_position_bias(site: Site, heads: int, tq: int, tk: int, like: Tensor) -> Tensor:
    """``(1, H, Tq, l)`` relative position bias of the prefix keys (zeros without a bias table).

    The real tokens sit at positions ``l, l+1, ...`` and the prefix at ``0 .. l-1`` (``shift_positions``);
    with a KV cache the ``Tq`` queries are the last of the ``Tk`` real keys (causal decoding), so query
    ``i`` is at ``l + Tk - Tq + i``. These are the positions PEFT's cached prefixes get in T5.
    """
    n = site.encoder.num_virtual_tokens
    owner = site.bias_owner
    if owner is None or not site.encoder.shift_positions:
        return like.new_zeros(1, heads, tq, n)
    query_pos = torch.arange(tq, device=like.device) + (tk - tq) + n  # (Tq,)
    relative = torch.arange(n, device=like.device)[None, :] - query_pos[:, None]  # (Tq, l), all < 0
    buckets = owner._relative_position_bucket(
        relative,
        bidirectional=not owner.is_decoder,
        num_buckets=owner.relative_attention_num_buckets,
        max_distance=owner.relative_attention_max_distance,
    )
    return owner.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).to(like.dtype)


def prefix_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``AttentionInterface`` entry: prepend layer ``i``'s prefix to ``(B, H, T, D)`` keys and values.

    ``position_bias`` (T5: ``(1 or B, H, Tq, Tk)``, added to the scores) is extended over the prefix keys.
    """
    padding = key_padding_from_mask(attention_mask, key.shape[2])  # (B, Tk) or None
    site: Site | None = module.__dict__.get(LAYER_ATTR)
    active = site is not None and not site.encoder.disabled
    tk_real = key.shape[2]
    if active:
        assert site is not None
        B, n = key.shape[0], site.encoder.num_virtual_tokens
        pk, pv = site.encoder.layer_kv(site.index).to(key.dtype)  # (H, l, D) each
        key = torch.cat([pk.expand(B, -1, -1, -1), key], dim=2)
        value = torch.cat([pv.expand(B, -1, -1, -1), value], dim=2)
        if padding is not None:
            padding = torch.cat([padding.new_ones(B, n), padding], dim=1)
    if module._modules.get("attention_variant") is not None:  # a swapped variant takes num_prefix keys
        if position_bias is not None:
            raise NotImplementedError("a swapped attention variant cannot add a relative position bias")
        # The prefix keys are the ones prepended here; any other keys before the queries come from a KV cache.
        num_prefix = key.shape[2] - tk_real
        return variant_attention(
            module, query, key, value, padding, scaling, dropout, num_prefix=num_prefix, **kwargs
        )
    groups = int(getattr(module, "num_key_value_groups", 1))
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    tq, tk = query.shape[2], key.shape[2]
    mask = None if padding is None else padding[:, None, None, :]  # (B, 1, 1, Tk)
    causal = site.causal if site is not None else bool(getattr(module, "is_causal", False))
    if causal and tq > 1:  # bottom-right aligned: query i sees keys j <= i + (Tk - Tq), prefixes included
        j = torch.arange(tk, device=query.device)
        allowed = j[None, :] <= torch.arange(tq, device=query.device)[:, None] + (tk - tq)  # (Tq, Tk)
        mask = allowed if mask is None else mask & allowed
    attn_mask: Tensor | None = mask
    if position_bias is not None:  # additive scores: the bias, and -inf where the boolean mask forbids
        bias = position_bias.to(query.dtype)
        if active:
            assert site is not None
            extra = prefix_position_bias(site, query.shape[1], tq, tk_real, bias)
            bias = torch.cat([extra.expand(bias.shape[0], -1, -1, -1), bias], dim=-1)
        attn_mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout if module.training else 0.0, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None  # (B, Tq, H, D)


def register_prefix_attention() -> None:
    """Register :func:`prefix_attention` (and the compact-mask function) under :data:`PREFIX_KEY`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PREFIX_KEY, prefix_attention)
    AttentionMaskInterface.register(PREFIX_KEY, padding_mask_function)
