"""Linformer: low-rank attention through learned projections of the sequence axis.

"Linformer: Self-Attention with Linear Complexity" (Wang et al. 2020). Keys and values are projected along the
sequence axis from length ``n`` to ``proj_dim`` (``k`` in the paper) by learned matrices ``E`` and ``F`` of
shape ``(proj_dim, max_length)``, sliced to the actual length ``n``: ``softmax(q (E k)^T * scale) (F v)``.
Cost O(n * proj_dim).

Padding story. The projections mix every position into every projected key, so padding cannot be masked in
the softmax. Instead padded keys and values are ZEROED BEFORE projecting: ``E[:, :n] (k * mask)`` only sums
real positions. With trailing padding (right-padded batches, the usual case) the result is exactly what the
unpadded sequence gives, since the columns of ``E`` and ``F`` at padded positions multiply zeros; real outputs
do not depend on how much padding follows, and padded keys get zero gradient. Left padding shifts positions
and so changes which columns of ``E`` a token meets: pad on the right.

Limits: causal attention is impossible (each projected key mixes the future) and is refused, as are sequences
longer than ``max_length`` and prefix-tuning keys. With ``E = F = I`` and ``proj_dim = n`` it is dense
attention on unpadded input (the exact limit); with padding, the zeroed keys then still take part as zero
vectors (score 0), which is the price of a fixed number of projected keys.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["LinformerAttention"]

Sharing = Literal["none", "headwise", "kv"]


@register_attention("linformer")
class LinformerAttention(AttentionVariant):
    """Linformer attention with learned sequence projections (needs ``max_length``).

    Args:
        proj_dim: projected length ``k`` (256 in the paper); capped at ``max_length``.
        sharing: ``"none"``: separate ``E``, ``F`` per head; ``"headwise"``: one ``E`` and one ``F`` for all
            heads; ``"kv"``: a single matrix for keys and values of all heads (the paper's key-value sharing).

    Example::

        attn = build_attention("linformer", num_heads=12, head_dim=64, max_length=4096, proj_dim=256)
        out = attn(q, k, v, key_padding_mask=mask)  # (B, H, T, D); T <= 4096, right padding
    """

    capabilities = Capabilities(causal=False, padding_mask=True, max_length=True, exact_limit=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        proj_dim: int = 256,
        sharing: Sharing = "headwise",
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        assert max_length is not None  # the base class refuses None for max_length variants
        if sharing not in ("none", "headwise", "kv"):
            raise ValueError(f"sharing must be 'none', 'headwise' or 'kv', got {sharing!r}")
        if proj_dim < 1:
            raise ValueError(f"proj_dim must be positive, got {proj_dim}")
        self.proj_dim = min(proj_dim, max_length)
        self.sharing = sharing
        shape = (
            (num_heads, self.proj_dim, max_length) if sharing == "none" else (1, self.proj_dim, max_length)
        )
        self.E = nn.Parameter(torch.empty(shape))  # (H | 1, k, max_length)
        self.F = None if sharing == "kv" else nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 1/k) entries, so a projected key has the scale of an average of the sequence's keys."""
        for p in (self.E, self.F):
            if p is not None:
                nn.init.normal_(p, std=self.proj_dim**-0.5)

    def extra_repr(self) -> str:
        return f"proj_dim={self.proj_dim}, max_length={self.max_length}, sharing={self.sharing!r}"

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        scale: float,
        num_prefix: int,
        global_mask: Tensor | None,
        num_cached: int,
    ) -> Tensor:
        n = k.shape[2]
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None].to(k.dtype)  # (B, 1, n, 1)
            k, v = k * keep, v * keep  # zero padded positions BEFORE projecting
        E = self.E[:, :, :n].to(k.dtype)  # (H | 1, k, n)
        Fm = E if self.F is None else self.F[:, :, :n].to(v.dtype)
        k_proj = E @ k  # (B, H, k, D)
        v_proj = Fm @ v  # (B, H, k, D)
        return F.scaled_dot_product_attention(q, k_proj, v_proj, scale=scale)  # (B, H, T, D)
