"""The layers of a knowledge adapter (Wang et al. 2021, "K-Adapter: Infusing Knowledge into Pre-Trained
Models with Adapters"): ``down`` -> transformer encoder layers -> ``up`` plus the input, chained over the
base blocks it reads. :mod:`lightning_peft.tuners.kadapter` attaches them to a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from lightning_peft.layers import NormalInitLinear

__all__ = ["KnowledgeAdapter", "KnowledgeAdapterLayer"]


class _SelfAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose init is public as ``reset_parameters()``: torch names it
    ``_reset_parameters()``, which meta-device materialisation (Lightning's) does not call, leaving the
    attention's projections uninitialised memory."""

    def reset_parameters(self) -> None:
        self._reset_parameters()


class _OutProjection(NonDynamicallyQuantizableLinear):
    """The attention's output projection: ``nn.Linear``'s weight and the zero bias that
    ``nn.MultiheadAttention``'s init gives it, also when it is reset after the attention."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _encoder_layer(hidden: int, heads: int, ffn: int, dropout: float) -> nn.TransformerEncoderLayer:
    """torch's encoder layer, built by torch as usual, whose attention keeps its init through meta-device
    materialisation: the two modules get a subclass adding only the resets above (no state, so switching
    an instance's class is safe, as FSDP2's ``fully_shard`` does)."""
    layer = nn.TransformerEncoderLayer(
        hidden, heads, ffn, dropout=dropout, activation="gelu", batch_first=True
    )
    layer.self_attn.__class__ = _SelfAttention
    layer.self_attn.out_proj.__class__ = _OutProjection
    return layer


class KnowledgeAdapterLayer(nn.Module):
    """``h + up(TransformerEncoderLayer^N(down(h)))``: (B, T, d) -> (B, T, d)."""

    def __init__(self, d: int, hidden: int, *, num_layers: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        # The released code: small normal init (2e-4 on the up projection), zero biases; in the layers'
        # own reset_parameters(), so it survives meta-device materialisation (see lightning_peft.layers).
        self.down = NormalInitLinear(d, hidden, std=0.02)
        self.encoder = nn.ModuleList(_encoder_layer(hidden, heads, ffn, dropout) for _ in range(num_layers))
        self.up = NormalInitLinear(hidden, d, std=2e-4)

    def reset_parameters(self) -> None:
        """Re-initialise every tensor of the layer as at construction."""
        for module in self.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not self and callable(reset):
                reset()

    def forward(self, h: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        x = self.down(h)
        for layer in self.encoder:
            x = layer(x, src_key_padding_mask=padding_mask)
        return h + self.up(x)


class KnowledgeAdapter(nn.Module):
    """One knowledge adapter: a chain of :class:`KnowledgeAdapterLayer` reading base blocks ``reads``."""

    def __init__(self, d: int, reads: Sequence[int], **layer_kw: Any) -> None:
        super().__init__()
        self.reads = list(reads)
        self.layers = nn.ModuleList(KnowledgeAdapterLayer(d, **layer_kw) for _ in self.reads)

    def forward(self, hidden: dict[int, Tensor], padding_mask: Tensor | None = None) -> Tensor:
        prev: Tensor | None = None
        for index, layer in zip(self.reads, self.layers, strict=True):
            h = hidden[index] if prev is None else hidden[index] + prev
            prev = layer(h, padding_mask)
        assert prev is not None
        return prev
