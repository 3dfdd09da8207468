"""BERT's masked-LM corruption for PET's auxiliary loss (Devlin et al. 2019): 15% of the ordinary tokens
are selected; of those 80% become the mask token, 10% a random token, 10% stay as they are."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["mask_tokens"]


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    tokenizer: Any,
    probability: float = 0.15,
    keep: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Corrupt ``(B, T)`` ids for the MLM loss.

    Args:
        input_ids: ``(B, T)`` ids.
        attention_mask: ``(B, T)``; padding is never selected.
        tokenizer: Supplies ``mask_token_id``, ``all_special_ids`` and the vocabulary size.
        probability: Share of eligible tokens selected.
        keep: ``(B, T)`` bool, positions never selected (soft tokens).
        generator: RNG (default: torch's global RNG).

    Returns:
        Corrupted ids and labels (the original id where selected, ``-100`` elsewhere).
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1); got {probability}")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=input_ids.device)
    eligible = attention_mask.bool() & ~torch.isin(input_ids, special)
    if keep is not None:
        eligible &= ~keep
    draw = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    selected = eligible & (draw < probability)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator).to(input_ids.device)
    ids = torch.where(
        selected & (action < 0.8), torch.full_like(input_ids, tokenizer.mask_token_id), input_ids
    )
    ids = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, ids)
    return ids, labels
