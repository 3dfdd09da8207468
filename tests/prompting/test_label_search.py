"""Label-word search against a brute-force computation from the model's own log-probabilities."""

from __future__ import annotations

import itertools

import pytest
import torch

from lightning_peft.prompting import Template
from lightning_peft.prompting.label_search import answer_logprobs, candidate_words, search_label_words
from lightning_peft.tasks.prompt_data import PromptData

TEXTS = ["The plot was dull.", "A superb cast.", "It broke after a week.", "I loved every minute."]


def examples(n: int = 8) -> list[dict]:
    rows = PromptData().examples("train")[:n]
    return [{**r, "index": i} for i, r in enumerate(rows)]


def test_answer_logprobs_are_the_mask_distribution(bert_tokenizer, tiny_bert_mlm) -> None:
    exs = [{"slots": {"text": t}, "label": 0} for t in TEXTS]
    got = answer_logprobs(tiny_bert_mlm, bert_tokenizer, Template("{text} It was {mask}."), exs)
    for row, text in zip(got, TEXTS, strict=True):
        ids = bert_tokenizer(f"{text} It was [MASK].", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = tiny_bert_mlm(input_ids=ids).logits[0]
        pos = int((ids[0] == bert_tokenizer.mask_token_id).nonzero())
        assert torch.allclose(row, logits[pos].log_softmax(-1), atol=1e-5)


def test_causal_answer_logprobs_are_the_next_token_distribution(bpe_tokenizer, tiny_gpt2) -> None:
    exs = [{"slots": {"text": t}, "label": 0} for t in TEXTS]
    got = answer_logprobs(tiny_gpt2, bpe_tokenizer, Template("{text} It was {answer}"), exs)
    for row, text in zip(got, TEXTS, strict=True):
        ids = torch.tensor([bpe_tokenizer.encode(f"{text} It was", add_special_tokens=False)])
        with torch.no_grad():
            expected = tiny_gpt2(input_ids=ids).logits[0, -1].log_softmax(-1)
        assert torch.allclose(row, expected, atol=1e-5)


def test_candidates_are_top_whole_words_by_summed_log_prob(bert_tokenizer) -> None:
    torch.manual_seed(0)
    lp = torch.randn(6, len(bert_tokenizer)).log_softmax(-1)
    labels = [0, 1, 0, 1, 1, 0]
    got = candidate_words(lp, labels, 2, bert_tokenizer, k=4)
    vocab = bert_tokenizer.convert_ids_to_tokens(list(range(len(bert_tokenizer))))
    for c in range(2):
        total = lp[[i for i, y in enumerate(labels) if y == c]].sum(0)
        ranked = [vocab[i] for i in torch.argsort(total, descending=True).tolist()]
        whole = [
            t
            for t in ranked
            if t.isalpha() and not t.startswith("##") and t not in bert_tokenizer.all_special_tokens
        ]
        assert got[c] == whole[:4]


def test_search_ranks_assignments_by_train_then_dev_accuracy(bert_tokenizer, tiny_bert_mlm) -> None:
    template = Template("{text} It was {mask}.")
    exs = examples(16)
    train, dev = exs[:10], exs[10:]
    result = search_label_words(tiny_bert_mlm, bert_tokenizer, template, train, dev, 2, k=3, top=4)
    train_lp = answer_logprobs(tiny_bert_mlm, bert_tokenizer, template, train)
    dev_lp = answer_logprobs(tiny_bert_mlm, bert_tokenizer, template, dev)

    def acc(lp: torch.Tensor, exs: list[dict], words: tuple[str, ...]) -> float:
        ids = [bert_tokenizer.convert_tokens_to_ids(w) for w in words]
        return float((lp[:, ids].argmax(-1) == torch.tensor([e["label"] for e in exs])).float().mean())

    brute = sorted(
        (w for w in itertools.product(*result.candidates) if len(set(w)) == len(w)),
        key=lambda w: -acc(train_lp, train, w),
    )
    assert result.train_acc == sorted(result.train_acc, reverse=True)
    assert result.train_acc[0] == pytest.approx(acc(train_lp, train, brute[0]))
    for words, a, d in zip(result.assignments, result.train_acc, result.dev_acc, strict=True):
        assert a == pytest.approx(acc(train_lp, train, words)) and d == pytest.approx(acc(dev_lp, dev, words))
    assert result.dev_acc[result.assignments.index(result.best)] == max(result.dev_acc)
    custom = search_label_words(
        tiny_bert_mlm,
        bert_tokenizer,
        template,
        train,
        dev,
        2,
        k=3,
        top=4,
        rerank=lambda words: float(words == result.assignments[-1]),
    )
    assert custom.best == result.assignments[-1]
    assert set(result.verbalizer(["negative", "positive"])) == {"negative", "positive"}
