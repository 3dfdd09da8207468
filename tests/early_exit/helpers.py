"""Helpers the early_exit tests import (the fixtures built on them are in ``conftest.py``)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel

import lightning_peft as lp

VOCAB = 97


DEPTH = 4


FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64, pad_token_id=1
    ),
    "xlm-roberta": dict(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64, pad_token_id=1
    ),
    "camembert": dict(
        hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2, intermediate_size=64, pad_token_id=1
    ),
    "electra": dict(
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=64,
    ),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=DEPTH, n_heads=2),
    "albert": dict(
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=DEPTH,
        num_attention_heads=2,
        intermediate_size=64,
    ),
}


FAMILIES = sorted(FAMILY_CONFIGS)


def encoder(family: str = "bert", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A seeded random ``DEPTH``-layer encoder of ``family`` in eval mode, eager attention."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **{**FAMILY_CONFIGS[family], **overrides})
    return AutoModel.from_config(config, attn_implementation="eager").eval()


def with_exits(family: str = "bert", seed: int = 0, *, scale: float = 3.0, **cfg: Any) -> torch.nn.Module:
    """An encoder with exit heads whose weights are scaled up so exits disagree and are confident."""
    model = encoder(family, seed)
    lp.inject(model, lp.EarlyExitConfig(**{"num_labels": 3, **cfg}))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in model.exit_heads:
            head.classifier.weight.copy_(torch.randn(head.classifier.weight.shape, generator=g) * scale)
    return model


def padded_batch(batch: int = 12, length: int = 11, seed: int = 3) -> dict[str, torch.Tensor]:
    """Right-padded inputs whose real lengths vary from 2 to ``length``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=g)
    lengths = torch.randint(2, length + 1, (batch,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask}
