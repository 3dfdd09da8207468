"""Replacement self-attention modules, the ``"module"`` route of
:func:`lightning_peft.attention.swap_attention`: BERT/RoBERTa on transformers 4.57, whose self-attention does
not go through the attention interface, and token mixers (FNet, MLP-Mixer) on every version."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_peft.attention.base import AttentionVariant, TokenMixer
from lightning_peft.attention.interface import key_padding_from_mask

__all__ = ["TokenMixerSelfAttention", "VariantSelfAttention"]


class VariantSelfAttention(nn.Module):
    """Drop-in for an encoder self-attention module (BERT/RoBERTa on transformers 4.57).

    Keeps the original ``query``, ``key``, ``value`` projections (same names, so state-dict keys and LoRA
    targets are unchanged) and runs ``attention_variant`` on their outputs. Returns ``(context, None)``.
    """

    def __init__(self, original: nn.Module, variant: AttentionVariant, causal: bool) -> None:
        super().__init__()
        self.query, self.key, self.value = original.query, original.key, original.value
        self.num_attention_heads = int(original.num_attention_heads)
        self.attention_head_size = int(original.attention_head_size)
        self.attention_variant = variant
        self.attention_variant_causal = causal

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        past_key_values: Any = None,
        **_: Any,
    ) -> tuple[Tensor, None]:
        if encoder_hidden_states is not None or past_key_values is not None or head_mask is not None:
            raise NotImplementedError(
                "swapped self-attention supports no cross-attention, KV cache or head_mask"
            )
        B, T, _ = hidden_states.shape
        shape = (B, T, self.num_attention_heads, self.attention_head_size)
        q, k, v = (
            proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        out = self.attention_variant(
            q,  # (B, H, T, D)
            k,
            v,
            key_padding_mask=key_padding_from_mask(attention_mask, T),
            causal=self.attention_variant_causal,
            scale=self.attention_head_size**-0.5,
        )
        return out.transpose(1, 2).reshape(B, T, -1), None  # (B, T, C)


class TokenMixerSelfAttention(nn.Module):
    """Replaces a whole self-attention module with the :class:`TokenMixer` ``mixer``; returns ``(y, None)``.

    (Token mixers have no q/k/v: the replaced projections are dropped.)
    """

    def __init__(self, mixer: TokenMixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, **_: Any
    ) -> tuple[Tensor, None]:
        padding = key_padding_from_mask(attention_mask, hidden_states.shape[1])
        return self.mixer(hidden_states, padding), None  # (B, T, C)
