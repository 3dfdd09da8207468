"""Synthetic attention from Synthesizer (Tay et al., "Synthesizer: Rethinking Self-Attention for Transformer
Models", ICML 2021).

The attention weights are not computed from query-key dot products but *synthesised*:

* ``"dense"``: every token predicts its own row of logits with a two-layer MLP,
  ``B_i = W_2 relu(W_1 x_i + b_1) + b_2`` with ``W_2`` mapping to ``max_length`` logits, of which the
  first ``Tk`` are used. Here ``x_i`` is the token's per-head query vector ``q_i`` (the variant sees the
  model's projections, not its hidden states), so each head has its own MLP.
* ``"random"``: one ``(max_length, max_length)`` logit matrix per head, learned or (``trainable=False``)
  fixed at its random initialisation; it does not look at the input at all.
* ``"factorized_random"``: the random matrix as a low-rank product ``R_1 R_2^T`` with
  ``R_1, R_2`` of shape ``(max_length, rank)`` per head.

Output: ``softmax(B) v``. The key padding mask is applied to the logits (padded keys get ``-inf``) and
causal attention masks the upper triangle, so both are exact; keys ``k`` are not used. The logits depend
only on positions (and, for ``dense``, on the query itself), so real outputs do not depend on padding.
With ``num_cached`` keys from a KV cache (decoding) the queries are tokens ``num_cached ..``: they take
those rows of the random logits and that diagonal of the causal mask, so a cached step gives what the full
forward gives at those positions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["SynthesizerAttention"]

_MODES = ("dense", "random", "factorized_random")


@register_attention("synthesizer")
class SynthesizerAttention(AttentionVariant):
    """Dense, random or factorised-random synthetic attention (needs ``max_length``).

    Args:
        num_heads: attention heads ``H``.
        head_dim: size of one head ``D``.
        max_length: longest sequence; sets the number of synthesised logits per query.
        mode: ``"dense"``, ``"random"`` or ``"factorized_random"``.
        hidden: width of the dense mode's MLP (default ``head_dim``).
        rank: rank of the factorised random matrix.
        trainable: random modes only: learn the logits (``True``) or keep them fixed (``False``).
        seed: seed of the fixed random logits when ``trainable=False`` (learned ones use the global RNG).
    """

    capabilities = Capabilities(causal=True, padding_mask=True, max_length=True, kv_cache=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        mode: str = "dense",
        hidden: int | None = None,
        rank: int = 8,
        trainable: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if mode not in _MODES:
            raise ValueError(f"synthesizer: mode must be one of {', '.join(map(repr, _MODES))}, got {mode!r}")
        if rank <= 0:
            raise ValueError(f"synthesizer: rank must be positive, got {rank}")
        assert max_length is not None  # checked by the base class (capabilities.max_length)
        self.mode = mode
        H, n = num_heads, max_length
        generator = torch.Generator().manual_seed(seed) if not trainable else None

        def init(*shape: int, fan_in: float) -> Tensor:
            return torch.randn(*shape, generator=generator) / math.sqrt(fan_in)

        if mode == "dense":
            hidden = hidden or head_dim
            self.w1 = nn.Parameter(init(H, head_dim, hidden, fan_in=head_dim))  # (H, D, hidden)
            self.b1 = nn.Parameter(torch.zeros(H, 1, hidden))
            self.w2 = nn.Parameter(init(H, hidden, n, fan_in=hidden))  # (H, hidden, max_length)
            self.b2 = nn.Parameter(torch.zeros(H, 1, n))
        elif mode == "random":
            self._add("random_logits", init(H, n, n, fan_in=1), trainable)  # (H, n, n)
        else:
            self._add("factor_left", init(H, n, rank, fan_in=math.sqrt(rank)), trainable)  # (H, n, rank)
            self._add("factor_right", init(H, n, rank, fan_in=math.sqrt(rank)), trainable)  # (H, n, rank)

    def _add(self, name: str, value: Tensor, trainable: bool) -> None:
        if trainable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, max_length={self.max_length}"

    def logits(self, q: Tensor, n_keys: int, offset: int = 0) -> Tensor:
        """Synthesised logits ``(B or 1, H, Tq, Tk)`` before masking, ``Tk = n_keys``, for queries at
        positions ``offset .. offset + Tq - 1``."""
        Tq, Tk = q.shape[2], n_keys
        rows = slice(offset, offset + Tq)
        if self.mode == "dense":
            x = q.to(self.w1.dtype)  # bf16 activations with fp32 weights (and the reverse) work
            hidden = torch.relu(torch.einsum("bhtd,hde->bhte", x, self.w1) + self.b1)  # (B, H, Tq, hidden)
            return torch.einsum("bhte,hen->bhtn", hidden, self.w2[..., :Tk]) + self.b2[..., :Tk]
        if self.mode == "random":
            return self.random_logits[None, :, rows, :Tk]  # (1, H, Tq, Tk)
        return torch.einsum("htr,hkr->htk", self.factor_left[:, rows], self.factor_right[:, :Tk])[None]

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
        Tq, Tk = q.shape[2], k.shape[2]
        logits = self.logits(q, Tk, offset=num_cached).float()  # (B or 1, H, Tq, Tk)
        visible = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        if causal:
            # Query i is token num_cached + i: it sees keys 0 .. num_cached + i.
            visible = visible & torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(num_cached)
        logits = logits.masked_fill(~visible, float("-inf"))
        # A query that sees nothing (a padded query in an all-padding row) gets zeros, not NaN.
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # (B, H, Tq, Tk)
        return torch.matmul(weights.to(v.dtype), v)  # (B, H, Tq, D)
