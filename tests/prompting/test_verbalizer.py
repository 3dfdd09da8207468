"""Verbalizer aggregations against hand formulas, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.prompting import LabelWords, Verbalizer, aggregate


def words_of(labels: list[int], lengths: list[int] | None = None) -> LabelWords:
    lengths = lengths or [1] * len(labels)
    ids = torch.zeros(len(labels), max(lengths), dtype=torch.long)
    return LabelWords(ids, torch.tensor(lengths), torch.tensor(labels), max(labels) + 1, ["w"] * len(labels))


def test_pet_oracle_mean_of_raw_logits() -> None:
    # V_0 = {a}, V_1 = {b, c}; raw logits a=1, b=2, c=0 -> s = [1, 1] (DESIGN.md section 10)
    words = words_of([0, 1, 1])
    z = torch.tensor([[1.0, 2.0, 0.0]])
    logprobs = z - 10.0  # anything: single-token PET uses the raw logits
    assert aggregate("pet", z, logprobs, words).tolist() == [[1.0, 1.0]]


def test_pet_uses_log_probs_when_a_word_has_several_tokens() -> None:
    words = words_of([0, 1, 1], lengths=[1, 2, 1])
    logprobs = torch.tensor([[-1.0, -3.0, -2.0]])
    assert aggregate("pet", None, logprobs, words).tolist() == [[-1.0, -2.5]]


def test_openprompt_and_log_mean_prob_by_hand() -> None:
    words = words_of([0, 1, 1])
    lp = [-0.5, -1.0, -3.0]
    q = [math.exp(x) for x in lp]
    q = [x / sum(q) for x in q]  # softmax over all label words
    mean_log = [math.log(q[0]), (math.log(q[1]) + math.log(q[2])) / 2]
    log_mean = [math.log(q[0]), math.log((q[1] + q[2]) / 2)]
    got = aggregate("mean_log_prob", None, torch.tensor([lp]), words)[0].tolist()
    assert got == pytest.approx(mean_log, abs=1e-6)
    got = aggregate("log_mean_prob", None, torch.tensor([lp]), words)[0].tolist()
    assert got == pytest.approx(log_mean, abs=1e-6)


def test_length_normalisation_divides_by_token_count() -> None:
    v = Verbalizer({"a": ["x"], "b": ["y"]}, aggregation="pet", length_normalize=True)
    words = words_of([0, 1], lengths=[1, 3])
    got = v.aggregate(None, torch.tensor([[-2.0, -6.0]]), words)
    assert got.tolist() == [[-2.0, -2.0]]


def test_tokenize_multi_token_words(bpe_tokenizer) -> None:
    v = Verbalizer({"neg": ["terrible", "unwatchable"], "pos": ["great"]})
    words = v.tokenize(bpe_tokenizer, space=True)
    for w, row, n in zip(words.words, words.ids.tolist(), words.lengths.tolist(), strict=True):
        assert row[:n] == bpe_tokenizer.encode(" " + w, add_special_tokens=False)
        assert all(x == -1 for x in row[n:])
    assert words.label.tolist() == [0, 0, 1]
    assert words.lengths.max() > 1  # the small BPE splits some word


def test_bad_verbalizers(bert_tokenizer) -> None:
    with pytest.raises(ValueError, match="has no words"):
        Verbalizer({"pos": ["great"], "neg": []})
    with pytest.raises(ValueError, match="listed under labels"):
        Verbalizer({"pos": ["great", "fine"], "neg": ["fine"]})
    with pytest.raises(ValueError, match="aggregation must be"):
        Verbalizer({"pos": ["a"], "neg": ["b"]}, aggregation="max")
    with pytest.raises(ValueError, match="cannot be represented"):
        Verbalizer({"pos": ["great"], "neg": ["\u2603\u2603"]}).tokenize(bert_tokenizer)
    with pytest.raises(ValueError, match="the same ids"):
        Verbalizer({"pos": ["Great"], "neg": ["great"]}).tokenize(bert_tokenizer)  # uncased
