"""Linear attention with the ``elu(x) + 1`` feature map.

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (Katharopoulos et al. 2020).
Softmax's ``exp(q . k)`` is replaced by ``phi(q) . phi(k)`` with ``phi(x) = elu(x) + 1 > 0``, so

    out_i = phi(q_i) (sum_j phi(k_j) v_j^T) / (phi(q_i) . sum_j phi(k_j))

costs O(n * D^2). Padded keys have their FEATURES zeroed, so they are in neither the numerator nor the
normaliser (letting them into the normaliser is flash-linear-attention #1263). The causal form runs
over chunks of ``chunk_size`` positions: inside a chunk a small masked ``(C, C)`` product, across chunks a
running ``(D, D)`` state; no ``(n, D, D)`` tensor of per-position states is ever built. Prefix keys start
the state, so every query sees them; so do the keys of a KV cache (decoding), which are all in the queries'
past: a cached step gives what the full causal forward gives at those positions. The score ``scale`` does
not apply (the feature map has none); it is accepted and ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["LinearAttention", "causal_linear_attention", "linear_attention"]


def linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, eps: float) -> Tensor:
    """Bidirectional: ``phi_q`` (B, H, T, M), ``phi_k`` (B, H, Tk, M) zero at padding, ``v`` (B, H, Tk, E)."""
    kv = phi_k.transpose(-1, -2) @ v  # (B, H, M, Dv)
    z = phi_k.sum(2)  # (B, H, M)
    num = phi_q @ kv  # (B, H, T, Dv)
    den = (phi_q @ z.unsqueeze(-1)).clamp_min(eps)  # (B, H, T, 1)
    return num / den


def causal_linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int, eps: float, num_prefix: int = 0
) -> Tensor:
    """Causal: query ``i`` uses keys ``j <= i`` plus the ``num_prefix`` leading (prefix) keys.

    Args:
        phi_q: ``(B, H, T, M)`` query features.
        phi_k: ``(B, H, P + T, M)`` key features, zero for padded keys.
        v: ``(B, H, P + T, Dv)`` values.
    """
    P, T = num_prefix, phi_q.shape[2]
    state = phi_k[:, :, :P].transpose(-1, -2) @ v[:, :, :P]  # (B, H, M, Dv): prefix keys, seen by all
    z = phi_k[:, :, :P].sum(2)  # (B, H, M)
    outs = []
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        fq, fk, vc = phi_q[:, :, s:e], phi_k[:, :, P + s : P + e], v[:, :, P + s : P + e]
        tril = torch.ones(e - s, e - s, dtype=torch.bool, device=fq.device).tril()
        a = (fq @ fk.transpose(-1, -2)) * tril  # (B, H, C, C): within the chunk, past and present only
        num = a @ vc + fq @ state  # (B, H, C, Dv)
        den = a.sum(-1, keepdim=True) + fq @ z.unsqueeze(-1)  # (B, H, C, 1)
        outs.append(num / den.clamp_min(eps))
        state = state + fk.transpose(-1, -2) @ vc
        z = z + fk.sum(2)
    return torch.cat(outs, 2)  # (B, H, T, Dv)


@register_attention("linear")
class LinearAttention(AttentionVariant):
    """Katharopoulos linear attention, bidirectional or causal (chunked).

    Args:
        chunk_size: positions per chunk of the causal form (64).
        eps: floor of the normaliser.

    Example::

        attn = build_attention("linear", num_heads=12, head_dim=64)
        out = attn(q, k, v, key_padding_mask=mask, causal=True)  # (B, H, T, D)
    """

    capabilities = Capabilities(causal=True, padding_mask=True, prefix_keys=True, kv_cache=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        chunk_size: int = 64,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.eps = eps

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
        dtype = q.dtype
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        phi_q = F.elu(q.to(compute)) + 1  # (B, H, T, D)
        phi_k = F.elu(k.to(compute)) + 1  # (B, H, Tk, D)
        if key_padding_mask is not None:
            phi_k = phi_k * key_padding_mask[:, None, :, None]  # padded keys: out of numerator and normaliser
        v = v.to(compute)
        if causal:
            # Prefix and cached keys come before every query: both start the running state.
            leading = num_prefix + num_cached
            out = causal_linear_attention(phi_q, phi_k, v, self.chunk_size, self.eps, leading)
        else:
            out = linear_attention(phi_q, phi_k, v, self.eps)
        return out.to(dtype)  # (B, H, T, D)
