"""Tokenizer and model helpers shared by templates, verbalizers and scorers.

Templates are tokenized piece by piece (literal text, each input slot, the mask) so that the position of
every mask and soft token is known exactly; these helpers hide the differences between tokenizer
families (WordPiece ignores a leading space, byte-level BPE turns it into part of the next token, and
special tokens differ: ``[CLS] x [SEP]`` for BERT, ``<s> x </s>`` for RoBERTa, nothing or ``<s> x`` for
decoders).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

__all__ = ["LMKind", "add_special_tokens", "encode_piece", "lm_kind", "mask_token_id", "special_affixes"]

LMKind = Literal["masked", "causal"]


def encode_piece(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a leading space is kept: BPE encodes it)."""
    if not text:
        return []
    return list(tokenizer.encode(text, add_special_tokens=False))


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after one sequence (``[CLS]`` / ``[SEP]``, ``<s>``...),
    read from how it encodes a sentinel with and without special tokens."""
    bare = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for offset in range(len(full) - len(bare) + 1):
        if full[offset : offset + len(bare)] == bare:
            return full[:offset], full[offset + len(bare) :]
    raise RuntimeError(f"{type(tokenizer).__name__} rewrites a sequence when adding its special tokens")


def add_special_tokens(tokenizer: Any, ids: list[int]) -> tuple[list[int], int]:
    """Wrap ``ids`` in the tokenizer's special tokens for one sequence.

    Returns:
        The full ids and the offset at which ``ids`` start inside them.
    """
    prefix, suffix = special_affixes(tokenizer)
    return [*prefix, *ids, *suffix], len(prefix)


def mask_token_id(tokenizer: Any) -> int:
    """The tokenizer's mask token id.

    Raises:
        ValueError: The tokenizer has no mask token (a causal LM's tokenizer).
    """
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no mask token: a {{mask}} template needs a masked LM's "
            "tokenizer (BERT / RoBERTa families). For a causal LM write the answer as a continuation: "
            "'{text} It was {answer}'"
        )
    return int(mask)


def lm_kind(model: nn.Module) -> LMKind:
    """``"masked"`` for ``*ForMaskedLM`` models, ``"causal"`` for ``*ForCausalLM`` / LM-head decoders.

    Raises:
        ValueError: ``model`` has no language-model head (a bare encoder such as ``BertModel``) or is an
            encoder-decoder model.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name}: encoder-decoder models are not supported by prompt-based classification")
    if name.endswith("ForMaskedLM"):
        return "masked"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    raise ValueError(
        f"{name} has no language-model head: prompt-based classification scores label words with the "
        "pretrained LM head. Load the model with AutoModelForMaskedLM (BERT / RoBERTa families) or "
        "AutoModelForCausalLM (GPT-2 / Llama families)."
    )
