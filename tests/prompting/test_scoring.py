"""Class scores equal a hand computation from the model's own logits, token by token."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.prompting import PromptScorer, Template, Verbalizer, lm_kind
from tests.prompting.helpers import tiny_lm

TEXTS = ["The plot was dull.", "I loved the soundtrack, it was superb!"]


def hand_masked_logprob(model, tokenizer, text: str, word: str) -> tuple[float, float]:
    """(raw logit of the word's first token, sum of its tokens' log-probs), from the full rendered text."""
    word_ids = tokenizer.encode(" " + word, add_special_tokens=False)
    masks = " ".join([tokenizer.mask_token] * len(word_ids))
    ids = tokenizer(f"{text} It was {masks}.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    positions = (ids[0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
    total = 0.0
    for pos, tok in zip(positions, word_ids, strict=True):
        row = logits[pos].double()
        total += float(row[tok] - torch.logsumexp(row, 0))
    return float(logits[positions[0], word_ids[0]]), total


def hand_causal_logprob(model, tokenizer, text: str, word: str) -> float:
    prompt = tokenizer.encode(f"{text} It was", add_special_tokens=False)
    word_ids = tokenizer.encode(" " + word, add_special_tokens=False)
    ids = torch.tensor([prompt + word_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for i, tok in enumerate(word_ids):
        row = logits[len(prompt) + i - 1]
        total += float(row[tok] - torch.logsumexp(row, 0))
    return total


def expected_scores(
    aggregation: str, raw: list[float] | None, lp: list[float], labels: list[int]
) -> list[float]:
    C = max(labels) + 1
    if aggregation == "pet":
        z = raw if raw is not None else lp
        return [sum(z[w] for w in range(len(z)) if labels[w] == c) / labels.count(c) for c in range(C)]
    norm = math.log(sum(math.exp(x) for x in lp))
    logq = [x - norm for x in lp]
    if aggregation == "mean_log_prob":
        return [sum(logq[w] for w in range(len(lp)) if labels[w] == c) / labels.count(c) for c in range(C)]
    return [
        math.log(sum(math.exp(logq[w]) for w in range(len(lp)) if labels[w] == c) / labels.count(c))
        for c in range(C)
    ]


@pytest.mark.parametrize("aggregation", ["pet", "mean_log_prob", "log_mean_prob"])
@pytest.mark.parametrize("multi", [False, True])
def test_masked_lm_scores_match_hand_computation(bert_tokenizer, tiny_bert_mlm, aggregation, multi) -> None:
    words = {"neg": ["terrible", "bad"], "pos": ["great"]}
    if multi:
        words["pos"].append("unwatchable")  # 3 WordPiece tokens: un ##watch ##able
        assert len(bert_tokenizer.encode("unwatchable", add_special_tokens=False)) > 1
    verbalizer = Verbalizer(words, aggregation=aggregation)
    scorer = PromptScorer(
        Template("{text} It was {mask}."), verbalizer, bert_tokenizer, lm_kind(tiny_bert_mlm)
    )
    batch = scorer.collate([scorer.encode({"text": t}) for t in TEXTS])
    with torch.no_grad():
        got = scorer(tiny_bert_mlm, batch)
    flat = [w for ws in words.values() for w in ws]
    labels = [c for c, ws in enumerate(words.values()) for _ in ws]
    for row, text in zip(got.tolist(), TEXTS, strict=True):
        hand = [hand_masked_logprob(tiny_bert_mlm, bert_tokenizer, text, w) for w in flat]
        raw = None if multi else [h[0] for h in hand]
        assert row == pytest.approx(expected_scores(aggregation, raw, [h[1] for h in hand], labels), abs=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("aggregation", ["pet", "log_mean_prob"])
def test_causal_lm_scores_match_hand_computation(bpe_tokenizer, family, aggregation) -> None:
    model = tiny_lm(family, len(bpe_tokenizer))
    assert lm_kind(model) == "causal"
    words = {"neg": ["terrible", "awful"], "pos": ["great", "unforgettable"]}
    lengths = [
        len(bpe_tokenizer.encode(" " + w, add_special_tokens=False)) for ws in words.values() for w in ws
    ]
    assert max(lengths) > 1 and min(lengths) == 1
    scorer = PromptScorer(
        Template("{text} It was {answer}"),
        Verbalizer(words, aggregation=aggregation),
        bpe_tokenizer,
        "causal",
    )
    batch = scorer.collate([scorer.encode({"text": t}) for t in TEXTS])  # right-padded: lengths differ
    assert batch["attention_mask"].min() == 0
    with torch.no_grad():
        got = scorer(model, batch)
    flat = [w for ws in words.values() for w in ws]
    labels = [c for c, ws in enumerate(words.values()) for _ in ws]
    for row, text in zip(got.tolist(), TEXTS, strict=True):
        lp = [hand_causal_logprob(model, bpe_tokenizer, text, w) for w in flat]
        assert row == pytest.approx(expected_scores(aggregation, None, lp, labels), abs=1e-4)


def test_causal_single_token_fast_path_equals_teacher_forcing(bpe_tokenizer, tiny_gpt2) -> None:
    words = {"neg": ["bad"], "pos": ["good"]}
    assert all(len(bpe_tokenizer.encode(" " + w, add_special_tokens=False)) == 1 for w in ["bad", "good"])
    scorer = PromptScorer(Template("{text} It was {answer}"), Verbalizer(words), bpe_tokenizer, "causal")
    batch = scorer.collate([scorer.encode({"text": t}) for t in TEXTS])
    with torch.no_grad():
        raw, lp = scorer.word_scores(tiny_gpt2, batch)
    for b, text in enumerate(TEXTS):
        for w, word in enumerate(["bad", "good"]):
            assert float(lp[b, w]) == pytest.approx(
                hand_causal_logprob(tiny_gpt2, bpe_tokenizer, text, word), abs=1e-4
            )
    assert raw is not None and torch.allclose(raw.log_softmax(-1), lp.log_softmax(-1), atol=1e-5)


def test_scores_under_prompt_tuning_read_shifted_positions(bert_tokenizer, tiny_bert_mlm) -> None:
    """Prompt tuning prepends virtual tokens: with them disabled, scores equal the base model's."""
    import lightning_peft as lp

    scorer = PromptScorer(
        Template("{text} It was {mask}."), Verbalizer({"n": ["bad"], "p": ["good"]}), bert_tokenizer, "masked"
    )
    batch = scorer.collate([scorer.encode({"text": t}) for t in TEXTS])
    with torch.no_grad():
        base = scorer(tiny_bert_mlm, batch)
        lp.inject(tiny_bert_mlm, lp.PromptTuningConfig(num_virtual_tokens=3))
        tuned = scorer(tiny_bert_mlm, batch)
        with lp.disable_adapters(tiny_bert_mlm):
            again = scorer(tiny_bert_mlm, batch)
    assert torch.allclose(base, again, atol=1e-6)
    assert not torch.allclose(base, tuned, atol=1e-4)


def test_lm_kind_refuses_bare_encoders() -> None:
    from tests.models import tiny_model

    with pytest.raises(ValueError, match="no language-model head"):
        lm_kind(tiny_model("bert"))
