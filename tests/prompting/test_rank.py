"""Rank classification: whole-answer log-likelihood by hand, length normalisation, varying choice counts."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.prompting.rank import TaskPrompt, choice_scores, rank_classify


def hand_loglik(model, tokenizer, prompt: str, answer: str) -> float:
    p = tokenizer.encode(prompt, add_special_tokens=False)
    a = tokenizer.encode(" " + answer, add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + a])).logits[0].double()
    return sum(float(logits[len(p) + i - 1].log_softmax(-1)[t]) for i, t in enumerate(a))


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_scores_equal_hand_log_likelihoods(bpe_tokenizer, tiny_gpt2, normalize) -> None:
    task = TaskPrompt("nli", "{premise} Question: {hypothesis}? Answer: {answer}")
    examples = [
        {"slots": {"premise": "The plot was dull.", "hypothesis": "It was good"}, "choices": ["yes", "no"]},
        {
            "slots": {"premise": "A superb cast.", "hypothesis": "It was fine"},
            "choices": ["yes", "maybe", "unforgettable"],
        },
    ]
    got = choice_scores(tiny_gpt2, bpe_tokenizer, task, examples, length_normalize=normalize)
    assert [len(s) for s in got] == [2, 3]  # different numbers of choices in one batch
    for ex, scores in zip(examples, got, strict=True):
        prompt = f"{ex['slots']['premise']} Question: {ex['slots']['hypothesis']}? Answer:"
        for choice, score in zip(ex["choices"], scores.tolist(), strict=True):
            expected = hand_loglik(tiny_gpt2, bpe_tokenizer, prompt, choice)
            if normalize:
                expected /= len(bpe_tokenizer.encode(" " + choice, add_special_tokens=False))
            assert score == pytest.approx(expected, abs=1e-4)
    preds = rank_classify(tiny_gpt2, bpe_tokenizer, task, examples, length_normalize=normalize)
    assert preds == [int(s.argmax()) for s in got]


def test_fixed_choices_and_errors(bpe_tokenizer, tiny_gpt2, tiny_bert_mlm, bert_tokenizer) -> None:
    task = TaskPrompt("sentiment", "{text} It was {answer}", choices=["bad", "good"])
    assert len(choice_scores(tiny_gpt2, bpe_tokenizer, task, [{"slots": {"text": "ok"}}])[0]) == 2
    with pytest.raises(ValueError, match="at least 2 answer choices"):
        TaskPrompt("x", "{text} {answer}", choices=["only"])
    with pytest.raises(ValueError, match="only a masked LM"):
        TaskPrompt("x", "{text} {mask}.")
    with pytest.raises(ValueError, match="needs a causal LM"):
        choice_scores(tiny_bert_mlm, bert_tokenizer, task, [{"slots": {"text": "ok"}}])
    with pytest.raises(ValueError, match=">= 2 answer choices"):
        choice_scores(
            tiny_gpt2, bpe_tokenizer, TaskPrompt("y", "{text} {answer}"), [{"slots": {"text": "a"}}]
        )
