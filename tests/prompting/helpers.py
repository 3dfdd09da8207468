"""Helpers the prompting tests import (the fixtures built on them are in ``conftest.py``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PreTrainedTokenizerFast

from lightning_peft.tasks.data import DEMO_TRAIN

BPE_VOCAB = 1000


SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def demo_texts(limit: int = 2000) -> list[str]:
    with Path(DEMO_TRAIN).open(newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)][:limit]


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [*demo_texts(), "It was great terrible good bad fine awful."]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_lm(family: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer width-32 LM-head model (``*ForMaskedLM`` / ``*ForCausalLM``), seeded, in eval mode."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "bert": dict(TINY, max_position_embeddings=256),
        "roberta": dict(TINY, pad_token_id=0, max_position_embeddings=260),
        "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=2),
        "llama": dict(TINY, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    }[family]
    config = AutoConfig.for_model(family, vocab_size=vocab_size, **fields)
    auto = AutoModelForMaskedLM if family in ("bert", "roberta") else AutoModelForCausalLM
    return auto.from_config(config).eval()
