"""Performer (FAVOR+): softmax attention approximated with positive orthogonal random features.

"Rethinking Attention with Performers" (Choromanski et al. 2021). With ``x = sqrt(scale) * q`` and
``y = sqrt(scale) * k``, ``exp(x . y) = E_w[phi(x) phi(y)]`` for ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)``
and Gaussian rows ``w``; drawing the rows in orthogonal blocks (norms kept chi-distributed) lowers the
variance. The features are positive, so the normaliser never changes sign. Cost O(n * m * D), m = nb_features.

Numerics: features are computed in float32 whatever the input dtype (fp16 ``exp`` overflows), and each
exponent is shifted by a detached constant that cancels exactly in the ratio: the row maximum for a query, the
maximum over real keys for the keys (in the causal form a running maximum, rescaling the prefix state).
Padding is applied to the KEY FEATURES (zeroed), which removes padded keys from numerator and normaliser;
masking ``v`` instead would leave them in the normaliser.

Random features: ``projection`` is a buffer, redrawn every ``redraw_interval`` training forwards from
``Generator(seed + redraw index)``, so runs are reproducible; it never changes in eval. Causal attention runs
over chunks with a running ``(m, D)`` state: no ``(n, m, D)`` tensor exists. Prefix keys and the keys of a KV
cache (decoding) start that state, as every query sees them: a cached step gives what the full causal
forward gives at those positions (the stabilisers cancel either way).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["PerformerAttention", "orthogonal_random_features"]


def orthogonal_random_features(nb_features: int, dim: int, generator: torch.Generator) -> Tensor:
    """``(nb_features, dim)``: stacked orthogonal ``dim x dim`` blocks, rows rescaled to Gaussian norms."""
    blocks = []
    for _ in range(math.ceil(nb_features / dim)):
        qm, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(qm.T)  # orthonormal rows
    w = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, dim, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


@register_attention("performer")
class PerformerAttention(AttentionVariant):
    """FAVOR+ attention, bidirectional or causal.

    Args:
        nb_features: number of random features ``m`` (256).
        redraw_interval: redraw the features every this many training forwards (1000; 0 never redraws).
        seed: seed of the feature draws.
        chunk_size: positions per chunk of the causal form (64).
        eps: floor of the normaliser.

    Example::

        attn = build_attention("performer", num_heads=12, head_dim=64, nb_features=256)
        out = attn(q, k, v, key_padding_mask=mask)  # (B, H, T, D)
    """

    capabilities = Capabilities(causal=True, padding_mask=True, prefix_keys=True, kv_cache=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        nb_features: int = 256,
        redraw_interval: int = 1000,
        seed: int = 0,
        chunk_size: int = 64,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if nb_features < 1 or redraw_interval < 0 or chunk_size < 1:
            raise ValueError("nb_features and chunk_size must be positive and redraw_interval >= 0")
        self.nb_features = nb_features
        self.redraw_interval = redraw_interval
        self.seed = seed
        self.chunk_size = chunk_size
        self.eps = eps
        self.register_buffer("projection", torch.empty(nb_features, head_dim))  # (m, D)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards so far
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # redraws so far
        self.redraw(0)

    def extra_repr(self) -> str:
        return f"nb_features={self.nb_features}, redraw_interval={self.redraw_interval}, seed={self.seed}"

    @torch.no_grad()
    def redraw(self, index: int | None = None) -> None:
        """Draw the features number ``index`` (the next one by default) from ``Generator(seed + index)``."""
        index = int(self.draws) + 1 if index is None else index
        g = torch.Generator().manual_seed(self.seed + index)
        w = orthogonal_random_features(self.nb_features, self.head_dim, g)
        self.projection.copy_(w.to(self.projection.device))
        self.draws.fill_(index)

    def _log_features(self, x: Tensor, scale: float) -> Tensor:
        """``log(phi(x)) + const``: ``W x - |x|^2 / 2`` for ``x = sqrt(scale) * input``, in float32."""
        x = x.float() * math.sqrt(scale)  # (B, H, T, D)
        return x @ self.projection.float().T - x.pow(2).sum(-1, keepdim=True) / 2  # (B, H, T, m)

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
        if self.training:
            if self.redraw_interval and int(self.steps) > 0 and int(self.steps) % self.redraw_interval == 0:
                self.redraw()
            self.steps += 1
        log_q = self._log_features(q, scale)  # (B, H, T, m)
        phi_q = torch.exp(log_q - log_q.detach().amax(-1, keepdim=True))  # row constant cancels
        log_k = self._log_features(k, scale)  # (B, H, Tk, m)
        keep = None
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None]  # (B, 1, Tk, 1)
            log_k = log_k.masked_fill(~keep, torch.finfo(torch.float32).min)  # out of the maxima below
        vf = v.float()
        if causal:
            out = self._causal(phi_q, log_k, vf, num_prefix + num_cached, keep)  # both seen by every query
        else:
            phi_k = torch.exp(log_k - log_k.detach().amax((-1, -2), keepdim=True))  # (B, H, Tk, m)
            phi_k = phi_k if keep is None else phi_k * keep  # padding on the key FEATURES
            kv = phi_k.transpose(-1, -2) @ vf  # (B, H, m, D)
            den = phi_q @ phi_k.sum(2).unsqueeze(-1)  # (B, H, T, 1)
            out = (phi_q @ kv) / den.clamp_min(self.eps)
        return out.to(q.dtype)  # (B, H, T, D)

    def _causal(
        self, phi_q: Tensor, log_k: Tensor, v: Tensor, num_prefix: int, keep: Tensor | None
    ) -> Tensor:
        """Chunked prefix sums; the key stabiliser is a running maximum, so the past never sees the future
        beyond the current chunk (and there only through a constant that cancels)."""
        P, T, C = num_prefix, phi_q.shape[2], self.chunk_size
        lowest = torch.finfo(torch.float32).min
        B, H = log_k.shape[:2]
        c = log_k.new_full((B, H, 1, 1), lowest)
        if P:
            c = torch.maximum(c, log_k[:, :, :P].detach().amax((-1, -2), keepdim=True))

        def phi_k(lk: Tensor, c: Tensor, s: int, e: int) -> Tensor:  # key features of positions s..e-1
            f = torch.exp(lk - c)
            return f if keep is None else f * keep[:, :, s:e]

        phi_p = phi_k(log_k[:, :, :P], c, 0, P)
        state = phi_p.transpose(-1, -2) @ v[:, :, :P]  # (B, H, m, D): prefix keys, seen by every query
        z = phi_p.sum(2, keepdim=True)  # (B, H, 1, m)
        outs = []
        for s in range(0, T, C):
            e = min(s + C, T)
            lk, vc = log_k[:, :, P + s : P + e], v[:, :, P + s : P + e]
            c_new = torch.maximum(c, lk.detach().amax((-1, -2), keepdim=True))  # (B, H, 1, 1)
            rescale = torch.exp(c - c_new)
            state, z = state * rescale, z * rescale
            fk = phi_k(lk, c_new, P + s, P + e)  # (B, H, C, m)
            fq = phi_q[:, :, s:e]  # (B, H, C, m)
            tril = torch.ones(e - s, e - s, dtype=torch.bool, device=fq.device).tril()
            a = (fq @ fk.transpose(-1, -2)) * tril  # (B, H, C, C)
            num = a @ vc + fq @ state  # (B, H, C, D)
            den = a.sum(-1, keepdim=True) + fq @ z.transpose(-1, -2)  # (B, H, C, 1)
            outs.append(num / den.clamp_min(self.eps))
            state = state + fk.transpose(-1, -2) @ vc
            z = z + fk.sum(2, keepdim=True)
            c = c_new
        return torch.cat(outs, 2)  # (B, H, T, D)
