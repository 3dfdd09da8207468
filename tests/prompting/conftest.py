"""Fixtures for prompting tests: real tokenizers built offline and tiny LM-head models built in code.

* ``bert_tokenizer``: the bundled all-MiniLM-L6-v2 WordPiece tokenizer (``[CLS] x [SEP]``, ``[MASK]``);
  paired with a tiny ``BertForMaskedLM`` of its 30,522-token vocabulary.
* ``bpe_tokenizer``: a byte-level BPE (GPT-2 / RoBERTa style: a leading space is part of a token) trained
  in code on the bundled demo reviews with a small vocabulary, so many words span several tokens; paired
  with tiny GPT-2, Llama and RoBERTa models."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from lightning_peft.tasks.pretrained import load_tokenizer
from tests.prompting.helpers import build_bpe_tokenizer, tiny_lm


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def bert_tokenizer() -> Any:
    return load_tokenizer("minilm")


@pytest.fixture
def tiny_bert_mlm(bert_tokenizer: Any) -> torch.nn.Module:
    return tiny_lm("bert", len(bert_tokenizer))


@pytest.fixture
def tiny_gpt2(bpe_tokenizer: Any) -> torch.nn.Module:
    return tiny_lm("gpt2", len(bpe_tokenizer))
