"""Criteria details: stable entropy, PABEE regression, SDN's fallback, decide() on hand-made logits."""

from __future__ import annotations

import math

import torch

import lightning_peft as lp
from lightning_peft.early_exit import decide, entropy


def test_entropy_is_finite_and_right_for_huge_logits() -> None:
    z = torch.tensor([[1e4, 0.0, 0.0], [1e4, 1e4, 0.0], [1e4, 1e4, 1e4], [-1e4, 3.0, 3.0]])
    # The logsumexp-free form of the transformers DeeBERT copy overflows here:
    naive = torch.log(torch.exp(z).sum(-1)) - (z * torch.exp(z)).sum(-1) / torch.exp(z).sum(-1)
    assert not torch.isfinite(naive[:3]).any()
    got = entropy(z)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([0.0, math.log(2), math.log(3), math.log(2)]))


def test_entropy_matches_the_definition_for_ordinary_logits() -> None:
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(z.double(), -1)
    torch.testing.assert_close(entropy(z).double(), -(p * p.log()).sum(-1), atol=1e-6, rtol=0)


def _logits(*rows: list[list[float]]) -> torch.Tensor:
    """(L, B, C) from per-sample lists of per-layer logits."""
    return torch.tensor(rows, dtype=torch.float32).transpose(0, 1)


def test_pabee_counter_by_hand() -> None:
    # Predictions per layer: sample 0: 0,0,0,1,1 -> counter 0,1,2 -> leaves at layer 3 with patience 2.
    # Sample 1: 0,1,0,1,0 -> never agrees -> last. Sample 2: 1,1,0,0,0 -> 0,1,0,1,2 -> layer 5.
    a, b = [2.0, 0.0], [0.0, 2.0]
    s0 = [a, a, a, b, b]
    s1 = [a, b, a, b, a]
    s2 = [b, b, a, a, a]
    z = _logits(s0, s1, s2)
    _, layer = decide(lp.EarlyExitConfig(num_labels=2, patience=2), z)
    assert layer.tolist() == [3, 5, 5]
    _, layer = decide(lp.EarlyExitConfig(num_labels=2, patience=1), z)
    assert layer.tolist() == [2, 5, 2]


def test_pabee_regression_with_tau() -> None:
    z = _logits([[0.0], [0.5], [0.55], [0.58], [2.0]], [[1.0], [1.0], [1.09], [1.5], [1.5]])
    out, layer = decide(lp.EarlyExitConfig(num_labels=1, patience=2, tau=0.1), z)
    assert layer.tolist() == [4, 3]
    torch.testing.assert_close(out[:, 0], torch.tensor([0.58, 1.09]))


def test_shallow_deep_fallback_most_confident_or_last() -> None:
    z = _logits([[1.0, 0.0], [3.0, 0.0], [0.5, 0.0], [0.0, 0.2]])
    cfg = lp.EarlyExitConfig(num_labels=2, criterion="confidence", threshold=0.99)
    out, layer = decide(cfg, z)
    assert layer.tolist() == [4]  # ran every layer
    torch.testing.assert_close(out[0], torch.tensor([3.0, 0.0]))  # the most confident exit's logits
    out, _ = decide(
        lp.EarlyExitConfig(num_labels=2, criterion="confidence", threshold=0.99, fallback="last"), z
    )
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.2]))


def test_deebert_per_layer_thresholds() -> None:
    z = _logits([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    h = float(entropy(torch.tensor([2.0, 0.0])))
    cfg = lp.EarlyExitConfig(num_labels=2, criterion="entropy", threshold=[h - 0.01, h + 0.01])
    assert decide(cfg, z)[1].tolist() == [2]
    cfg = lp.EarlyExitConfig(num_labels=2, criterion="entropy", threshold=[h - 0.01, h - 0.01])
    assert decide(cfg, z)[1].tolist() == [3]
