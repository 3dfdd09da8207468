"""Fourier token mixing from FNet (Lee-Thorp, Ainslie, Eckstein & Ontañón, "FNet: Mixing Tokens with Fourier
Transforms", NAACL 2022).

FNet replaces self-attention with the real part of a two-dimensional discrete Fourier transform, over the
sequence and the hidden axis: ``y = Re(FFT_seq(FFT_hidden(x)))``. It has no parameters and no q/k/v, so it
is a :class:`~lightning_peft.attention.base.TokenMixer` and swapping it in replaces a model's whole
self-attention module.

Padding. The DFT over the sequence axis mixes every position with every other, so with zero-padded
batches the outputs of real tokens change with the amount of padding (transformers #14359: the Hugging
Face FNet takes the FFT over the padded length). Here each sequence is transformed over its *real* tokens
only: the real tokens of every row are packed to the front (keeping their order, so left and right padding
both work), rows are grouped by real length, and each group gets one batched FFT of exactly that length.
The result is bit-for-bit what the sequence would give on its own, unpadded; padded positions output zeros.
The cost is one FFT call per distinct length in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_peft.attention.base import Capabilities, TokenMixer, register_attention

__all__ = ["FNetMixer", "pack_real_tokens"]


def pack_real_tokens(key_padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Order that moves every row's real tokens to the front, and each row's real length.

    Args:
        key_padding_mask: ``(B, T)`` bool, ``True`` for real tokens.

    Returns:
        ``order`` ``(B, T)`` (a stable permutation: real tokens first, in their original order) and
        ``lengths`` ``(B,)``. ``x.gather(1, order)`` packs; scattering with the same order unpacks.
    """
    T = key_padding_mask.shape[1]
    positions = torch.arange(T, device=key_padding_mask.device)
    order = torch.where(key_padding_mask, positions, positions + T).argsort(dim=1)  # (B, T)
    return order, key_padding_mask.sum(dim=1)


def _fourier(x: Tensor) -> Tensor:
    """``Re(FFT2(x))`` over the sequence and hidden axes of ``(B, T, C)``, computed in fp32 at least."""
    compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return torch.fft.fftn(compute, dim=(1, 2)).real.to(x.dtype)


@register_attention("fnet")
class FNetMixer(TokenMixer):
    """Parameter-free Fourier mixing, exact under padding (see the module docstring).

    ``forward(hidden (B, T, C), key_padding_mask (B, T) bool | None) -> (B, T, C)``.
    """

    capabilities = Capabilities(causal=False, padding_mask=True)

    def forward(self, hidden: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        if hidden.dim() != 3:
            raise ValueError(f"fnet: hidden states must be (B, T, C), got {tuple(hidden.shape)}")
        if key_padding_mask is None or bool(key_padding_mask.all()):
            return _fourier(hidden)
        if key_padding_mask.shape != hidden.shape[:2] or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"fnet: key_padding_mask must be bool {tuple(hidden.shape[:2])}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        B, T, C = hidden.shape
        order, lengths = pack_real_tokens(key_padding_mask)
        index = order[..., None].expand(B, T, C)
        packed = hidden.gather(1, index)  # (B, T, C): real tokens first
        mixed = torch.zeros_like(packed)
        for length in lengths.unique().tolist():
            if length == 0:
                continue
            rows = (lengths == length).nonzero(as_tuple=True)[0]
            mixed[rows, :length] = _fourier(packed[rows, :length])  # one FFT of exactly this length
        return torch.zeros_like(hidden).scatter(1, index, mixed)  # back to the original positions
