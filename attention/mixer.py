"""Token-mixing MLP from MLP-Mixer (Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision",
NeurIPS 2021).

The token-mixing sublayer applies one MLP along the sequence axis, shared by every channel:
``Y[:, c] = W_2 gelu(W_1 X[:, c] + b_1) + b_2`` with ``W_1: (S, max_length)`` and
``W_2: (max_length, S)``. Its weights are indexed by position, so it needs a maximum length; shorter
sequences use the first ``T`` columns of ``W_1`` and rows of ``W_2``. It is a
:class:`~lightning_peft.attention.base.TokenMixer`: swapping it in replaces a model's whole self-attention
module (the block's own residual and LayerNorm stay).

Padding. Padded tokens are masked out of the mixing: each row's real tokens are packed to the front (so
position ``i`` means the ``i``-th real token for left and right padding alike), padded inputs are zeroed
before ``W_1`` and padded outputs are zeroed after ``W_2``. The output of a real token therefore depends only
on the real tokens, exactly as if the sequence had been fed alone, unpadded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_peft.attention.base import Capabilities, TokenMixer, register_attention
from lightning_peft.attention.fnet import pack_real_tokens

__all__ = ["TokenMixingMLP"]


@register_attention("mixer")
class TokenMixingMLP(TokenMixer):
    """MLP-Mixer token mixing with a maximum length and exact padding.

    Args:
        num_heads, head_dim: the replaced attention's shape (hidden size ``C = num_heads * head_dim``).
        max_length: longest sequence (required).
        token_hidden: width ``S`` of the token-mixing MLP (default ``max_length``).
    """

    capabilities = Capabilities(causal=False, padding_mask=True, max_length=True)

    def __init__(
        self, *, num_heads: int, head_dim: int, max_length: int | None = None, token_hidden: int | None = None
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        assert max_length is not None  # checked by the base class (capabilities.max_length)
        S = token_hidden or max_length
        self.w1 = nn.Parameter(torch.randn(S, max_length) / math.sqrt(max_length))  # (S, n)
        self.b1 = nn.Parameter(torch.zeros(S, 1))
        self.w2 = nn.Parameter(torch.randn(max_length, S) / math.sqrt(S))  # (n, S)
        self.b2 = nn.Parameter(torch.zeros(max_length, 1))

    def extra_repr(self) -> str:
        return f"max_length={self.max_length}, token_hidden={self.w1.shape[0]}"

    def forward(self, hidden: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"mixer: hidden states must be (B, T, C), got {tuple(hidden.shape)}")
        B, T, C = hidden.shape
        assert self.max_length is not None
        if self.max_length < T:
            raise ValueError(f"mixer: sequence length {T} exceeds max_length={self.max_length}")
        if key_padding_mask is None:
            return self._mix(hidden)
        if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"mixer: key_padding_mask must be bool ({B}, {T}), got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        order, lengths = pack_real_tokens(key_padding_mask)
        index = order[..., None].expand(B, T, C)
        real = (torch.arange(T, device=hidden.device) < lengths[:, None])[..., None]  # (B, T, 1), packed
        packed = hidden.gather(1, index) * real  # (B, T, C): real tokens first, padding zeroed
        mixed = self._mix(packed) * real
        return torch.zeros_like(hidden).scatter(1, index, mixed)

    def _mix(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        h = torch.nn.functional.gelu(torch.einsum("st,btc->bsc", self.w1[:, :T], x) + self.b1)  # (B, S, C)
        return torch.einsum("ts,bsc->btc", self.w2[:T], h) + self.b2[:T]  # (B, T, C)
