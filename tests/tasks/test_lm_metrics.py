"""LM metrics against hand computations: shifted loss, corpus perplexity, SQuAD-style answer scores."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_peft.tasks.lm_metrics import (
    AnswerScores,
    TokenStats,
    exact_match,
    shifted_token_loss,
    token_f1,
)


def test_shifted_loss_skips_masked_targets() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=g)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    loss, correct = shifted_token_loss(logits, labels)
    # Position t predicts label t+1: (b0, t1)->3, (b0, t2)->1, (b1, t0)->2.
    expected = [
        F.cross_entropy(logits[0, 1:2], torch.tensor([3])),
        F.cross_entropy(logits[0, 2:3], torch.tensor([1])),
        F.cross_entropy(logits[1, 0:1], torch.tensor([2])),
    ]
    torch.testing.assert_close(loss, torch.stack(expected))
    assert correct.tolist() == [
        logits[0, 1].argmax() == 3,
        logits[0, 2].argmax() == 1,
        logits[1, 0].argmax() == 2,
    ]


def test_perplexity_is_token_weighted_over_the_split() -> None:
    stats = TokenStats()
    stats.update(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True]))
    stats.update(torch.tensor([5.0]), torch.tensor([False]))
    out = stats.compute()
    assert out["loss"].item() == pytest.approx(11 / 4)  # not the mean of batch means (3.5)
    assert out["ppl"].item() == pytest.approx(math.exp(11 / 4), rel=1e-6)
    assert out["token_acc"].item() == pytest.approx(0.5)


def test_answer_scores() -> None:
    assert exact_match(" `os.path.join`. ", "os.path.join") == 1.0
    assert exact_match("os.path.joinpath", "os.path.join") == 0.0
    assert token_f1("os.path.split", "os.path.join") == pytest.approx(2 / 3)
    assert token_f1("nothing", "os.path.join") == 0.0
    scores = AnswerScores()
    scores.update(["os.path.join", "os.path.split"], ["os.path.join", "os.path.join"])
    out = scores.compute()
    assert out["exact_match"].item() == pytest.approx(0.5)
    assert out["token_f1"].item() == pytest.approx((1 + 2 / 3) / 2)
