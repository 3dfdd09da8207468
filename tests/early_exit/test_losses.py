"""Multi-exit losses against hand computations: PABEE's weights, DeeBERT's two stages."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.early_exit import exit_weights, training_loss
from tests.early_exit.helpers import DEPTH, encoder, padded_batch


def _model(**cfg: object) -> torch.nn.Module:
    model = encoder("bert", 0)
    lp.inject(model, lp.EarlyExitConfig(num_labels=3, head_pooler=False, dropout=0.0, **cfg))
    return model


def _hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    return (torch.log(torch.exp(z).sum(-1)) - z.gather(-1, labels[:, None])[:, 0]).mean()


def _hidden(model: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(**batch, output_hidden_states=True).hidden_states[1:])


def test_weights() -> None:
    torch.testing.assert_close(exit_weights("pabee", 4), torch.tensor([1, 2, 3, 4]) / 10.0)
    torch.testing.assert_close(exit_weights("equal", 4), torch.full((4,), 0.25))
    torch.testing.assert_close(exit_weights([1.0, 0.0, 0.0, 3.0], 4), torch.tensor([0.25, 0.0, 0.0, 0.75]))


@pytest.mark.parametrize("weights", ["pabee", "equal", [0.0, 1.0, 1.0, 2.0]])
def test_joint_loss_by_hand(weights: object) -> None:
    model = _model(loss_weights=weights)
    batch = padded_batch(batch=6)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss, logits = training_loss(model, labels, **batch)
    hidden = _hidden(model, batch)
    per = [_hand_ce(model.exit_heads[j](hidden[j], batch["attention_mask"]), labels) for j in range(DEPTH)]
    if weights == "pabee":
        want = sum((j + 1) * per[j] for j in range(DEPTH)) / sum(range(1, DEPTH + 1))
    elif weights == "equal":
        want = sum(per) / DEPTH
    else:
        want = (per[1] + per[2] + 2 * per[3]) / 4
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    assert logits.shape == (DEPTH, 6, 3)


def test_deebert_stage1_trains_the_final_exit_only() -> None:
    model = _model(training="deebert", stage2_step=10)
    batch, labels = padded_batch(batch=6), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, _ = training_loss(model, labels, global_step=9, **batch)
    hidden = _hidden(model, batch)
    want = _hand_ce(model.exit_heads[-1](hidden[-1], batch["attention_mask"]), labels)
    torch.testing.assert_close(loss.double(), want, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for h in model.exit_heads[:-1] for p in h.parameters())
    assert all(p.grad is not None for p in model.exit_heads[-1].parameters())


def test_deebert_stage2_gradients_by_hand_and_frozen_rest() -> None:
    model = _model(training="deebert", stage2_step=10)
    for p in model.parameters():  # the worst case: everything could train
        p.requires_grad_(True)
    batch, labels = padded_batch(batch=6), torch.tensor([0, 1, 2, 0, 1, 2])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, logits = training_loss(model, labels, global_step=10, **batch)
    assert logits.shape == (DEPTH - 1, 6, 3)
    loss.backward()
    hidden = _hidden(model, batch)
    y = torch.nn.functional.one_hot(labels, 3).double()
    for j, head in enumerate(model.exit_heads[:-1]):
        x = hidden[j][:, 0].double()  # cls pooling, no pooler, no dropout: logits = x W^T + b
        p = torch.softmax(x @ head.classifier.weight.double().T + head.classifier.bias.double(), -1)
        torch.testing.assert_close(
            head.classifier.weight.grad.double(), (p - y).T @ x / 6, atol=1e-6, rtol=1e-5
        )
        torch.testing.assert_close(head.classifier.bias.grad.double(), (p - y).mean(0), atol=1e-6, rtol=1e-5)
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {f"exit_heads.{j}.classifier.{w}" for j in range(DEPTH - 1) for w in ("weight", "bias")}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in trained), n


def test_labels_outside_num_labels_are_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="num_labels=3"):
        training_loss(model, torch.tensor([0, 5]), **padded_batch(batch=2))
