"""Dense softmax attention through ``torch.nn.functional.scaled_dot_product_attention``.

"Attention Is All You Need" (Vaswani et al. 2017): ``softmax(q k^T * scale) v``. This is the baseline every
other variant is measured against, and :func:`dense_reference` is the oracle the tests of every variant use:
an explicit, unfused implementation of the same contract (padding, causal, prefix keys), so a bug in the
fused kernel path cannot hide a bug in a variant.

Conventions shared with every variant (see :mod:`lightning_peft.attention.base`):

* the first ``num_prefix`` keys are prefix-tuning keys: every query sees them, causal or not;
* with ``causal=True`` query ``i`` sees the real (non-prefix) keys ``0..num_cached + i`` (after
  ``num_cached`` keys from a KV cache the queries are the last tokens of the sequence);
* padded keys (``key_padding_mask`` False) get zero weight; a query with no visible key outputs zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["SDPAAttention", "allowed_keys", "dense_reference"]


def allowed_keys(
    batch: int,
    tq: int,
    tk: int,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    num_prefix: int,
    device: torch.device,
    num_cached: int = 0,
) -> Tensor | None:
    """Boolean ``(B or 1, 1, Tq or 1, Tk)`` mask of the keys each query may see, or ``None`` for all.

    Dense by construction: only the dense variant and the test oracle call it.
    """
    mask: Tensor | None = None
    if causal:
        qpos = torch.arange(tq, device=device)[:, None] + num_cached  # (Tq, 1): the last Tq tokens
        kpos = torch.arange(tk, device=device)[None, :] - num_prefix  # (1, Tk); prefix keys are < 0
        mask = ((kpos <= qpos) | (kpos < 0))[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        mask = pad if mask is None else mask & pad
    return mask


def dense_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    num_prefix: int = 0,
    num_cached: int = 0,
) -> Tensor:
    """Explicit softmax attention, the oracle for every variant.

    Args:
        q: ``(B, H, Tq, D)`` queries.
        k: ``(B, H, Tk, D)`` keys, ``Tk == num_prefix + num_cached + Tq``.
        v: ``(B, H, Tk, Dv)`` values.
        key_padding_mask: ``(B, Tk)`` bool, True for real keys.
        causal: query ``i`` sees prefix keys and real keys ``<= num_cached + i``.
        scale: score scale, ``D ** -0.5`` by default.
        num_prefix: number of prefix-tuning keys at the front of ``k``/``v``.
        num_cached: number of KV-cache keys after the prefix keys (the queries are the last tokens).

    Returns:
        ``(B, H, Tq, Dv)``; rows with no visible key are zero.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    mask = allowed_keys(
        q.shape[0],
        q.shape[2],
        k.shape[2],
        key_padding_mask=key_padding_mask,
        causal=causal,
        num_prefix=num_prefix,
        device=q.device,
        num_cached=num_cached,
    )
    if mask is None:
        return scores.softmax(-1) @ v
    scores = scores.masked_fill(~mask, float("-inf"))
    any_key = mask.any(-1, keepdim=True)  # (B|1, 1, Tq|1, 1)
    # An empty row would be softmax over all -inf (NaN): give it a harmless finite row, then zero it.
    probs = scores.masked_fill(~any_key, 0.0).softmax(-1) * any_key
    return probs @ v  # (B, H, Tq, Dv)


@register_attention("sdpa")
class SDPAAttention(AttentionVariant):
    """Dense attention via PyTorch's fused kernels; O(n^2) compute, the fused kernels keep memory O(n).

    Supports everything in the contract: causal, key padding, prefix keys, KV-cache keys, and global tokens
    (trivially: in dense attention every token already attends to and from every other).

    Example::

        attn = build_attention("sdpa", num_heads=12, head_dim=64)
        out = attn(q, k, v, key_padding_mask=mask)  # (B, H, T, D)
    """

    capabilities = Capabilities(
        causal=True, padding_mask=True, global_tokens=True, prefix_keys=True, exact_limit=True, kv_cache=True
    )

    def __init__(self, *, num_heads: int, head_dim: int, max_length: int | None = None) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)

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
        if key_padding_mask is None and (not causal or num_prefix + num_cached == 0):
            # No mask tensor at all: lets PyTorch pick its fused (flash) kernel. (Its is_causal is aligned
            # top-left, so it only serves causal attention when Tk == Tq.)
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # (B, H, T, D)
        mask = allowed_keys(
            q.shape[0],
            q.shape[2],
            k.shape[2],
            key_padding_mask=key_padding_mask,
            causal=causal,
            num_prefix=num_prefix,
            device=q.device,
            num_cached=num_cached,
        )
        assert mask is not None
        any_key = mask.any(-1, keepdim=True)  # (B|1, 1, Tq|1, 1)
        # Rows with no visible key: open them to every key, then zero their output (and so their gradient).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_key, scale=scale)
        return out * any_key  # (B, H, T, D)
