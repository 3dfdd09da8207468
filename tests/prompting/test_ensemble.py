"""Ensemble averaging, distillation loss and iPET's sampling rule against reference formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_peft.prompting.ensemble import (
    distillation_loss,
    ensemble_logits,
    ipet_class_counts,
    ipet_draw,
    ipet_subset,
)


def test_ensemble_mean_and_accuracy_weighting() -> None:
    a = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    b = torch.tensor([[3.0, 0.0], [2.0, 1.0]])
    assert torch.equal(ensemble_logits([a, b]), torch.tensor([[2.0, 1.0], [1.0, 0.0]]))
    # weights 0.9 and 0.6 (accuracies): (0.9 a + 0.6 b) / 1.5
    expected = (0.9 * a + 0.6 * b) / 1.5
    assert torch.allclose(ensemble_logits([a, b], [0.9, 0.6]), expected)
    with pytest.raises(ValueError, match="unlabeled set is empty"):
        ensemble_logits([torch.zeros(0, 2)])
    with pytest.raises(ValueError, match="non-negative weights"):
        ensemble_logits([a, b], [1.0])


def test_distillation_loss_is_kl_times_t_squared() -> None:
    s = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 1.0, 3.0]])
    T = 2.0
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        q = [math.exp(x / T) for x in trow]
        q = [x / sum(q) for x in q]
        p = [math.exp(x / T) for x in srow]
        p = [x / sum(p) for x in p]
        total += sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))  # KL(teacher || student)
    expected = total / 2 * T**2
    assert distillation_loss(s, t, T).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-7)


def test_ipet_subset_is_a_quarter_of_the_others_at_least_one() -> None:
    rng = np.random.default_rng(0)
    for k, size in ((2, 1), (3, 1), (5, 1), (9, 2), (13, 3)):
        for i in range(k):
            subset = ipet_subset(i, k, rng)
            assert len(subset) == size and i not in subset and len(set(subset)) == size
    with pytest.raises(ValueError, match="at least 2"):
        ipet_subset(0, 1, rng)


def test_ipet_growth_by_five_with_the_labeled_class_shares() -> None:
    labels = [0] * 6 + [1] * 10  # 16 labeled: 37.5% / 62.5%
    assert ipet_class_counts(labels, 2, generation=0) == [round(64 * 0.375), round(64 * 0.625)]  # 80 - 16
    assert sum(ipet_class_counts(labels, 2, generation=1)) == 16 * 25 - 16


def test_ipet_draw_is_confidence_weighted_without_replacement() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.2, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.1], [0.0, 5.0]])
    got, labels = ipet_draw(logits, [2, 1], np.random.default_rng(7))
    # reference: numpy's weighted draw without replacement, weights = max softmax probability
    probs = torch.softmax(logits.double(), -1).numpy()
    ref = np.random.default_rng(7)
    expected = []
    for c, n in enumerate([2, 1]):
        pool = np.flatnonzero(probs.argmax(1) == c)
        conf = probs[pool].max(1)
        expected += list(ref.choice(pool, size=n, replace=False, p=conf / conf.sum()))
    assert got == [int(i) for i in expected] and labels == [0, 0, 1]
    # confident examples are drawn more often
    hits = np.zeros(6)
    for seed in range(400):
        picked, _ = ipet_draw(logits, [1, 1], np.random.default_rng(seed))
        hits[picked] += 1
    assert hits[0] > hits[1] and hits[5] > hits[4]
    with pytest.raises(ValueError, match="empty"):
        ipet_draw(torch.zeros(0, 2), [1, 1], np.random.default_rng(0))
