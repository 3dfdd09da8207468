"""Tiny Hugging Face models built from configs in code (nothing is downloaded) and the small helpers tests
import; the shared fixtures are in ``conftest.py``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

VOCAB = 97

TINY_CONFIGS: dict[str, dict] = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=1,
        max_position_embeddings=66,
    ),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
    "llama": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
    ),
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, width-32 model of ``family`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **TINY_CONFIGS[family])
    return AutoModel.from_config(config).eval()


def unregistered_model() -> torch.nn.Module:
    """A tiny Hugging Face model of a family with no registered layout (OPT)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "opt",
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=64,
        word_embed_proj_dim=32,
    )
    return AutoModel.from_config(config).eval()


def model_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def first_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def perturb_trainable(model: torch.nn.Module, seed: int = 123, scale: float = 0.1) -> None:
    """Give every trainable tensor random values, so a test sees what the tuner does when trained."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def routes_through_interface(family: str) -> bool:
    """Whether this transformers runs ``family``'s attention through ``AttentionInterface`` (5.x does for
    every tiny family; 4.57 not for BERT or T5): prefix keys enter there, so prefix tuning needs it."""
    from lightning_peft.attention.interface import routes_through_interface

    layer = next(m for m in tiny_model(family).modules() if "Attention" in type(m).__name__)
    return routes_through_interface(layer)


def needs_interface(family: str) -> pytest.MarkDecorator:
    """Skip where ``family``'s attention is computed inline (prefix tuning refuses it there)."""
    return pytest.mark.skipif(
        not routes_through_interface(family),
        reason=f"this transformers computes {family} attention inline (no AttentionInterface)",
    )
