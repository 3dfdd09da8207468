"""Soft tokens inside a pattern (``{soft}``, ``{soft:4}``, ``{soft:It was}``): trainable embeddings at fixed
positions of the template, as in P-tuning's continuous prompts (Liu et al. 2021) mixed with PET's words.

Unlike prompt tuning (virtual tokens prepended before the input), soft tokens sit where the template puts
them. They are initialised from the embeddings of given words (``{soft:It was}``: one per token) or of
tokens drawn at random from the vocabulary (Lester et al. 2021's sampled-vocabulary init), and marked as
tuner state: with a ``PEFT`` callback they train next to the adapters and are saved in adapter-only
checkpoints; with the base frozen by hand they are the only thing that trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.layers import mark
from lightning_peft.prompting.template import Template

__all__ = ["SoftTokens", "embed_with_soft_tokens"]


class SoftTokens(nn.Module):
    """The ``(S, H)`` soft-token embeddings of one template.

    Args:
        template: The template whose ``{soft...}`` parts these are.
        tokenizer: Its tokenizer (to encode init words).
        embedding: The model's input embedding (init values are copied from it).
        seed: Seed of the random-vocabulary init.

    Raises:
        ValueError: The template has no soft tokens.
    """

    def __init__(self, template: Template, tokenizer: Any, embedding: nn.Embedding, seed: int = 0) -> None:
        super().__init__()
        specs = template.soft_init_ids(tokenizer)
        if not specs:
            raise ValueError(f"{template!r} has no {{soft}} tokens")
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for spec in specs:
            if isinstance(spec, int):
                spec = torch.randint(0, embedding.num_embeddings, (spec,), generator=generator).tolist()
            rows.append(embedding.weight.detach()[torch.tensor(spec)].clone().float())
        self.weight = nn.Parameter(torch.cat(rows))  # (S, H)
        mark(self)

    @property
    def num_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, embeds: Tensor, soft_index: Tensor) -> Tensor:
        """Put the soft tokens into ``(B, T, H)`` embeddings where ``soft_index`` ``(B, T)`` is >= 0."""
        return embed_with_soft_tokens(embeds, soft_index, self.weight)


def embed_with_soft_tokens(embeds: Tensor, soft_index: Tensor, weight: Tensor) -> Tensor:
    """``embeds`` with position ``(b, t)`` replaced by ``weight[soft_index[b, t]]`` where that is >= 0."""
    if int(soft_index.max()) >= weight.shape[0]:
        raise ValueError(f"soft_index {int(soft_index.max())} out of range for {weight.shape[0]} soft tokens")
    soft = weight.to(embeds.dtype)[soft_index.clamp(min=0)]  # (B, T, H)
    return torch.where((soft_index >= 0).unsqueeze(-1), soft, embeds)
